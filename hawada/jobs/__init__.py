"""Jobs: what the pipeline trains, evaluates and times for each ``data.kind``.

A job module registers a builder ``(recipe, device) -> Job`` for its kinds with
:func:`register_job`; :func:`build_job` looks the recipe's kind up. Built-in kinds:
``digits``, ``imagefolder`` (:mod:`hawada.jobs.vision`), ``stdlib_docstrings``
(:mod:`hawada.jobs.text`), ``stdlib_source`` (:mod:`hawada.jobs.lm`), and ``text`` (the user's
own text; :mod:`hawada.jobs.text` hands it to the encoder or the LM job by ``model.family``).
"""

from hawada.jobs.base import BUILTIN_JOBS, Job, JobBuilder, build_job, job_builder, job_kinds, register_job

__all__ = ["BUILTIN_JOBS", "Job", "JobBuilder", "build_job", "job_builder", "job_kinds", "register_job"]

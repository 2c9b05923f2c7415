"""Fine-tune phase: distil the exported slim model from the teacher, keeping its best state."""

from __future__ import annotations

from torch import nn

from hawada.core.finetune import finetune_student
from hawada.core.loop import NonFiniteError
from hawada.run.context import RunContext


def finetune_slim(ctx: RunContext, slim: nn.Module) -> tuple[nn.Module, list[dict]]:
    """``(the best fine-tuned slim model, its history)``, scored on the job's validation split."""
    job, teacher = ctx.job, ctx.teacher
    try:
        return finetune_student(
            slim,
            teacher,
            ctx.adapter,
            ctx.train_loader,
            ctx.recipe.resolved("finetune"),
            ctx.recipe.kd,
            evaluate=lambda m: job.evaluate(teacher, m, "val")[job.score_key],
            env=ctx.env,
        )
    except NonFiniteError as e:  # the gate-training checkpoint stands: fine-tuning can be redone
        raise NonFiniteError(
            f"{e}; the gate-training checkpoint is kept: hawada optimize --resume {ctx.paths.out}"
        ) from e

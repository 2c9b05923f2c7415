"""``hawada optimize``: attach -> calibrate -> train -> search -> export -> fine-tune -> report."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import get_adapter
from hawada.config import Recipe, recipe_from_dict
from hawada.core.calibrate import calibration_logits, measure_subarchs
from hawada.core.checkpoint import atomic_write_bytes, has_checkpoint, load_checkpoint, save_checkpoint
from hawada.core.distill import KDConfig
from hawada.core.distributed import (
    SINGLE,
    DistEnv,
    ShardedBatches,
    barrier,
    broadcast_tensors,
    full_state_dict,
    fully_shard_layers,
    init_from_env,
    local_device,
    on_main,
    shutdown,
)
from hawada.core.export import ExportPolicy, export, param_count, store_of
from hawada.core.finetune import FinetuneConfig, finetune_student
from hawada.core.gates import GateConfig, PenaltyWeights
from hawada.core.profiler import Meter, environment_info, latency_meter, measure_pooled
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.search_export import grid_search_latency
from hawada.core.train import LagrangeTrainer, NonFiniteError, StopRequested, TrainConfig, make_latency_probe
from hawada.jobs import Job, build_job

PARTIAL = ".partial"  # the run folder while a run is unfinished: <output.dir>.partial


class TargetError(ValueError):
    """A latency target that no allowed keep set can reach."""


class OutputError(ValueError):
    """An output folder that would be overwritten without being asked."""


class RunInterrupted(Exception):
    """SIGINT/SIGTERM during gate training: the step finished, a checkpoint was written."""

    def __init__(self, signum: int, step: int, run_dir: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received: stopped after gate step {step}, checkpoint written; "
            f"continue with: hawada optimize --resume {run_dir}"
        )
        self.signum = signum


@dataclass
class RunPaths:
    """Where an unfinished run keeps its state (see README: "Interrupted runs")."""

    out: str  # output.dir: appears only when the run is complete
    partial: str  # <out>.partial: outputs being written + state/
    state: str  # recipe.json, setup/ (measurements, teacher), checkpoints/

    @classmethod
    def of(cls, out_dir: str) -> RunPaths:
        out = out_dir.rstrip("/") or out_dir
        partial = out + PARTIAL
        return cls(out, partial, os.path.join(partial, "state"))

    @property
    def setup(self) -> str:
        return os.path.join(self.state, "setup")

    @property
    def checkpoints(self) -> str:
        return os.path.join(self.state, "checkpoints")


def resume_recipe(run_dir: str) -> Recipe:
    """The recipe of the unfinished run ``run_dir`` (its output.dir or its ``.partial`` folder)."""
    d = run_dir.rstrip("/") or run_dir
    out = d[: -len(PARTIAL)] if d.endswith(PARTIAL) else d
    paths = RunPaths.of(out)
    if not os.path.isdir(paths.partial):
        if os.path.isfile(os.path.join(out, "report.json")):
            raise OutputError(f"run {out} is already complete: nothing to resume")
        raise FileNotFoundError(f"no unfinished run at {out} (looked for {paths.partial})")
    rpath = os.path.join(paths.state, "recipe.json")
    try:
        with open(rpath) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{paths.partial} has no state/recipe.json: not a resumable run") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"run recipe {rpath} is corrupted ({type(e).__name__})") from None
    recipe = recipe_from_dict(data)
    recipe.output.dir = out  # the run folder may have been moved
    return recipe


class MetricsLog:
    """Metrics as JSON lines, flushed per record (``tail -f`` works); TensorBoard when installed."""

    def __init__(self, path: str, history: list[dict], tb_dir: str | None = None) -> None:
        # a resumed run rewrites the file from the checkpoint's history: no records past it
        atomic_write_bytes(path, "".join(self._line({"phase": "gates", **r}) for r in history).encode())
        self.f = open(path, "a")  # noqa: SIM115 - stays open for the whole run, closed by close()
        self.tb = None
        if tb_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(tb_dir)
            except ImportError:  # optional
                self.tb = None

    @staticmethod
    def _line(rec: dict) -> str:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        return json.dumps(clean) + "\n"

    def write(self, phase: str, rec: dict) -> None:
        self.f.write(self._line({"phase": phase, **rec}))
        self.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{phase}/{k}", v, rec.get("step", 0))

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


class _NoLog:
    """The metrics log of ranks other than 0 (rank 0 alone writes files)."""

    def write(self, phase: str, rec: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def gate_config(recipe: Recipe) -> GateConfig:
    g = recipe.gates
    return GateConfig(
        mode=g.mode,
        init_logit=g.init_logit,
        tau=g.tau,
        tau_final=g.tau_final,
        group_size=dict(g.group_size),
        min_keep=dict(g.min_keep),
        kinds=tuple(g.kinds) if g.kinds is not None else None,
    )


def kd_config(recipe: Recipe, gates: bool = False) -> KDConfig:
    """The distillation weights of the fine-tune, or of gate training with ``gates``."""
    k = recipe.kd
    hidden = k.alpha_hidden_gates if gates and k.alpha_hidden_gates is not None else k.alpha_hidden
    return KDConfig(
        temperature=k.temperature,
        alpha_kl=k.alpha_kl,
        alpha_mse=k.alpha_mse,
        alpha_cos=k.alpha_cos,
        alpha_emb_mse=k.alpha_emb_mse,
        alpha_hidden=hidden,
    )


def make_meter(recipe: Recipe, job: Job) -> Meter:
    """The one way this run times a plain model (recipe's measure settings, job's inputs)."""
    m = recipe.measure
    return latency_meter(
        job.latency_inputs,
        recipe.device,
        job.timed,
        warmup=m.warmup,
        min_repeats=m.min_repeats,
        max_repeats=m.max_repeats,
        budget_s=m.budget_s,
        timer=m.timer,
        cuda_graph=m.cuda_graph,
    )


def check_output_dir(recipe: Recipe) -> str:
    out = recipe.output.dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"output.dir {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not recipe.output.overwrite:
        raise OutputError(
            f"output.dir {out} exists and is not empty (set output.overwrite=true to replace it)"
        )
    return out


@torch.no_grad()
def set_minimal_keep(store) -> None:
    """Logits so that each segment keeps exactly its ``min_keep`` gates (the fastest allowed)."""
    new = torch.full_like(store.logits, -1.0)
    for s in store.segments:
        new[s.start : s.start + s.min_keep] = 1.0
    store.logits.copy_(new)


def optimize(recipe: Recipe, log: Callable[[str], None] = print, resume: bool = False) -> dict:
    """Run the whole job of a validated recipe; returns the report (also written as JSON).

    Everything is written into ``<output.dir>.partial`` and renamed to ``output.dir`` only
    when complete. Gate training checkpoints into ``<output.dir>.partial/state``;
    ``resume=True`` continues from there (the measurements and teacher of the first start
    are reused, gate training continues exactly, later phases re-run). A run that fails
    before its first checkpoint leaves nothing behind.

    Launched by ``torchrun`` with several processes, gate training and fine-tuning run
    data-parallel (see :mod:`hawada.core.distributed`); rank 0 alone measures latency and
    writes files, and every rank returns the same report.
    """
    env = init_from_env(recipe.device)
    if not env.is_main:
        log = _quiet
    paths = RunPaths.of(recipe.output.dir)

    def prepare() -> None:
        check_output_dir(recipe)
        if resume:
            if not os.path.isdir(paths.state):
                raise FileNotFoundError(f"no unfinished run at {paths.out} (looked for {paths.state})")
            return
        if os.path.exists(paths.partial):
            if not recipe.output.overwrite:
                raise OutputError(
                    f"{paths.partial} holds an unfinished run: continue it with "
                    f"`hawada optimize --resume {paths.out}` or set output.overwrite=true to start over"
                )
            shutil.rmtree(paths.partial)
        os.makedirs(paths.state)
        atomic_write_bytes(os.path.join(paths.state, "recipe.json"), json.dumps(recipe.to_dict()).encode())

    was_det = torch.are_deterministic_algorithms_enabled()
    try:
        on_main(env, prepare)
        if recipe.deterministic:
            torch.use_deterministic_algorithms(True)
        try:
            report = _optimize(recipe, paths, log, resume, env)
            barrier(env)  # every rank is done before the group goes (gloo aborts on a racing teardown)
            return report
        except BaseException:
            if env.is_main and not resume and not has_checkpoint(paths.checkpoints):
                shutil.rmtree(paths.partial, ignore_errors=True)
            raise
        finally:
            torch.use_deterministic_algorithms(was_det)
    finally:
        shutdown(env)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0: they print nothing."""


def _setup_tensors(teacher: nn.Module | None, proxy: LatencyProxy, calib: list) -> dict[str, torch.Tensor]:
    t = {f"proxy.{k}": v for k, v in proxy.state_dict().items()}
    if teacher is not None:
        t.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    for i, (w, _) in enumerate(calib):
        t[f"calib.{i}"] = torch.as_tensor(w)
    return t


class _SignalFlag:
    """SIGINT/SIGTERM set a flag (the current step finishes) instead of killing the step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.old: dict = {}

    def __enter__(self) -> _SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def _optimize(
    recipe: Recipe, paths: RunPaths, log: Callable[[str], None], resume: bool, env: DistEnv = SINGLE
) -> dict:
    t_start = time.perf_counter()
    out_dir = paths.out
    have_setup = resume and has_checkpoint(paths.setup)
    setup_t: dict[str, torch.Tensor] = {}
    setup: dict = {}
    recipe_dict = recipe.to_dict()
    if have_setup:
        setup_t, setup, _ = load_checkpoint(paths.setup)
        if any(k.startswith("teacher.") for k in setup_t):  # trained in the first start: reuse it
            recipe = dataclasses.replace(recipe, teacher=dataclasses.replace(recipe.teacher, epochs=0))
    device = local_device(recipe.device, env)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no CUDA device is available")
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    get_adapter(recipe.model.family)  # an unknown family fails before any work
    seed_everything(recipe.seed)

    job = build_job(recipe, device)
    adapter, teacher = job.adapter, job.teacher.to(device).eval()
    lat_in = job.latency_inputs
    dev = str(device)
    meter = make_meter(recipe, job)
    if have_setup and any(k.startswith("teacher.") for k in setup_t):
        teacher.load_state_dict(
            {k[8:]: v for k, v in setup_t.items() if k.startswith("teacher.")}, strict=True
        )
    if env.enabled:  # e.g. a teacher the recipe trained: every rank starts from rank 0's
        broadcast_tensors(teacher.state_dict().values(), env)

    student = copy.deepcopy(teacher)
    adapter.attach(student, gate_config(recipe))
    store = store_of(student)
    log(f"gates: {len(store)} in {store.num_segments} segments")

    def proxy_from(st: dict, st_t: dict[str, torch.Tensor]) -> tuple[LatencyProxy, list]:
        """The proxy and calibration points recorded in a setup (measured once, by rank 0)."""
        px = LatencyProxy(store, adapter.cost_terms(student, lat_in), mode=recipe.proxy.mode).to(device)
        px.load_state_dict({k[6:]: v for k, v in st_t.items() if k.startswith("proxy.")}, strict=True)
        px.calibration = st["proxy_calibration"]
        px.table_measured = st["proxy_table_measured"]
        return px, [(st_t[f"calib.{i}"], ms) for i, ms in enumerate(st["calib_ms"])]

    def measure_setup() -> tuple[dict, dict[str, torch.Tensor]]:
        # -- how fast can it get? (measured, every segment at its minimum)
        # the target is a fraction of this keep-all median: one discarded measurement takes the
        # first timings of the process (allocations, thread pool start), then both are measured
        # interleaved and pooled, as in the final report
        saved = store.logits.detach().clone()
        set_minimal_keep(store)
        minimal = export(student, ExportPolicy(check=False))
        with torch.no_grad():
            store.logits.copy_(saved)
        meter(teacher)
        base_r, min_r = measure_pooled([teacher, minimal], meter)
        base_ms, min_ms = base_r.median_ms, min_r.median_ms
        del minimal
        target_ms = (
            recipe.target.latency_ms
            if recipe.target.latency_ms is not None
            else recipe.target.ratio * base_ms
        )
        if target_ms < min_ms:
            raise TargetError(
                f"target latency {target_ms:.3g} ms is below the fastest allowed keep set ({min_ms:.3g} ms measured on "
                f"{dev} with every segment at its min_keep; keep-all {base_ms:.3g} ms)"
            )
        log(
            f"latency on {dev}: keep-all {base_ms:.2f} ms, smallest allowed {min_ms:.2f} ms, target {target_ms:.2f} ms"
        )

        # -- proxy: lookup table + calibration on several measured sub-architectures
        proxy = LatencyProxy(store, adapter.cost_terms(student, lat_in), mode=recipe.proxy.mode).to(device)
        if recipe.proxy.mode == "lut":
            n_ops = proxy.measure_table(
                device=dev, repeats=recipe.proxy.lut_repeats, budget_s=recipe.proxy.lut_budget_s
            )
            log(f"proxy lookup table: {n_ops} ops timed")
        calib = measure_subarchs(
            student, calibration_logits(student, recipe.proxy.calib_points, recipe.seed), meter
        )
        fit = proxy.calibrate([w for w, _ in calib], [m for _, m in calib])
        log(f"proxy calibrated on {len(calib)} measured sub-architectures: MAPE {fit['mape']:.1f}%")
        st = {
            "base_ms": base_ms,
            "min_ms": min_ms,
            "target_ms": target_ms,
            "initial_fit_mape": fit["mape"],
            "calib_ms": [float(m) for _, m in calib],
            "proxy_calibration": proxy.calibration,
            "proxy_table_measured": bool(getattr(proxy, "table_measured", False)),
        }
        save_checkpoint(
            paths.setup, 0, _setup_tensors(teacher if recipe.model.path is None else None, proxy, calib), st
        )
        return st, {k: v.detach().cpu() for k, v in _setup_tensors(None, proxy, calib).items()}

    if have_setup:
        log(
            f"resuming {paths.partial}: measurements of the first start reused (target {setup['target_ms']:.2f} ms)"
        )
    else:  # measured by rank 0 alone (the other ranks wait: nothing else runs while it times)
        setup, setup_t = on_main(env, measure_setup)
    min_ms, target_ms = setup["min_ms"], setup["target_ms"]
    proxy, calib = proxy_from(setup, setup_t)
    store.set_segment_costs(proxy.unit_costs())  # what the cost-weighted L0 penalty weighs by
    fit = {"mape": setup["initial_fit_mape"]}

    # -- gate training
    tr = recipe.train
    p = recipe.penalties
    cfg = TrainConfig(
        steps=tr.steps,
        lr_weights=tr.lr_weights,
        lr_gates=tr.lr_gates,
        weight_decay=tr.weight_decay,
        lambda_lr=tr.lambda_lr,
        lambda_max=tr.lambda_max,
        target_ramp_steps=tr.target_ramp_steps,
        probe_every=tr.probe_every,
        alternating=tr.alternating,
        amp=tr.amp,
        grad_clip=tr.grad_clip,
        checkpoint_every=tr.checkpoint_every,
        max_bad_steps=tr.max_bad_steps,
        seed=recipe.seed,
        progress=recipe.progress,
        kd=kd_config(recipe, gates=True),
        penalties=PenaltyWeights(
            l0=p.l0, floor=p.floor, floor_frac=p.floor_frac, bimodal=p.bimodal, cost_weighted=p.cost_weighted
        ),
    )
    kd_teacher, materialize = teacher, None
    fsdp = env.enabled and recipe.distributed.strategy == "fsdp"
    if fsdp:
        # FSDP2: the student's and the distillation teacher's layers are sharded over the
        # ranks; an unsharded copy of the gated student (in host memory) is what probes,
        # the search and the export see, loaded with the whole weights when needed.
        if recipe.train.amp == "fp16":
            raise ValueError("distributed.strategy fsdp does not support train.amp fp16; use bf16")
        template = copy.deepcopy(student).cpu()
        kd_teacher = copy.deepcopy(teacher)
        fully_shard_layers(kd_teacher, adapter.shard_units(kd_teacher), env)
        fully_shard_layers(student, adapter.shard_units(student), env)
        if device.type != "cpu":
            teacher.cpu()  # the plain teacher waits in host memory until the fine-tune

        def materialize() -> nn.Module:
            sd = full_state_dict(student)  # collective: every rank gets the whole tensors
            template.load_state_dict({k: v.cpu() for k, v in sd.items()}, strict=True)
            return template

    probe = make_latency_probe(student, meter, device if fsdp else None)
    trainer = LagrangeTrainer(
        student,
        kd_teacher,
        proxy,
        target_ms,
        cfg,
        probe=probe,
        calibration=calib,
        env=env,
        materialize=materialize,
    )
    train_loader = ShardedBatches(job.train_loader, env) if env.enabled else job.train_loader
    seed_everything(recipe.seed)  # the gate phase starts from a state set by the seed alone
    if resume and has_checkpoint(paths.checkpoints):
        ck_t, ck, ck_path = load_checkpoint(paths.checkpoints)
        trainer.load_state(ck_t, ck)
        log(f"resuming gate training after step {trainer.step_idx} from {ck_path}")
    mlog: MetricsLog | _NoLog = (
        MetricsLog(
            os.path.join(paths.partial, "metrics.jsonl"),
            trainer.history,
            os.path.join(paths.partial, "tensorboard"),
        )
        if env.is_main
        else _NoLog()
    )

    def write_checkpoint(t: LagrangeTrainer) -> str:
        if not env.is_main and not t.sharded:  # every rank holds the same state: rank 0 writes it
            return ""
        tensors, js = t.state()  # sharded: a collective gather of the whole tensors
        return save_checkpoint(paths.checkpoints, t.step_idx, tensors, js) if env.is_main else ""

    try:
        with _SignalFlag() as flag:
            try:
                history = trainer.fit(
                    train_loader,
                    on_step=lambda rec: mlog.write("gates", rec),
                    checkpoint=write_checkpoint,
                    should_stop=lambda: flag.signum is not None,
                )
            except StopRequested as e:
                assert flag.signum is not None
                raise RunInterrupted(flag.signum, e.step, paths.out) from None
    finally:
        mlog.flush()
    if not history or "real_ms" not in history[-1]:
        history[-1].update(trainer.probe_now())

    # -- rounding chosen by measured latency, then export
    if materialize is not None:  # from here on: plain models (the slim model must fit one device)
        student = materialize().to(device)
        del kd_teacher
        teacher.to(device)
    student.eval()
    # a fraction of keep-all: each export is timed right after keep-all and held to the ratio of
    # that measurement, so load that comes and goes on the machine moves both sides alike
    by_ratio = recipe.target.latency_ms is None
    reference, ratio = (teacher, recipe.target.ratio) if by_ratio else (None, None)
    search = on_main(
        env,
        lambda: grid_search_latency(
            student,
            target_ms,
            meter,
            recipe.search.multiples,
            recipe.search.modes,
            fill_probes=recipe.search.fill_probes,
            reference=reference,
            ratio=ratio,
        ),
    )
    # the target the chosen export was held to: the ratio of the keep-all timed next to it
    base_now = search.best["reference_ms"] if by_ratio else None
    search_target_ms = search.best["limit_ms"] if by_ratio else target_ms
    log(
        f"search: {len(search.trials)} exports measured; chose multiple={search.best['multiple']} "
        f"mode={search.best['mode']} ({search.best['median_ms']:.2f} ms, target {search_target_ms:.2f} ms"
        + (f" = {ratio:g} x keep-all {base_now:.2f} ms timed next to it)" if by_ratio else ")")
    )
    policy = search.policy
    if recipe.export.uniform:
        policy = adapter.uniform_policy(student, policy)
    slim = export(student, policy).to(device)

    # -- fine-tune the slim model against the teacher
    ft = recipe.finetune
    fcfg = FinetuneConfig(
        steps=ft.steps,
        lr=ft.lr,
        warmup_steps=ft.warmup_steps,
        eval_every=ft.eval_every,
        bn_recalib_batches=ft.bn_recalib_batches,
        max_bad_steps=recipe.train.max_bad_steps,
        progress=recipe.progress,
    )
    try:
        slim, ft_hist = finetune_student(
            slim,
            teacher,
            adapter,
            train_loader,
            fcfg,
            kd_config(recipe),
            evaluate=lambda m: job.evaluate(teacher, m, "val")[job.score_key],
            env=env,
        )
    except NonFiniteError as e:  # the gate-training checkpoint stands: fine-tuning can be redone
        raise NonFiniteError(
            f"{e}; the gate-training checkpoint is kept: hawada optimize --resume {out_dir}"
        ) from e

    # -- honest report: both latencies measured in this run, interleaved (rank 0 measures,
    # evaluates and writes; every rank returns the report)
    def finish() -> dict:
        t_base, t_slim = measure_pooled([teacher, slim], meter)
        metrics = job.evaluate(teacher, slim, "test")
        report = {
            "name": recipe.name,
            "family": adapter.family,
            "device": dev,
            "latency": {
                "base": t_base.to_dict(),
                "slim": t_slim.to_dict(),
                "speedup": t_base.median_ms / t_slim.median_ms,
                "target_ms": search_target_ms,  # what the chosen export was held to
                "train_target_ms": target_ms,  # what gate training aimed its proxy at
                "setup_base_ms": setup["base_ms"],
                "search_base_ms": base_now,
                "min_allowed_ms": min_ms,
            },
            "params": {
                "base": param_count(teacher),
                "slim": param_count(slim),
                "ratio": param_count(slim) / param_count(teacher),
            },
            "agreement": metrics,
            "layout": {"base": adapter.layout(teacher), "slim": adapter.layout(slim)},
            "search": {"chosen": search.best, "met_target": search.met_target, "trials": search.trials},
            "proxy": {
                "mode": proxy.mode,
                "coef": proxy.coef.tolist(),
                "calibration": proxy.calibration,
                "initial_fit_mape": fit["mape"],
            },
            "train": {
                "steps": cfg.steps,
                "seconds": getattr(trainer, "seconds", None),
                "skipped_steps": trainer.bad_total,  # non-finite loss or gradient: no update
                "finetune_skipped_steps": sum(1 for r in ft_hist if r.get("skipped")),
            },
            "distributed": {**env.to_dict(), "replica_checks": trainer.replica_checks},
            "job": job.info,
            "versions": environment_info(),
            "recipe": recipe_dict,
            "wall_seconds": time.perf_counter() - t_start,
        }
        tmp = paths.partial
        for rec in ft_hist:
            mlog.write("finetune", rec)
        mlog.close()
        for name in ("slim", "report.png", "report.json"):  # leftovers of an earlier, interrupted finish
            p = os.path.join(tmp, name)
            if os.path.isdir(p):
                shutil.rmtree(p)
            elif os.path.exists(p):
                os.remove(p)
        job.save(slim, os.path.join(tmp, "slim"))
        if recipe.output.plot:
            from hawada.report import plot_run

            plot_run(report, history, os.path.join(tmp, "report.png"))
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
        # complete: the resumable state goes, the folder takes its final name
        if not recipe.output.keep_state:
            shutil.rmtree(paths.state)
        if os.path.isdir(os.path.join(tmp, "tensorboard")) and not os.listdir(
            os.path.join(tmp, "tensorboard")
        ):
            os.rmdir(os.path.join(tmp, "tensorboard"))
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        report["output_dir"] = out_dir
        return report

    report = on_main(env, finish)
    if not env.is_main:
        mlog.close()
    return report

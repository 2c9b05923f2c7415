"""The run folder: ``<output.dir>.partial`` while a run is unfinished, renamed when complete.

See README "Interrupted runs" and docs/DESIGN.md "Run folder": everything a run writes goes to
``<output.dir>.partial/`` (with ``state/``: the recipe, the setup measurements, checkpoints), and
only a complete run's folder takes the name ``output.dir``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

from hawada.config import Recipe, recipe_from_dict
from hawada.core.checkpoint import atomic_write_bytes
from hawada.errors import InputError, PathNotFoundError

PARTIAL = ".partial"  # the run folder while a run is unfinished: <output.dir>.partial


class OutputError(InputError):
    """An output folder that would be overwritten without being asked."""


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
        raise PathNotFoundError(f"no unfinished run at {out} (looked for {paths.partial})")
    rpath = os.path.join(paths.state, "recipe.json")
    try:
        with open(rpath) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise PathNotFoundError(f"{paths.partial} has no state/recipe.json: not a resumable run") from None
    except (OSError, ValueError) as e:
        raise InputError(f"run recipe {rpath} is corrupted ({type(e).__name__})") from None
    recipe = recipe_from_dict(data)
    recipe.output.dir = out  # the run folder may have been moved
    return recipe


def check_output_dir(recipe: Recipe) -> str:
    """``output.dir``, refused when it is a file or a non-empty folder not to be overwritten."""
    out = recipe.output.dir
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"output.dir {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not recipe.output.overwrite:
        raise OutputError(
            f"output.dir {out} exists and is not empty (set output.overwrite=true to replace it)"
        )
    return out


def prepare_folder(recipe: Recipe, paths: RunPaths, resume: bool) -> None:
    """Check the output folder and create ``<out>.partial/state`` with the recipe (a new run), or
    check that the unfinished run to resume is there."""
    check_output_dir(recipe)
    if resume:
        if not os.path.isdir(paths.state):
            raise PathNotFoundError(f"no unfinished run at {paths.out} (looked for {paths.state})")
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


def clear_outputs(paths: RunPaths, names: tuple[str, ...]) -> None:
    """Remove leftovers of an earlier, interrupted finish from the unfinished run folder."""
    for name in names:
        p = os.path.join(paths.partial, name)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def publish(paths: RunPaths, keep_state: bool) -> str:
    """The run is complete: drop the resumable state (unless kept) and rename the folder to
    ``output.dir`` (replacing what ``output.overwrite`` allowed); returns it."""
    if not keep_state:
        shutil.rmtree(paths.state)
    tb = os.path.join(paths.partial, "tensorboard")
    if os.path.isdir(tb) and not os.listdir(tb):
        os.rmdir(tb)
    if os.path.isdir(paths.out):
        shutil.rmtree(paths.out)
    os.replace(paths.partial, paths.out)
    return paths.out


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


class NoLog:
    """The metrics log of ranks other than 0 (rank 0 alone writes files)."""

    def write(self, phase: str, rec: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def open_metrics(paths: RunPaths, history: list[dict], is_main: bool) -> MetricsLog | NoLog:
    """Rank 0's metrics log in the run folder (seeded with ``history``); a no-op log elsewhere."""
    if not is_main:
        return NoLog()
    return MetricsLog(
        os.path.join(paths.partial, "metrics.jsonl"), history, os.path.join(paths.partial, "tensorboard")
    )

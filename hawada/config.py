"""Recipes: YAML validated against a schema of nested dataclasses.

Every error is a :class:`RecipeError` with one line that names the field: an unknown key
names the nearest valid one, a wrong type or range names the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe (or a --set override) that does not fit the schema."""


def _f(
    default: Any = dataclasses.MISSING,
    *,
    factory: Any = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    help: str = "",
) -> Any:
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    family: str = _f("resnet", help="adapter family: resnet, hf_encoder, ...")
    arch: str = _f("resnet18", help="architecture name within the family")
    path: str | None = _f(None, help="weights file or model folder; null: build/train as the recipe says")
    num_classes: int = _f(10, lo=1)
    attn_implementation: str | None = _f(None)
    dropout: float | None = _f(
        None,
        lo=0.0,
        hi=0.9,
        help="text encoders: dropout of the student while it trains; null: the model's own",
    )


@dataclass
class DataSection:
    kind: Literal["digits", "imagefolder", "stdlib_docstrings", "stdlib_source"] = _f("digits")
    path: str | None = _f(None, help="dataset folder (imagefolder)")
    image_size: int = _f(32, lo=8)
    batch_size: int = _f(64, lo=1)
    seq_len: int = _f(128, lo=8)
    val_fraction: float = _f(0.2, lo=0.0, hi=0.9)
    num_workers: int = _f(0, lo=0)
    max_chars: int | None = _f(None, lo=1000)


@dataclass
class TeacherSection:
    epochs: int = _f(8, lo=0)
    lr: float = _f(2e-3, lo=0.0, lo_open=True)


@dataclass
class GatesSection:
    mode: Literal["hard_concrete", "sigmoid", "ste"] = _f("hard_concrete")
    init_logit: float = _f(3.0)
    tau: float = _f(2.0 / 3.0, lo=0.0, lo_open=True)
    tau_final: float | None = _f(None, lo=0.0, lo_open=True)
    group_size: dict[str, int] = _f(factory=dict)
    min_keep: dict[str, int] = _f(factory=dict)
    kinds: list[str] | None = _f(None)


@dataclass
class PenaltySection:
    l0: float = _f(0.0, lo=0.0)
    floor: float = _f(1.0, lo=0.0)
    floor_frac: float = _f(0.05, lo=0.0, hi=1.0)
    bimodal: float = _f(0.0, lo=0.0)
    cost_weighted: bool = _f(True)


@dataclass
class KDSection:
    temperature: float = _f(2.0, lo=0.0, lo_open=True)
    alpha_kl: float = _f(1.0, lo=0.0)
    alpha_mse: float = _f(0.0, lo=0.0)
    alpha_cos: float = _f(1.0, lo=0.0)
    alpha_emb_mse: float = _f(1.0, lo=0.0)
    alpha_hidden: float = _f(
        0.0, lo=0.0, help="per-layer hidden-state MSE relative to the teacher's scale (hf_encoder)"
    )
    alpha_hidden_gates: float | None = _f(
        None,
        lo=0.0,
        help="alpha_hidden during gate training; null: alpha_hidden (a large one holds gates open)",
    )


@dataclass
class TrainSection:
    steps: int = _f(200, lo=1)
    lr_weights: float = _f(1e-4, lo=0.0)
    lr_gates: float = _f(0.05, lo=0.0, lo_open=True)
    weight_decay: float = _f(0.0, lo=0.0)
    lambda_lr: float = _f(0.5, lo=0.0, lo_open=True)
    lambda_max: float = _f(100.0, lo=0.0, lo_open=True)
    target_ramp_steps: int = _f(0, lo=0)
    probe_every: int = _f(50, lo=0)
    alternating: bool = _f(False)
    amp: Literal["off", "bf16", "fp16"] = _f("off")
    grad_clip: float = _f(1.0, lo=0.0)
    checkpoint_every: int = _f(
        100, lo=0, help="write a resumable checkpoint every N gate steps; 0: only at a stop"
    )
    max_bad_steps: int = _f(
        5, lo=1, help="stop (with a checkpoint) after this many non-finite steps in a row"
    )


@dataclass
class TargetSection:
    ratio: float | None = _f(0.5, lo=0.0, hi=1.0, lo_open=True, help="fraction of the keep-all latency")
    latency_ms: float | None = _f(None, lo=0.0, lo_open=True, help="absolute target; overrides ratio")
    batch_size: int = _f(64, lo=1)
    phase: Literal["prefill", "decode", "mix"] = _f(
        "prefill", help="language models: time the prompt's prefill, one decode step, or both"
    )
    context_len: int = _f(256, lo=1, help="language models: prompt length / KV-cache length of a decode step")
    decode_tokens: int = _f(16, lo=1, help="language models, phase mix: decode steps timed after the prefill")


@dataclass
class ProxySection:
    mode: Literal["lut", "analytic"] = _f("lut")
    calib_points: int = _f(6, lo=2)
    lut_repeats: int = _f(5, lo=1, help="timed runs per lookup-table op (at least)")
    lut_budget_s: float = _f(0.3, lo=0.0, lo_open=True, help="time budget per lookup-table op")


@dataclass
class SearchSection:
    multiples: list[int] = _f(factory=lambda: [1, 4, 8, 16])
    modes: list[str] = _f(factory=lambda: ["floor", "nearest", "ceil"])
    fill_probes: int = _f(
        0,
        lo=0,
        help="measured exports after the grid: reopen closed gates while within target, or close "
        "open ones until within it; 0: off",
    )


@dataclass
class FinetuneSection:
    steps: int = _f(100, lo=0)
    lr: float = _f(1e-4, lo=0.0, lo_open=True)
    warmup_steps: int = _f(10, lo=0)
    eval_every: int = _f(50, lo=1)
    bn_recalib_batches: int = _f(10, lo=0)


@dataclass
class MeasureSection:
    warmup: int = _f(3, lo=0)
    min_repeats: int = _f(10, lo=1)
    max_repeats: int = _f(200, lo=1)
    budget_s: float = _f(3.0, lo=0.0, lo_open=True)
    timer: Literal["python", "auto", "cpp"] = _f(
        "python",
        help="python: the eager model as users run it; cpp/auto: the compiled extension's loop over a "
        "traced program (less Python overhead, so not what an eager user sees)",
    )
    cuda_graph: bool = _f(False, help="CUDA: time CUDA-graph replays")


@dataclass
class ExportSection:
    uniform: bool = _f(False)


@dataclass
class OutputSection:
    dir: str = _f("runs/run")
    overwrite: bool = _f(False)
    plot: bool = _f(True)
    keep_state: bool = _f(
        False, help="keep state/ (recipe, measurements, last gate checkpoint) in the output"
    )


@dataclass
class DistributedSection:
    strategy: Literal["ddp", "fsdp"] = _f(
        "ddp",
        help="under torchrun: ddp replicates student and teacher on every rank; fsdp shards their "
        "layers across the ranks (FSDP2 fully_shard) during gate training",
    )


@dataclass
class Recipe:
    name: str = _f("run")
    seed: int = _f(0, lo=0)
    device: str = _f("cpu")
    threads: int = _f(0, lo=0, help="torch CPU threads; 0 keeps torch's default")
    progress: bool = _f(True)
    deterministic: bool = _f(False, help="torch.use_deterministic_algorithms(True) for the run")
    model: ModelSection = _f(factory=ModelSection)
    data: DataSection = _f(factory=DataSection)
    teacher: TeacherSection = _f(factory=TeacherSection)
    gates: GatesSection = _f(factory=GatesSection)
    penalties: PenaltySection = _f(factory=PenaltySection)
    kd: KDSection = _f(factory=KDSection)
    train: TrainSection = _f(factory=TrainSection)
    target: TargetSection = _f(factory=TargetSection)
    proxy: ProxySection = _f(factory=ProxySection)
    search: SearchSection = _f(factory=SearchSection)
    finetune: FinetuneSection = _f(factory=FinetuneSection)
    measure: MeasureSection = _f(factory=MeasureSection)
    export: ExportSection = _f(factory=ExportSection)
    output: OutputSection = _f(factory=OutputSection)
    distributed: DistributedSection = _f(factory=DistributedSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    bad = RecipeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except RecipeError:
                continue
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = typing.get_args(tp)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise bad


def _check_range(value: Any, meta: Any, where: str) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RecipeError(f"{where}: must be {'>' if lo_open else '>='} {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise RecipeError(f"{where}: must be <= {hi:g}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = (
                f"; did you mean '{(where + '.') if where else ''}{near[0]}'?"
                if near
                else f"; valid keys: {', '.join(fields)}"
            )
            raise RecipeError(f"unknown key '{path}'{hint}")
        v = _coerce(value, hints[key], path)
        _check_range(v, fields[key].metadata, path)
        if isinstance(v, list):
            for item in v:
                _check_range(item, fields[key].metadata, path)
        kwargs[key] = v
    return cls(**kwargs)


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a parsed recipe; raises :class:`RecipeError`."""
    r = _build(Recipe, data, "")
    if r.target.ratio is None and r.target.latency_ms is None:
        raise RecipeError("target: give ratio or latency_ms")
    if r.data.kind == "imagefolder" and not r.data.path:
        raise RecipeError("data.path: the imagefolder data kind needs a dataset folder")
    for m in r.search.modes:
        if m not in ("floor", "nearest", "ceil"):
            raise RecipeError(f"search.modes: {m!r} is not one of floor, nearest, ceil")
    for m in r.search.multiples:
        if m < 1:
            raise RecipeError(f"search.multiples: {m} must be >= 1")
    return r


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'a.b=c'`` -> (['a', 'b'], parsed c); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=50")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise RecipeError(f"--set {item!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` items to the parsed recipe mapping (in place); returns it."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {item!r}: '{p}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_recipe(path: str, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a YAML recipe."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise RecipeError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path is a directory, not a file: {path}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(f"recipe {path} is not valid YAML{at}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path}: expected a mapping of sections, got {type(data).__name__}")
    return recipe_from_dict(apply_overrides(data, overrides or []))

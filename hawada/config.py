"""Recipes: YAML validated against one schema, made of the engine's own settings dataclasses.

The sections ``gates``, ``penalties``, ``kd``, ``train``, ``proxy``, ``search``, ``finetune`` and
``measure`` ARE the engine's dataclasses (``GateConfig``, ``PenaltyWeights``, ``KDConfig``,
``TrainConfig``, ``ProxyConfig``, ``SearchConfig``, ``FinetuneConfig``, ``MeasureConfig``): their
defaults and ranges (:func:`hawada.core.schema.knob`) are the recipe's. The other sections describe
the run itself (model, data, target, output, ...). Every error is a :class:`RecipeError` with one
line that names the field: an unknown key names the nearest valid one, a wrong type or range names
the field and what it accepts.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from hawada.core.distill import KDConfig
from hawada.core.finetune import FinetuneConfig
from hawada.core.gates import GateConfig, PenaltyWeights
from hawada.core.profiler import MeasureConfig
from hawada.core.proxy_cost import ProxyConfig
from hawada.core.schema import FROM_RUN, check_range, knob
from hawada.core.search_export import SearchConfig
from hawada.core.train import TrainConfig
from hawada.errors import InputError


class RecipeError(InputError):
    """A recipe (or a --set override) that does not fit the schema."""


@dataclass
class ModelSection:
    family: str = knob("resnet", help="adapter family: resnet, hf_encoder, ...")
    arch: str = knob("resnet18", help="architecture name within the family")
    path: str | None = knob(None, help="weights file or model folder; null: build/train as the recipe says")
    num_classes: int = knob(10, lo=1)
    attn_implementation: str | None = None
    dropout: float | None = knob(
        None,
        lo=0.0,
        hi=0.9,
        help="text encoders: dropout of the student while it trains; null: the model's own",
    )


@dataclass
class DataSection:
    kind: Literal["digits", "imagefolder", "stdlib_docstrings", "stdlib_source", "text"] = "digits"
    path: str | None = knob(
        None,
        help="imagefolder: the dataset folder; text: a .txt/.jsonl/.csv/.parquet file, a folder of "
        "them, or a datasets save_to_disk folder",
    )
    field: str = knob(
        "text",
        help="text: the JSON key / column holding each document's text (.jsonl, .csv, .parquet, datasets)",
    )
    image_size: int | None = knob(
        None,
        lo=8,
        help="image side in pixels; unset: the image size a transformers model's config.json declares, "
        "else 32",
    )
    batch_size: int = knob(64, lo=1)
    seq_len: int = knob(128, lo=8)
    val_fraction: float = knob(0.2, lo=0.0, hi=0.9)
    num_workers: int = knob(0, lo=0)
    max_chars: int | None = knob(None, lo=1000)


@dataclass
class TeacherSection:
    epochs: int = knob(8, lo=0)
    lr: float = knob(2e-3, lo=0.0, lo_open=True)


@dataclass
class TargetSection:
    ratio: float | None = knob(0.5, lo=0.0, hi=1.0, lo_open=True, help="fraction of the keep-all latency")
    latency_ms: float | None = knob(None, lo=0.0, lo_open=True, help="absolute target; overrides ratio")
    batch_size: int = knob(64, lo=1)
    phase: Literal["prefill", "decode", "mix"] = knob(
        "prefill", help="language models: time the prompt's prefill, one decode step, or both"
    )
    context_len: int = knob(
        256, lo=1, help="language models: prompt length / KV-cache length of a decode step"
    )
    decode_tokens: int = knob(
        16, lo=1, help="language models, phase mix: decode steps timed after the prefill"
    )


@dataclass
class ExportSection:
    uniform: bool = False


@dataclass
class OutputSection:
    dir: str = "runs/run"
    overwrite: bool = False
    plot: bool = True
    keep_state: bool = knob(
        False, help="keep state/ (recipe, measurements, last gate checkpoint) in the output"
    )


@dataclass
class DistributedSection:
    strategy: Literal["ddp", "fsdp"] = knob(
        "ddp",
        help="under torchrun: ddp replicates student and teacher on every rank; fsdp shards their "
        "layers across the ranks (FSDP2 fully_shard) during gate training",
    )
    timeout_s: float = knob(
        1800.0,
        lo=60.0,
        hi=86400.0,
        help="seconds a collective waits for the other ranks before the run fails. They wait while "
        "rank 0 alone times the setup, a probe or the rounding search: tens of minutes on a large "
        "model, which NCCL's default (10 min) would cut short; 30 min covers that and still ends "
        "a run whose rank was lost within half an hour",
    )


@dataclass
class Recipe:
    name: str = "run"
    seed: int = knob(0, lo=0)
    device: str = "cpu"
    threads: int = knob(0, lo=0, help="torch CPU threads; 0 keeps torch's default")
    progress: bool = True
    deterministic: bool = knob(False, help="torch.use_deterministic_algorithms(True) for the run")
    model: ModelSection = knob(factory=ModelSection)
    data: DataSection = knob(factory=DataSection)
    teacher: TeacherSection = knob(factory=TeacherSection)
    gates: GateConfig = knob(factory=GateConfig)
    penalties: PenaltyWeights = knob(factory=PenaltyWeights)
    kd: KDConfig = knob(factory=KDConfig)
    train: TrainConfig = knob(factory=TrainConfig)
    target: TargetSection = knob(factory=TargetSection)
    proxy: ProxyConfig = knob(factory=ProxyConfig)
    search: SearchConfig = knob(factory=SearchConfig)
    finetune: FinetuneConfig = knob(factory=FinetuneConfig)
    measure: MeasureConfig = knob(factory=MeasureConfig)
    export: ExportSection = knob(factory=ExportSection)
    output: OutputSection = knob(factory=OutputSection)
    distributed: DistributedSection = knob(factory=DistributedSection)

    def to_dict(self) -> dict:
        """The recipe as its sections' keys (fields the run fills from elsewhere are left out)."""
        return _to_dict(self)

    def resolved(self, section: str) -> Any:
        """A section's settings with the fields the run fills from other keys filled in.

        E.g. ``resolved("train")`` is the ``TrainConfig`` of gate training, with the recipe's
        ``seed``, ``progress``, ``penalties`` and ``kd``.
        """
        obj = getattr(self, section)
        fill = {
            f.name: self._lookup(f.metadata[FROM_RUN])
            for f in dataclasses.fields(obj)
            if f.metadata.get(FROM_RUN)
        }
        return dataclasses.replace(obj, **fill) if fill else obj

    def _lookup(self, dotted: str) -> Any:
        node: Any = self
        for part in dotted.split("."):
            node = getattr(node, part)
        return node


def _recipe_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a section that are recipe keys (not those the run fills from other keys)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get(FROM_RUN)}


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {name: _to_dict(getattr(obj, name)) for name in _recipe_fields(type(obj))}
    if isinstance(obj, list | tuple):
        return [_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------------- validation
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
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
    if origin is tuple:  # YAML lists; tuple[X, ...] any length, tuple[X, Y] exactly that many
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise RecipeError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
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


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of settings, got {data!r}")
    fields = _recipe_fields(cls)
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
        try:
            check_range(v, fields[key].metadata, path)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        kwargs[key] = v
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except ValueError as e:  # the settings' own checks (check_fields) name the field already
        raise RecipeError(str(e).splitlines()[0]) from None


def recipe_from_dict(data: Any) -> Recipe:
    """Validate a parsed recipe; raises :class:`RecipeError`."""
    r = _build(Recipe, data, "")
    if r.target.ratio is None and r.target.latency_ms is None:
        raise RecipeError("target: give ratio or latency_ms")
    if r.data.kind == "imagefolder" and not r.data.path:
        raise RecipeError("data.path: the imagefolder data kind needs a dataset folder")
    if r.data.kind == "text" and not r.data.path:
        raise RecipeError("data.path: the text data kind needs a file or folder of text")
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

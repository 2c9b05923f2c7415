"""The runtime contract: how a plain model is deployed, saved, loaded and called in one runtime
(docs/DESIGN.md, "Runtimes").

A *plain* model is an exported, ungated model (``hawada.export`` / ``export_keepall`` /
``load_slim``). What a runtime deploys is the model's task output as its family's adapter gives it
(``adapter.output``: pooled ``[B, D]`` embeddings of a bare encoder, ``[B, C]`` logits otherwise),
so every runtime is compared on the same tensor. Inputs are the family's inputs: a dict of
tensors (text: ``input_ids``/``attention_mask`` ``[B, L]``) or one tensor (images ``[B, C, H, W]``,
named ``input``).

Each runtime writes its own artifact into a folder (a slim folder may hold several) and records
it in ``runtimes.json``: ``{name: {"artifact", "inputs", "versions"}}``.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import adapter_for
from hawada.errors import InputError, PathNotFoundError

MANIFEST = "runtimes.json"
TENSOR_INPUT = "input"  # the name of a family's single-tensor input (images)

Inputs = dict[str, torch.Tensor] | torch.Tensor


class UnknownRuntimeError(InputError):
    """A runtime name HawAda does not know."""


class RuntimeMissingError(InputError):
    """A runtime whose library is not installed; the message names the extra to install."""


def named_inputs(inputs: Inputs) -> tuple[list[str], list[torch.Tensor]]:
    """``(names, tensors)`` of a family's inputs, in the order the deployed model takes them."""
    if isinstance(inputs, torch.Tensor):
        return [TENSOR_INPUT], [inputs]
    if isinstance(inputs, dict) and inputs and all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return list(inputs), list(inputs.values())
    raise InputError(f"inputs must be a tensor or a dict of tensors, got {type(inputs).__name__}")


def conform(inputs: Inputs, names: list[str]) -> Inputs:
    """``inputs`` in the form an artifact with input ``names`` takes: a dict's entries in that
    order, or a single tensor for the one-tensor input (a dict with one tensor, e.g. a ViT's
    ``{"pixel_values": x}``, gives ``x``). InputError when they do not fit."""
    if names == [TENSOR_INPUT]:
        if isinstance(inputs, dict) and len(inputs) == 1:
            return next(iter(inputs.values()))
        if isinstance(inputs, torch.Tensor):
            return inputs
    elif isinstance(inputs, dict) and set(names) <= set(inputs):
        return {n: inputs[n] for n in names}
    got = list(inputs) if isinstance(inputs, dict) else [TENSOR_INPUT]
    raise InputError(f"the artifact takes inputs {names}, got {got}")


def as_inputs(names: list[str], tensors: list[torch.Tensor]) -> Inputs:
    """The inverse of :func:`named_inputs`."""
    if names == [TENSOR_INPUT]:
        return tensors[0]
    return dict(zip(names, tensors))


class OutputOf(nn.Module):
    """The deployable function of a plain model: positional input tensors -> its adapter's output.

    Exporters (ONNX, ``torch.export``) take positional tensors and one tensor out; the adapter's
    ``output`` holds the family's pooling, so the artifact computes exactly what HawAda scores.
    """

    def __init__(self, model: nn.Module, names: list[str], adapter: Any = None) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)
        # A quantized model is no longer recognised by its family's adapter: pass the fp32 one's.
        self._adapter = adapter or adapter_for(model)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self._adapter.output(self.model, as_inputs(self.names, list(tensors)))


@dataclass
class Deployed:
    """A model loaded in a runtime. ``bind(inputs)`` converts the inputs once into the runtime's
    own form and returns a call that runs the model on them (what a timer repeats); calling the
    object runs it and gives the output as a float32 torch tensor (``[B, D]`` or ``[B, C]``)."""

    runtime: str
    names: list[str]
    bind: Callable[[Inputs], Callable[[], Any]]
    to_torch: Callable[[Any], torch.Tensor]

    def __call__(self, inputs: Inputs) -> torch.Tensor:
        return self.to_torch(self.bind(inputs)())


class Runtime:
    """One deployment runtime. Subclasses set ``name``, ``artifact`` (the file it writes) and
    ``modules`` (the libraries it needs, with the pip extra that installs them)."""

    name: str = ""
    artifact: str = ""
    modules: tuple[str, ...] = ()
    extra: str | None = None

    def require(self) -> None:
        """Raise :class:`RuntimeMissingError` (one line naming the extra) if a library is missing."""
        for mod in self.modules:
            try:
                importlib.import_module(mod)
            except ImportError as e:
                hint = f"pip install 'hawada[{self.extra}]'" if self.extra else f"pip install {mod}"
                raise RuntimeMissingError(
                    f"runtime {self.name!r} needs {mod}, which is not installed ({hint})"
                ) from e

    def versions(self) -> dict[str, str]:
        """The versions of torch and of the runtime's libraries (reported beside every timing)."""
        out = {"torch": torch.__version__}
        for mod in self.modules:
            try:
                out[mod] = importlib.import_module(mod).__version__
            except (ImportError, AttributeError):
                out[mod] = "missing"
        return out

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        """The deployed form of a plain ``model`` in memory (``example_inputs`` traces it)."""
        raise NotImplementedError

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        """Write this runtime's artifact(s) for ``model`` into ``folder``."""
        raise NotImplementedError

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        """Load the artifact from ``folder`` through the runtime's own API."""
        raise NotImplementedError


_RUNTIMES: dict[str, Runtime] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    _RUNTIMES[cls.name] = cls()
    return cls


def runtime_names() -> list[str]:
    return list(_RUNTIMES)


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``; an unknown name is one :class:`UnknownRuntimeError` line."""
    if name not in _RUNTIMES:
        raise UnknownRuntimeError(f"unknown runtime {name!r} (known: {', '.join(_RUNTIMES)})")
    return _RUNTIMES[name]


def build(model: nn.Module, example_inputs: Inputs, runtime: str) -> Deployed:
    """Deploy a plain ``model`` in ``runtime`` without writing files."""
    rt = get_runtime(runtime)
    rt.require()
    return rt.build(model.eval(), example_inputs)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_artifact(model: nn.Module, example_inputs: Inputs, folder: str, runtime: str) -> str:
    """Write ``runtime``'s artifact of a plain ``model`` into ``folder`` (created if missing) and
    record it in the folder's ``runtimes.json``; returns the artifact's path."""
    rt = get_runtime(runtime)
    rt.require()
    names, _ = named_inputs(example_inputs)
    os.makedirs(folder, exist_ok=True)
    rt.write(model.eval(), example_inputs, folder)
    manifest = read_manifest(folder)
    manifest[runtime] = {"artifact": rt.artifact, "inputs": names, "versions": rt.versions()}
    tmp = os.path.join(folder, MANIFEST + ".partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(folder, MANIFEST))
    return os.path.join(folder, rt.artifact)


def load_artifact(folder: str, runtime: str | None = None, threads: int | None = None) -> Deployed:
    """Load the artifact of ``runtime`` (default: the folder's only one) from ``folder`` through the
    runtime's own API; ``threads`` sets the runtime's intra-op threads (ORT; torch's are global).

    A missing folder, a folder without ``runtimes.json`` or without that runtime's artifact is one
    :class:`~hawada.errors.PathNotFoundError` line.
    """
    if not os.path.isdir(folder):
        raise PathNotFoundError(f"artifact folder not found: {folder}")
    manifest = read_manifest(folder)
    if not manifest:
        raise PathNotFoundError(f"{folder} holds no runtime artifact ({MANIFEST} is missing)")
    if runtime is None:
        if len(manifest) != 1:
            raise InputError(f"{folder} holds artifacts of {', '.join(manifest)}: name the runtime")
        runtime = next(iter(manifest))
    rt = get_runtime(runtime)
    if runtime not in manifest:
        raise PathNotFoundError(f"{folder} holds no {runtime} artifact (it holds: {', '.join(manifest)})")
    if not os.path.isfile(os.path.join(folder, rt.artifact)):
        raise PathNotFoundError(f"{folder}/{rt.artifact} is missing: the {runtime} artifact is incomplete")
    rt.require()
    return rt.read(folder, manifest[runtime]["inputs"], threads)

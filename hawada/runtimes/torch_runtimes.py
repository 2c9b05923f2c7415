"""The torch runtimes: ``eager`` (fp32 as exported), ``int8_dynamic`` (dynamically quantized
``nn.Linear`` layers) and ``compile`` (``torch.compile`` with inductor). No artifact is a
pickle: int8 and compile are recipes (JSON) applied to the slim folder beside them at load."""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import adapter_for
from hawada.errors import InputError
from hawada.runtimes.base import Deployed, Inputs, OutputOf, Runtime, named_inputs, register_runtime
from hawada.slim_io import load_slim, save_slim


def _torch_deployed(name: str, fn: nn.Module | Callable, names: list[str]) -> Deployed:
    def bind(inputs: Inputs) -> Callable[[], Any]:
        _, tensors = named_inputs(inputs)

        def call() -> torch.Tensor:
            with torch.inference_mode():
                return fn(*tensors)

        return call

    return Deployed(name, names, bind, lambda out: out.float())


@register_runtime
class Eager(Runtime):
    """fp32 eager PyTorch: the plain model as exported; its artifact is the saved slim folder."""

    name = "eager"
    artifact = "layout.json"  # save_slim writes it beside the weights

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        names, _ = named_inputs(example_inputs)
        return _torch_deployed(self.name, OutputOf(model, names).eval(), names)

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        save_slim(model, folder)

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        if threads:
            torch.set_num_threads(threads)
        return _torch_deployed(self.name, OutputOf(load_slim(folder), names).eval(), names)


# Dynamic int8: torch.ao's quantize_dynamic against torchao 0.18 (quantize_ with
# Int8DynamicActivationInt8WeightConfig), measured on the real MiniLM-L6 at batch 32 x 128, 2
# threads, 2-core x86 CPU, alternating rounds (indicative only: the machine was shared and heavily
# loaded while it ran). Against fp32 eager's median time: torch.ao per channel 0.69x (1.46x
# faster), torch.ao per tensor 0.74x, torchao 19x (slower: without torch.compile its int8 matmul
# runs as unfused eager ops on CPU). Token-state cosine to fp32: torch.ao per tensor 0.89, per
# channel 0.94, torchao 0.996. So this runtime uses torch.ao per channel, although
# torch.ao.quantization is deprecated upstream in favour of torchao; torchao's eager CPU path is
# worth measuring again with each release (and under `compile`).
INT8_SCHEME = "torch.ao dynamic, qint8 weights per output channel, non-empty nn.Linear only"


def quantized_layers(q: nn.Module) -> list[str]:
    """Names of the dynamically quantized Linear layers of ``q``."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return [n for n, m in q.named_modules() if isinstance(m, DynamicLinear)]


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every non-empty ``nn.Linear`` dynamically quantized to int8:
    weights per output channel (per-tensor scales lost MiniLM's token states: cosine 0.89 against
    0.94 per channel), activations per call. Other layers, convolutions included, stay fp32; so do
    the empty Linears a slim model keeps for a removed FFN or attention (no range to quantize)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    model = copy.deepcopy(model).eval()
    spec = {
        name: per_channel_dynamic_qconfig
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.numel() > 0
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
        return torch.ao.quantization.quantize_dynamic(model, spec)


@register_runtime
class Int8Dynamic(Runtime):
    """torch dynamic int8 quantization of the Linear layers. Dynamic quantization derives the int8
    weights and their per-channel scales from the fp32 weights alone, deterministically, so the
    artifact is the recipe, not a pickle of packed weights (torch can only unpickle those with
    arbitrary code): ``model.int8.json`` names the scheme and the quantized layers, and loading
    quantizes the slim folder beside it the same way and checks it got those layers."""

    name = "int8_dynamic"
    artifact = "model.int8.json"

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        names, _ = named_inputs(example_inputs)
        q = quantize_int8(model)
        return _torch_deployed(self.name, OutputOf(q, names, adapter_for(model)).eval(), names)

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        save_slim(model, folder)  # the fp32 weights the int8 ones are derived from
        with open(os.path.join(folder, self.artifact), "w") as f:
            json.dump({"scheme": INT8_SCHEME, "layers": quantized_layers(quantize_int8(model))}, f, indent=1)

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        if threads:
            torch.set_num_threads(threads)
        fp32 = load_slim(folder)
        q = quantize_int8(fp32)
        with open(os.path.join(folder, self.artifact)) as f:
            spec = json.load(f)
        if spec.get("scheme") != INT8_SCHEME or spec.get("layers") != quantized_layers(q):
            raise InputError(f"{folder}: {self.artifact} describes another int8 model than the one beside it")
        return _torch_deployed(self.name, OutputOf(q, names, adapter_for(fp32)).eval(), names)


@register_runtime
class Compile(Runtime):
    """``torch.compile`` with inductor (CPU or GPU). ``torch.compile`` compiles in the process that
    runs the model, and torch's serialized programs (``torch.export.save``) are read back with
    pickle, which HawAda does not load. So the artifact is the slim folder plus
    ``model.compile.json`` (backend and dynamic dimensions); loading compiles the folder's model,
    on its first call (a warmup call, never a timed one)."""

    name = "compile"
    artifact = "model.compile.json"

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        names, _ = named_inputs(example_inputs)
        return _torch_deployed(
            self.name, torch.compile(OutputOf(model, names).eval(), backend="inductor", dynamic=True), names
        )

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        save_slim(model, folder)
        with open(os.path.join(folder, self.artifact), "w") as f:
            json.dump({"backend": "inductor", "dynamic": True}, f, indent=1)

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        if threads:
            torch.set_num_threads(threads)
        with open(os.path.join(folder, self.artifact)) as f:
            spec = json.load(f)
        model = load_slim(folder)
        module = torch.compile(
            OutputOf(model, names, adapter_for(model)).eval(),
            backend=spec["backend"],
            dynamic=spec["dynamic"],
        )
        return _torch_deployed(self.name, module, names)

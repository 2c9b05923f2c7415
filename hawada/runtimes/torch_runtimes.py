"""The torch runtimes: ``eager`` (fp32 as exported), ``int8_dynamic`` (dynamically quantized
``nn.Linear`` layers) and ``compile`` (``torch.export`` program run through ``torch.compile``
with inductor)."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import adapter_for
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
    """torch dynamic int8 quantization of the Linear layers. The artifact is the quantized
    ``state_dict`` (packed int8 weights and their scales); loading rebuilds the fp32 architecture
    from the slim folder beside it, quantizes it the same way and loads the state into it."""

    name = "int8_dynamic"
    artifact = "model.int8.pt"

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        names, _ = named_inputs(example_inputs)
        q = quantize_int8(model)
        return _torch_deployed(self.name, OutputOf(q, names, adapter_for(model)).eval(), names)

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        save_slim(model, folder)  # the architecture the quantized state is loaded into
        torch.save(quantize_int8(model).state_dict(), os.path.join(folder, self.artifact))

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        if threads:
            torch.set_num_threads(threads)
        fp32 = load_slim(folder)
        q = quantize_int8(fp32)
        # Packed quantized weights are not plain tensors: the state must be unpickled in full.
        state = torch.load(os.path.join(folder, self.artifact), weights_only=False)
        q.load_state_dict(state)
        return _torch_deployed(self.name, OutputOf(q, names, adapter_for(fp32)).eval(), names)


def _dynamic_shapes(tensors: list[torch.Tensor]) -> dict:
    """The batch is dynamic for every input, the length too for ``[B, L]`` token inputs (keyed by
    :class:`OutputOf`'s varargs parameter)."""
    auto = torch.export.Dim.AUTO
    return {"tensors": tuple({0: auto, 1: auto} if t.dim() == 2 else {0: auto} for t in tensors)}


@register_runtime
class Compile(Runtime):
    """``torch.compile`` with inductor (CPU or GPU). The artifact is the ``torch.export`` program
    (``model.pt2``); loading runs ``torch.export.load(...).module()`` through ``torch.compile``, which
    compiles on the first call (a warmup call, never a timed one)."""

    name = "compile"
    artifact = "model.pt2"

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        names, _ = named_inputs(example_inputs)
        return _torch_deployed(
            self.name, torch.compile(OutputOf(model, names).eval(), backend="inductor"), names
        )

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        names, tensors = named_inputs(example_inputs)
        with torch.no_grad():
            ep = torch.export.export(
                OutputOf(model, names).eval(), tuple(tensors), dynamic_shapes=_dynamic_shapes(tensors)
            )
        torch.export.save(ep, os.path.join(folder, self.artifact))

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        if threads:
            torch.set_num_threads(threads)
        module = torch.export.load(os.path.join(folder, self.artifact)).module()
        return _torch_deployed(self.name, torch.compile(module, backend="inductor"), names)

"""The ONNX Runtime runtimes: ``onnxruntime`` (fp32 ``model.onnx``) and ``onnxruntime_int8``
(``model.int8.onnx``: ORT's dynamic quantization of that graph). Both need the ``[onnx]`` extra
(onnx, onnxruntime), imported only when used.

Time ORT in its own process (``hawada.runtimes.timing``): its intra-op thread pool slows a torch
model timed in the same process.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hawada.runtimes.base import Deployed, Inputs, OutputOf, Runtime, named_inputs, register_runtime

OPSET = 17
FP32_FILE = "model.onnx"


def export_onnx(model: nn.Module, example_inputs: Inputs, f: str | io.BytesIO) -> None:
    """Write the ONNX graph of a plain model's output (:class:`OutputOf`) to ``f``.

    The batch axis is dynamic for every input, and the length axis for ``[B, L]`` token inputs.
    This is torch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs the
    extra package onnxscript, and the traced graph of these models is static but for those axes.
    """
    names, tensors = named_inputs(example_inputs)
    axes = {n: ({0: "batch", 1: "length"} if t.dim() == 2 else {0: "batch"}) for n, t in zip(names, tensors)}
    axes["output"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter's deprecation notice and tracer warnings about Python control flow
        # on shapes (the attention-mask checks of transformers), which the dynamic axes cover.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            OutputOf(model, names).eval(),
            tuple(tensors),
            f,
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
        )


def session(model: str | bytes, threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU provider; ``threads`` fixes the intra-op pool
    (inter-op 1: these graphs are one chain of ops)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model, sess_options=so, providers=["CPUExecutionProvider"])


def _ort_deployed(name: str, sess: Any) -> Deployed:
    names = [i.name for i in sess.get_inputs()]

    def bind(inputs: Inputs) -> Callable[[], Any]:
        got, tensors = named_inputs(inputs)
        if got != names:
            raise ValueError(f"the ONNX graph takes inputs {names}, got {got}")
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
        return lambda: sess.run(None, feed)[0]

    return Deployed(name, names, bind, lambda out: torch.from_numpy(out).float())


def quantize_onnx(src: str, dst: str) -> None:
    """ORT dynamic quantization: int8 weights of MatMul/Gemm, uint8 activations quantized per
    call (ORT's default for dynamic quantization). Products with an empty weight (a slim model's
    removed FFN or attention) stay fp32: an empty tensor has no range, and quantizing it gave
    wrong outputs."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(src, load_external_data=False).graph
    empty = {t.name for t in graph.initializer if 0 in t.dims}
    skip = [n.name for n in graph.node if empty.intersection(n.input)]
    quantize_dynamic(src, dst, weight_type=QuantType.QInt8, nodes_to_exclude=skip)


@register_runtime
class OnnxRuntime(Runtime):
    """ONNX Runtime, fp32, CPU execution provider."""

    name = "onnxruntime"
    artifact = FP32_FILE
    modules = ("onnx", "onnxruntime")
    extra = "onnx"

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        buf = io.BytesIO()
        export_onnx(model, example_inputs, buf)
        return _ort_deployed(self.name, session(buf.getvalue()))

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        export_onnx(model, example_inputs, os.path.join(folder, self.artifact))

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        return _ort_deployed(self.name, session(os.path.join(folder, self.artifact), threads))


@register_runtime
class OnnxRuntimeInt8(Runtime):
    """ONNX Runtime with the graph dynamically quantized to int8 (``model.int8.onnx``; the fp32
    ``model.onnx`` it was made from is written beside it)."""

    name = "onnxruntime_int8"
    artifact = "model.int8.onnx"
    modules = ("onnx", "onnxruntime")
    extra = "onnx"

    def build(self, model: nn.Module, example_inputs: Inputs) -> Deployed:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.write(model, example_inputs, tmp)
            with open(os.path.join(tmp, self.artifact), "rb") as f:
                data = f.read()
        return _ort_deployed(self.name, session(data))

    def write(self, model: nn.Module, example_inputs: Inputs, folder: str) -> None:
        src = os.path.join(folder, FP32_FILE)
        export_onnx(model, example_inputs, src)
        quantize_onnx(src, os.path.join(folder, self.artifact))

    def read(self, folder: str, names: list[str], threads: int | None) -> Deployed:
        return _ort_deployed(self.name, session(os.path.join(folder, self.artifact), threads))

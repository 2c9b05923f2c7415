"""torchvision ResNet family (BasicBlock and Bottleneck: ResNet-18/34/50/101/152).

Segments:
* ``layer{i}.{j}.inner`` (BasicBlock) or ``.inner1``/``.inner2`` (Bottleneck), kind ``block``:
  a block's internal channels, masked after the BN that follows each inner conv.
* ``layer{i}``, kind ``stage``: the width of stage i's residual stream. ONE keep set is shared
  by every tensor added into the stream: the block outputs (masked after their last BN),
  the downsample branch, and the stem when it feeds the stream directly (ResNet-18/34).
* ``stem``, kind ``stage``: the stem's width when layer1 starts with a downsample (ResNet-50+).

A block whose inner channels are all closed computes a constant; it is exported as
:class:`ConstantBranchBlock`: its shortcut plus that constant.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from hawada.adapters.base import Adapter, register_adapter
from hawada.core.export import clone_without_gates, slice_batchnorm, slice_conv2d, slice_linear, store_of
from hawada.core.gates import GateConfig, GateStore
from hawada.core.hooks import MaskOutput, add_hook, gates_of, install_store
from hawada.core.proxy_cost import CostTerm
from hawada.errors import InputError


class ConstantBranchBlock(nn.Module):
    """A residual block whose branch is constant: ``relu(shortcut(x) + bias)``.

    ``bias``: ``[C]`` per-channel constant; input ``[B, C_in, H, W]`` -> ``[B, C, H', W']``.
    """

    def __init__(self, channels: int, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.downsample = downsample
        self.bias = nn.Parameter(torch.zeros(channels))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(identity + self.bias.view(1, -1, 1, 1))


def _blocks(model: ResNet):
    for i in range(1, 5):
        for j, blk in enumerate(getattr(model, f"layer{i}")):
            yield i, j, blk


def _inner_names(i: int, j: int, blk: nn.Module) -> list[str]:
    if isinstance(blk, Bottleneck):
        return [f"layer{i}.{j}.inner1", f"layer{i}.{j}.inner2"]
    return [f"layer{i}.{j}.inner"]


def _stem_stream(model: ResNet) -> str:
    return "stem" if model.layer1[0].downsample is not None else "layer1"


def _bn_of_zero(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``[C]``: eval-mode BN applied to an all-zero input."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return bn.bias - bn.running_mean * scale


@register_adapter
class ResNetAdapter(Adapter):
    family = "resnet"
    kd_kind = "logits"
    default_group_size = {"block": 1, "stage": 1}

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    # ------------------------------------------------------------------ attach
    def attach(self, model: nn.Module, config: GateConfig) -> nn.Module:
        for _, _, blk in _blocks(model):
            if not isinstance(blk, BasicBlock | Bottleneck) and not isinstance(blk, ConstantBranchBlock):
                raise InputError(f"unsupported ResNet block type {type(blk).__name__}")
            if isinstance(blk, ConstantBranchBlock):
                raise InputError(
                    "this ResNet is already pruned (has constant blocks); attach to the original"
                )
        store = GateStore(config)

        def gs(kind):
            return config.group_for(kind, self.default_group_size[kind])

        gate_stage, gate_block = config.wants("stage"), config.wants("block")
        stem = _stem_stream(model)
        if gate_stage:
            if stem == "stem":
                store.register("stem", "stage", model.conv1.out_channels, gs("stage"), 0)
            for i in range(1, 5):
                layer = getattr(model, f"layer{i}")
                width = (
                    layer[0].bn3.num_features
                    if isinstance(layer[0], Bottleneck)
                    else layer[0].bn2.num_features
                )
                store.register(f"layer{i}", "stage", width, gs("stage"), i)
        if gate_block:
            for i, j, blk in _blocks(model):
                bns = [blk.bn1, blk.bn2] if isinstance(blk, Bottleneck) else [blk.bn1]
                for name, bn in zip(_inner_names(i, j, blk), bns):
                    store.register(name, "block", bn.num_features, gs("block"), i)
        if len(store) == 0:
            raise InputError("GateConfig.kinds selects no kind the ResNet adapter gates ('block', 'stage')")
        install_store(model, store, self)
        if gate_stage:
            add_hook(model.bn1, MaskOutput(store, stem))
            for i, _, blk in _blocks(model):
                last_bn = blk.bn3 if isinstance(blk, Bottleneck) else blk.bn2
                add_hook(last_bn, MaskOutput(store, f"layer{i}"))
                if blk.downsample is not None:
                    add_hook(blk.downsample[-1], MaskOutput(store, f"layer{i}"))
        if gate_block:
            for i, j, blk in _blocks(model):
                bns = [blk.bn1, blk.bn2] if isinstance(blk, Bottleneck) else [blk.bn1]
                for name, bn in zip(_inner_names(i, j, blk), bns):
                    add_hook(bn, MaskOutput(store, name))
        return model

    # ------------------------------------------------------------------ data
    def model_inputs(self, batch: Any) -> Any:
        return batch[0] if isinstance(batch, list | tuple) else batch

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        return model(self.model_inputs(batch))

    def example_inputs(self, model: nn.Module, batch_size: int = 2) -> Any:
        g = torch.Generator().manual_seed(0)
        p = next(model.parameters())
        return torch.randn(batch_size, 3, 64, 64, generator=g).to(p.device, p.dtype)

    def check_output(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs)

    # ------------------------------------------------------------------ proxy
    def cost_terms(self, model: nn.Module, example_inputs: Any) -> list[CostTerm]:
        store: GateStore | None = gates_of(model)
        names = {s.name for s in store.segments} if store is not None else set()
        shapes: dict[nn.Module, tuple] = {}
        handles = [
            m.register_forward_hook(
                lambda mod, a, out: shapes.__setitem__(mod, (tuple(a[0].shape), tuple(out.shape)))
            )
            for m in model.modules()
            if isinstance(m, nn.Conv2d | nn.Linear | nn.BatchNorm2d)
        ]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example_inputs)
        finally:
            model.train(was)
            for h in handles:
                h.remove()

        def dim(seg: str, width: int):
            return seg if seg in names else width

        terms: list[CostTerm] = []

        def conv(name: str, m: nn.Conv2d, cin, cout) -> None:
            (b, _, h, w), (_, _, ho, wo) = shapes[m]
            k = m.kernel_size[0] * m.kernel_size[1]
            flops = 2.0 * b * ho * wo * m.in_channels * m.out_channels * k
            byts = 4.0 * (b * m.in_channels * h * w + b * m.out_channels * ho * wo + m.weight.numel())
            spec = {
                "batch": b,
                "h": h,
                "w": w,
                "kernel": m.kernel_size[0],
                "stride": m.stride[0],
                "padding": m.padding[0],
            }
            terms.append(CostTerm(name, "conv2d", (cin, cout), flops, byts, spec))

        def norm(name: str, m: nn.BatchNorm2d, c) -> None:
            _, (b, ch, h, w) = shapes[m]
            terms.append(
                CostTerm(
                    name,
                    "norm_act",
                    (c,),
                    4.0 * b * ch * h * w,
                    8.0 * b * ch * h * w,
                    {"batch": b, "h": h, "w": w},
                )
            )

        stem = _stem_stream(model)
        conv("conv1", model.conv1, model.conv1.in_channels, dim(stem, model.conv1.out_channels))
        norm("bn1", model.bn1, dim(stem, model.bn1.num_features))
        prev = stem
        for i, j, blk in _blocks(model):
            stream = f"layer{i}"
            inner = _inner_names(i, j, blk)
            p = f"layer{i}.{j}"
            cin = dim(prev, blk.conv1.in_channels)
            out_c = dim(stream, (blk.bn3 if isinstance(blk, Bottleneck) else blk.bn2).num_features)
            if isinstance(blk, Bottleneck):
                m1, m2 = dim(inner[0], blk.conv1.out_channels), dim(inner[1], blk.conv2.out_channels)
                conv(f"{p}.conv1", blk.conv1, cin, m1)
                norm(f"{p}.bn1", blk.bn1, m1)
                conv(f"{p}.conv2", blk.conv2, m1, m2)
                norm(f"{p}.bn2", blk.bn2, m2)
                conv(f"{p}.conv3", blk.conv3, m2, out_c)
                norm(f"{p}.bn3", blk.bn3, out_c)
            else:
                m1 = dim(inner[0], blk.conv1.out_channels)
                conv(f"{p}.conv1", blk.conv1, cin, m1)
                norm(f"{p}.bn1", blk.bn1, m1)
                conv(f"{p}.conv2", blk.conv2, m1, out_c)
                norm(f"{p}.bn2", blk.bn2, out_c)
            if blk.downsample is not None:
                conv(f"{p}.downsample", blk.downsample[0], cin, out_c)
                norm(f"{p}.downsample_bn", blk.downsample[1], out_c)
            prev = stream
        (b, fin), _ = shapes[model.fc]
        terms.append(
            CostTerm(
                "fc",
                "linear",
                (dim("layer4", fin), model.fc.out_features),
                2.0 * b * fin * model.fc.out_features,
                4.0 * (b * fin + model.fc.weight.numel()),
                {"tokens": b},
            )
        )
        return terms

    # ------------------------------------------------------------------ export
    def export_keepall(self, gated: nn.Module) -> nn.Module:
        return clone_without_gates(gated)

    @torch.no_grad()
    def export_pruned(self, gated: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        store: GateStore = store_of(gated)
        constants: dict[str, torch.Tensor] = {}
        for i, j, blk in _blocks(gated):
            names = _inner_names(i, j, blk)
            if not any(n in keep and keep[n].numel() == 0 for n in names):
                continue
            if isinstance(blk, Bottleneck):
                if names[1] in keep and keep[names[1]].numel() == 0:
                    c = _bn_of_zero(blk.bn3)
                else:  # inner1 closed: conv2 sees zeros; conv3 (1x1) sees a constant
                    x2 = torch.relu(_bn_of_zero(blk.bn2))
                    if names[1] in keep:
                        m2 = torch.zeros_like(x2)
                        m2[keep[names[1]].to(x2.device)] = 1
                        x2 = x2 * m2
                    c = _bn_of_zero(blk.bn3) + (blk.conv3.weight[:, :, 0, 0] @ x2) * (
                        blk.bn3.weight / torch.sqrt(blk.bn3.running_var + blk.bn3.eps)
                    )
            else:
                c = _bn_of_zero(blk.bn2)
            constants[f"layer{i}.{j}"] = c.detach().clone()
        slim = clone_without_gates(gated)
        _rebuild(slim, keep, constants)
        slim.train(gated.training)
        del store
        return slim

    # ------------------------------------------------------------------ files
    def load_model(self, arch: str, num_classes: int, path: str | None = None) -> nn.Module:
        """A torchvision ResNet by name; weights from ``path`` (state dict or slim folder) if given."""
        return _load_resnet_model(arch, num_classes, path)

    def save(self, model: nn.Module, path: str) -> None:
        save_resnet(model, path)

    def load(self, path: str) -> nn.Module:
        return load_resnet(path)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """Every residual block of every stage (FSDP's unit of all-gather)."""
        return [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, name)]

    def layout(self, model: nn.Module) -> dict:
        layers = []
        for i in range(1, 5):
            blocks = []
            for blk in getattr(model, f"layer{i}"):
                if isinstance(blk, ConstantBranchBlock):
                    blocks.append({"constant": True, "out": blk.bias.numel()})
                elif isinstance(blk, Bottleneck):
                    blocks.append(
                        {
                            "inner": [blk.conv1.out_channels, blk.conv2.out_channels],
                            "out": blk.conv3.out_channels,
                        }
                    )
                else:
                    blocks.append({"inner": [blk.conv1.out_channels], "out": blk.conv2.out_channels})
            layers.append(blocks)
        first = model.layer1[0]
        kind = (
            "bottleneck"
            if isinstance(first, Bottleneck)
            or (isinstance(first, ConstantBranchBlock) and first.downsample is not None)
            else "basic"
        )
        return {
            "family": self.family,
            "block": kind,
            "stem": model.conv1.out_channels,
            "num_classes": model.fc.out_features,
            "layers": layers,
        }


def _keep(keep: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    return keep.get(name)


def _rebuild(model: ResNet, keep: dict[str, torch.Tensor], constants: dict[str, torch.Tensor]) -> None:
    """In place: slice a plain ResNet to ``keep`` (missing names keep everything)."""
    stem = _stem_stream(model)
    k_stem = _keep(keep, stem)
    model.conv1 = slice_conv2d(model.conv1, out_idx=k_stem)
    model.bn1 = slice_batchnorm(model.bn1, k_stem)
    k_prev = k_stem
    for i in range(1, 5):
        layer = getattr(model, f"layer{i}")
        k_out = _keep(keep, f"layer{i}")
        for j in range(len(layer)):
            blk = layer[j]
            names = _inner_names(i, j, blk)
            ds = blk.downsample
            if ds is not None:
                ds[0] = slice_conv2d(ds[0], out_idx=k_out, in_idx=k_prev)
                ds[1] = slice_batchnorm(ds[1], k_out)
            key = f"layer{i}.{j}"
            if key in constants:
                c = constants[key]
                c = c if k_out is None else c[k_out.to(c.device)]
                new = ConstantBranchBlock(c.numel(), ds).to(c.device)
                new.bias.data.copy_(c)
                new.train(blk.training)
                layer[j] = new
            else:
                k1 = _keep(keep, names[0])
                blk.conv1 = slice_conv2d(blk.conv1, out_idx=k1, in_idx=k_prev)
                blk.bn1 = slice_batchnorm(blk.bn1, k1)
                if isinstance(blk, Bottleneck):
                    k2 = _keep(keep, names[1])
                    blk.conv2 = slice_conv2d(blk.conv2, out_idx=k2, in_idx=k1)
                    blk.bn2 = slice_batchnorm(blk.bn2, k2)
                    blk.conv3 = slice_conv2d(blk.conv3, out_idx=k_out, in_idx=k2)
                    blk.bn3 = slice_batchnorm(blk.bn3, k_out)
                else:
                    blk.conv2 = slice_conv2d(blk.conv2, out_idx=k_out, in_idx=k1)
                    blk.bn2 = slice_batchnorm(blk.bn2, k_out)
            k_prev = k_out
    model.fc = slice_linear(model.fc, in_idx=k_prev)


def build_from_layout(layout: dict, device: str | torch.device | None = None) -> ResNet:
    """A ResNet with exactly the widths of ``layout``. Its weights are uninitialised (built on the
    meta device, then allocated on ``device``): load a state dict into it."""
    block = Bottleneck if layout["block"] == "bottleneck" else BasicBlock
    with torch.device("meta"):
        model = ResNet(block, [len(b) for b in layout["layers"]], num_classes=layout["num_classes"])
        keep: dict[str, torch.Tensor] = {}
        constants: dict[str, torch.Tensor] = {}
        keep[_stem_stream(model)] = torch.arange(int(layout["stem"]), device="cpu")
        for i, blocks in enumerate(layout["layers"], start=1):
            for j, b in enumerate(blocks):
                keep[f"layer{i}"] = torch.arange(int(b["out"]), device="cpu")
                if b.get("constant"):
                    constants[f"layer{i}.{j}"] = torch.zeros(model_width(model, i))
                else:
                    names = _inner_names(i, j, getattr(model, f"layer{i}")[j])
                    for name, w in zip(names, b["inner"], strict=True):
                        keep[name] = torch.arange(int(w), device="cpu")
        _rebuild(model, keep, constants)
    return model.to_empty(device=device or "cpu")


def model_width(model: ResNet, i: int) -> int:
    blk = getattr(model, f"layer{i}")[0]
    return (blk.bn3 if isinstance(blk, Bottleneck) else blk.bn2).num_features


def save_resnet(model: ResNet, path: str) -> None:
    """Write ``layout.json`` + ``model.safetensors`` into the folder ``path``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    layout = ResNetAdapter().layout(model)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "layout.json"), "w") as f:
        json.dump(layout, f, indent=1)


def load_resnet(path: str) -> ResNet:
    """Inverse of :func:`save_resnet`."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "layout.json")) as f:
        layout = json.load(f)
    model = build_from_layout(layout)
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.eval()


def _load_resnet_model(arch: str, num_classes: int, path: str | None) -> ResNet:
    import torchvision

    if path is not None and os.path.isdir(path):
        return load_resnet(path)
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except ValueError:
        raise InputError(f"model.arch: unknown torchvision model {arch!r}") from None
    if not isinstance(model, ResNet):
        raise InputError(f"model.arch: {arch!r} is not a ResNet")
    if path is not None:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        fc = state.get("fc.weight") if isinstance(state, dict) else None
        if fc is not None and fc.shape[0] != num_classes:
            raise InputError(
                f"model.path: the weights' classifier has {fc.shape[0]} outputs, the data {num_classes} classes"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # missing/unexpected keys or other shapes: not this architecture
            first = str(e).strip().splitlines()[0]
            raise InputError(f"model.path: the weights do not fit {arch}: {first}") from None
    return model

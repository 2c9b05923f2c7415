"""Small real models shared by the tests."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from hawada.core.profiler import LatencyResult, summarize_samples


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters (eval mode matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model


def tiny_resnet(num_classes: int = 10) -> ResNet:
    """A one-block-per-stage ResNet (BasicBlock), random BN statistics, eval mode."""
    torch.manual_seed(0)
    return randomize_bn(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)).eval()


def tiny_digits_recipe(**sections) -> dict:
    """A recipe mapping for a seconds-long run on the digits set; ``sections`` update its sections
    (a mapping updates that section's keys, anything else replaces the key)."""
    recipe = {
        "name": "tiny",
        "progress": False,
        "model": {"family": "resnet", "arch": "resnet18", "num_classes": 10},
        "data": {"kind": "digits", "image_size": 16, "batch_size": 32},
        "teacher": {"epochs": 0},
        "measure": {"min_repeats": 2, "max_repeats": 5, "budget_s": 0.05},
        "output": {"plot": False},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def project_per_segment(logits: torch.Tensor, store, margin: float) -> torch.Tensor:
    """The constraint projection written as a plain loop: per segment, clamp to the store's
    ``logit_clip``, then raise the ``min_keep`` largest logits (lower index first on ties) to ``margin``."""
    out = logits.clone().clamp(-store.config.logit_clip, store.config.logit_clip)
    for s in store.segments:
        seg = out[s.start : s.stop]
        order = sorted(range(s.count), key=lambda i: (-float(seg[i]), i))
        for i in order[: s.min_keep]:
            seg[i] = max(float(seg[i]), margin)
    return out


def write_image_folder(root, splits: dict[str, dict[str, int]], size: int = 20, seed: int = 0, order=None):
    """Write ``root/<split>/<class>/img<i>.png`` RGB images (``splits[split][class]`` of each),
    each class around its own colour so the classes can be told apart; returns ``root``.
    ``order``: a permutation of the files to write them in (the file system's order varies)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for split, classes in splits.items():
        for c, (name, count) in enumerate(sorted(classes.items())):
            base = rng.integers(0, 256, 3)
            for i in range(count):
                noise = rng.integers(-40, 41, (size, size, 3))
                pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
                files.append((root / split / name / f"img{i}.png", pixels, c))
    for k in order(len(files)) if order else range(len(files)):
        path, pixels, _ = files[k]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return root


def save_tiny_vit(path, num_labels: int = 3, image_size: int = 16, classifier: bool = True, seed: int = 0):
    """``save_pretrained`` of a random 2-layer ViT (hidden 32, 4 heads, FFN 64, patch 4) into
    ``path``: a ViTForImageClassification with ``num_labels`` labels, or a bare ViTModel."""
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(seed)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=image_size,
        patch_size=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=num_labels,
    )
    model = (ViTForImageClassification if classifier else ViTModel)(cfg).eval()
    model.save_pretrained(str(path))
    return model


def latency_result(ms: float | list[float]) -> LatencyResult:
    """A :class:`LatencyResult` of known samples (one sample when ``ms`` is a number)."""
    samples = [float(x) for x in ms] if isinstance(ms, list) else [float(ms)]
    return LatencyResult(
        **summarize_samples(samples),
        n=len(samples),
        device="cpu",
        dtype="float32",
        shapes=[],
        warmup=0,
        timer="test",
        threads=1,
        samples_ms=samples,
    )


@torch.no_grad()
def rerandomized(model: nn.Module, seed: int = 1) -> nn.Module:
    """A copy of ``model`` whose weight matrices and kernels are redrawn at random, each with its
    own standard deviation: the same architecture at the same scale, with nothing learned."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    for p in out.parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=g) * float(p.std()))
    return out

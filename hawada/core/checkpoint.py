"""Crash-safe checkpoints: tensors in safetensors, everything else as JSON in its header.

A checkpoint folder holds ``step-XXXXXXXX.safetensors`` files and a ``latest.json`` pointer
(file name + byte size). Writing one: the file is written under a temporary name in the same
folder, fsynced and renamed; then the pointer is replaced the same way; only then is the
checkpoint before the previous one deleted. A crash at any moment leaves the previous good
checkpoint and a pointer to it. Nothing is pickled: loading reads safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
from collections.abc import Callable
from typing import Any

import torch

from hawada.errors import InputError

POINTER = "latest.json"
META_KEY = "hawada"


class CheckpointError(InputError):
    """A checkpoint that is missing, truncated or corrupted (one line, names the file)."""


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors refuses tensors sharing memory (tied weights): keep one, record aliases."""
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, t in tensors.items():
        key = (t.device.type, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out, aliases


def save_checkpoint(folder: str, step: int, tensors: dict[str, torch.Tensor], state: dict) -> str:
    """Write one checkpoint atomically into ``folder``; returns its path.

    ``tensors``: name -> tensor (any shapes); ``state``: JSON-serialisable metadata.
    """
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    name = f"step-{step:08d}.safetensors"
    path = os.path.join(folder, name)
    flat, aliases = _dedupe(tensors)
    meta = {META_KEY: json.dumps({"state": state, "aliases": aliases})}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(flat, tmp, metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)
    ptr_path = os.path.join(folder, POINTER)
    previous = None
    if os.path.isfile(ptr_path):
        try:
            with open(ptr_path) as f:
                previous = json.load(f).get("file")
        except (OSError, ValueError):
            previous = None
    pointer = {"file": name, "bytes": os.path.getsize(path), "step": step, "previous": previous}
    atomic_write_bytes(ptr_path, json.dumps(pointer).encode())
    # keep the new checkpoint and the one before it; older ones (and stale temporaries) go
    for fn in os.listdir(folder):
        if fn.startswith("step-") and fn not in (name, previous):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, fn))
    return path


def has_checkpoint(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, POINTER))


def load_checkpoint(folder: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """Read the checkpoint ``latest.json`` points to: (tensors, state, path).

    Raises :class:`CheckpointError` (one line naming the file) when the pointer or the file is
    missing, truncated or not a readable safetensors file. Reads only; never writes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ptr_path = os.path.join(folder, POINTER)
    try:
        with open(ptr_path) as f:
            ptr = json.load(f)
        name, size = str(ptr["file"]), int(ptr["bytes"])
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint in {folder} ({POINTER} is missing)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint pointer {ptr_path} is corrupted ({type(e).__name__})") from None
    path = os.path.join(folder, os.path.basename(name))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} is missing")
    actual = os.path.getsize(path)
    if actual != size:
        raise CheckpointError(
            f"checkpoint file {path} is truncated or corrupted ({actual} bytes, expected {size})"
        )
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        blob = json.loads(meta[META_KEY])
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {path} is corrupted ({why})") from None
    for alias, src in blob.get("aliases", {}).items():
        tensors[alias] = tensors[src]
    return tensors, blob["state"], path


# ---------------------------------------------------------------------- pieces of state
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """RNG states of torch (CPU, CUDA), python and numpy as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    ver, internal, gauss = random.getstate()
    js: dict[str, Any] = {"python": [ver, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
        js["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    except ImportError:
        pass
    return tensors, js


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    ver, internal, gauss = js["python"]
    random.setstate((ver, tuple(internal), gauss))
    if "numpy" in js and "rng.numpy" in tensors:
        import numpy as np

        kind, pos, has_gauss, cached = js["numpy"]
        np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def optimizer_state(
    opt: torch.optim.Optimizer, prefix: str, sd: dict | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state_dict (or ``sd``, one like it) split into tensors
    (``prefix.state.i.key``) and JSON."""
    sd = opt.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.state.{idx}.{k}"] = v
            else:
                other.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "other": other}


def load_optimizer_state(
    opt: torch.optim.Optimizer,
    prefix: str,
    tensors: dict[str, torch.Tensor],
    js: dict,
    transform: Callable[[dict], dict] | None = None,
) -> None:
    """Restore :func:`optimizer_state`; ``transform`` maps the rebuilt state dict first
    (e.g. re-sharding whole tensors for a sharded model)."""
    state: dict[int, dict] = {}
    head = f"{prefix}.state."
    for name, t in tensors.items():
        if name.startswith(head):
            idx, key = name[len(head) :].split(".", 1)
            state.setdefault(int(idx), {})[key] = t
    for idx, st in js.get("other", {}).items():
        state.setdefault(int(idx), {}).update(st)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in js["param_groups"]]
    sd = {"state": state, "param_groups": groups}
    opt.load_state_dict(transform(sd) if transform is not None else sd)

"""Decoder LLMs with grouped-query attention: LLaMA, Mistral and Qwen2 (Hugging Face transformers).

Verified: ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` and their bare
``*Model`` classes; any model whose layers are ``model.layers[i]`` with
``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj`` is recognised too.

The gated student runs the STOCK transformers forward (RoPE, eager/sdpa attention, KV cache
and attention masks untouched); masks are applied only at two places per layer:

* ``layer{i}.heads`` (kind ``head``): ``n_rep = num_heads / num_kv_heads`` gates; gate ``j`` is
  the ``j``-th query slot of EVERY KV group. Query head ``h`` belongs to KV group
  ``h // n_rep`` and slot ``h % n_rep``. Every group therefore keeps the same slots: after
  export each kept query head still reads the KV head it read before and
  ``num_key_value_groups`` stays one integer (DESIGN invariant 4).
* ``layer{i}.kv`` (kind ``kv_group``): one gate per KV group; a closed group removes its K/V
  rows, its query heads and their ``o_proj`` columns together.

  The per-head mask ``slot[h % n_rep] * kv[h // n_rep]`` multiplies ``o_proj``'s input (a
  forward pre-hook): a head whose output is zeroed contributes nothing, and a KV head whose
  query heads are all zeroed contributes nothing, so slicing them away is exact.
* ``layer{i}.ffn`` (kind ``ffn``): SwiGLU neurons in groups. ``up_proj``'s output is gated
  (:class:`~hawada.core.hooks.GatedLinear`), which zeroes ``act(gate) * up`` exactly, so
  ``gate_proj``/``up_proj`` rows and ``down_proj`` columns share this one keep set.

A layer whose heads are all closed is exported with :class:`EmptyAttention` (``o_proj``'s bias
only, and a one-element placeholder in the KV cache so the cache length stays right); a layer
whose FFN is all closed keeps zero-width linears (a matmul over zero features is exactly 0).
Non-uniform layouts are recorded per layer in ``config.hawada_layout`` and restored on load.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings
from typing import Any

import torch
from torch import nn

from hawada.adapters.base import Adapter, register_adapter
from hawada.core.export import ExportPolicy, clone_without_gates, keep_counts, slice_linear, store_of
from hawada.core.gates import GateConfig, GateStore
from hawada.core.hooks import add_hook, gate_linear, gates_of, install_store
from hawada.core.proxy_cost import CostTerm

KNOWN_CLASSES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaModel",
    "MistralModel",
    "Qwen2Model",
)
LAYOUT_FILE = "layout.json"


class CheckpointError(FileNotFoundError):
    """A model folder that is not a loadable Hugging Face checkpoint."""


class VocabMismatchError(ValueError):
    """Teacher and student (or model and data) disagree on the vocabulary."""


# ---------------------------------------------------------------------- self-contained pieces
# EmptyAttention and apply_layout are also copied verbatim into the saved folder's
# modeling file (for ``trust_remote_code``), so they import nothing from hawada.
class EmptyAttention(nn.Module):
    """Attention with every head removed: returns ``o_proj``'s bias (or zeros).

    ``hidden_states`` ``[B, L, D]`` -> ``([B, L, D], None)``. It still appends a one-element
    ``[B, 1, L, 1]`` placeholder to the KV cache, because the cache reports its length from
    the stored keys and an empty layer would otherwise reset positions during generation.
    """

    is_empty_attention = True

    def __init__(self, hidden_size: int, layer_idx: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = hidden_size
        self.num_key_value_groups = 1
        if bias is not None:
            self.o_bias = nn.Parameter(bias.detach().clone())
        else:
            self.register_parameter("o_bias", None)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        b, n = hidden_states.shape[:2]
        past = cache if cache is not None else kwargs.get("past_key_values")
        if past is not None:
            ph = hidden_states.new_zeros(b, 1, n, 1)
            past.update(ph, ph, self.layer_idx)
        out = hidden_states.new_zeros(b, n, self.hidden_size)
        if self.o_bias is not None:
            out = out + self.o_bias
        return out, None


def apply_layout(model, layout):
    """In place: give each decoder layer of a freshly built model the widths of ``layout``.

    ``layout``: list (one per layer) of ``{"heads", "kv_heads", "intermediate"}``. The new
    modules are uninitialised shells; the caller loads the weights.
    """
    base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    cfg = base.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hidden = cfg.hidden_size
    dev = next(model.parameters()).device
    for i, (layer, lay) in enumerate(zip(base.layers, layout)):
        attn, mlp = layer.self_attn, layer.mlp
        qh, kvh, inter = int(lay["heads"]), int(lay["kv_heads"]), int(lay["intermediate"])
        if qh == 0 or kvh == 0:
            o = getattr(attn, "o_proj", None)
            has_bias = o is not None and o.bias is not None
            bias = torch.zeros(hidden, device=dev) if has_bias else None
            layer.self_attn = EmptyAttention(hidden, i, bias).to(dev)
        elif not getattr(attn, "is_empty_attention", False):

            def lin(old, fin, fout):
                return nn.Linear(fin, fout, bias=old.bias is not None, device=dev, dtype=old.weight.dtype)

            attn.q_proj = lin(attn.q_proj, hidden, qh * head_dim)
            attn.k_proj = lin(attn.k_proj, hidden, kvh * head_dim)
            attn.v_proj = lin(attn.v_proj, hidden, kvh * head_dim)
            attn.o_proj = lin(attn.o_proj, qh * head_dim, hidden)
            attn.num_key_value_groups = qh // kvh
        g, u, d = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        mlp.gate_proj = nn.Linear(hidden, inter, bias=g.bias is not None, device=dev, dtype=g.weight.dtype)
        mlp.up_proj = nn.Linear(hidden, inter, bias=u.bias is not None, device=dev, dtype=u.weight.dtype)
        mlp.down_proj = nn.Linear(inter, hidden, bias=d.bias is not None, device=dev, dtype=d.weight.dtype)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
    return model


# ---------------------------------------------------------------------- structure helpers
def decoder_base(model: nn.Module) -> nn.Module:
    """The module holding ``layers`` (``model.model`` of a ``*ForCausalLM``, else the model)."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return inner
    return model


def _has_layout(model: nn.Module) -> bool:
    base = decoder_base(model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_key_value_heads") or not hasattr(cfg, "num_attention_heads"):
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return False
        if not getattr(attn, "is_empty_attention", False) and not all(
            hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
        ):
            return False
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return False
    return True


def head_dim_of(model: nn.Module) -> int:
    cfg = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def layer_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per layer: query heads, KV heads and FFN width of a plain (or gated) model."""
    hd = head_dim_of(model)
    out = []
    for layer in decoder_base(model).layers:
        attn = layer.self_attn
        if getattr(attn, "is_empty_attention", False):
            q = kv = 0
        else:
            q, kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
        out.append({"heads": q, "kv_heads": kv, "intermediate": layer.mlp.up_proj.out_features})
    return out


class HeadMask:
    """Forward pre-hook on ``o_proj``: multiply its input ``[B, L, H * head_dim]`` by the head mask.

    Head ``h`` gets ``slot[h % n_rep] * kv[h // n_rep]`` (a missing segment counts as all ones).
    """

    _hawada_gate = True

    def __init__(
        self, store: GateStore, heads: str | None, kv: str | None, n_rep: int, n_kv: int, head_dim: int
    ) -> None:
        self.store, self.heads, self.kv = store, heads, kv
        self.n_rep, self.n_kv, self.head_dim = n_rep, n_kv, head_dim

    def head_mask(self) -> torch.Tensor:
        """``[n_kv * n_rep]`` mask over query heads (KV-group major)."""
        dev = self.store.logits.device
        slot = self.store.unit_mask(self.heads) if self.heads else torch.ones(self.n_rep, device=dev)
        kv = self.store.unit_mask(self.kv) if self.kv else torch.ones(self.n_kv, device=dev)
        return (kv.view(-1, 1) * slot.view(1, -1)).reshape(-1)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        m = self.head_mask().to(x.dtype).repeat_interleave(self.head_dim)
        return (x * m, *args[1:])


def _check_min_keep(config: GateConfig, kind: str, available: int, what: str, layer: int) -> None:
    mk = int(config.min_keep.get(kind, 0))
    if mk > available:
        raise ValueError(
            f"gates.min_keep.{kind}={mk} asks for more {what} than layer {layer} has ({available})"
        )


def _vocab_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return int(emb.num_embeddings) if emb is not None else int(model.config.vocab_size)


def check_same_vocab(teacher: nn.Module, student: nn.Module) -> None:
    """Raise :class:`VocabMismatchError` when the two models' vocabularies differ."""
    vt, vs = _vocab_size(teacher), _vocab_size(student)
    if vt != vs:
        raise VocabMismatchError(f"teacher vocabulary has {vt} tokens but the student's has {vs}")


# ---------------------------------------------------------------------- the adapter
@register_adapter
class HFDecoderAdapter(Adapter):
    family = "hf_decoder"
    kd_kind = "logits"
    default_group_size = {"head": 1, "kv_group": 1, "ffn": 64}
    # what the latency proxy describes (set by the LM job from the recipe's target section)
    phase: str = "prefill"
    context: int | None = None
    decode_steps: int = 1

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if type(model).__name__ in KNOWN_CLASSES:
            return _has_layout(model)
        try:
            from transformers import PreTrainedModel
        except ImportError:  # pragma: no cover - transformers is a dependency of this family
            return False
        return isinstance(model, PreTrainedModel) and _has_layout(model)

    # ------------------------------------------------------------------ attach
    def attach(self, model: nn.Module, config: GateConfig) -> nn.Module:
        if gates_of(model) is not None:
            raise ValueError("model already has gates attached")
        if not _has_layout(model):
            raise ValueError(f"{type(model).__name__} does not have the LLaMA layer layout")
        base = decoder_base(model)
        hd = head_dim_of(model)
        store = GateStore(config)
        plan = []
        for i, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if getattr(attn, "is_empty_attention", False):
                raise ValueError(
                    "this model is already pruned (a layer has no attention); attach to the original"
                )
            nh, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
            if nh % nkv:
                raise ValueError(f"layer {i}: {nh} query heads are not a multiple of {nkv} KV heads")
            n_rep, inter = nh // nkv, mlp.up_proj.out_features
            _check_min_keep(config, "head", n_rep, "query heads per KV group", i)
            _check_min_keep(config, "kv_group", nkv, "KV heads", i)
            gs_ffn = config.group_for("ffn", self.default_group_size["ffn"])
            _check_min_keep(config, "ffn", -(-inter // gs_ffn), "FFN groups", i)
            heads = kv = ffn = None
            if config.wants("head"):
                heads = store.register(f"layer{i}.heads", "head", n_rep, 1, i).name
            if config.wants("kv_group"):
                kv = store.register(f"layer{i}.kv", "kv_group", nkv, 1, i).name
            if config.wants("ffn"):
                ffn = store.register(f"layer{i}.ffn", "ffn", inter, gs_ffn, i).name
            plan.append((layer, heads, kv, ffn, n_rep, nkv))
        if len(store) == 0:
            raise ValueError(
                "GateConfig.kinds selects no kind the hf_decoder adapter gates ('head', 'kv_group', 'ffn')"
            )
        install_store(model, store, self)
        for layer, heads, kv, ffn, n_rep, nkv in plan:
            if heads or kv:
                add_hook(layer.self_attn.o_proj, HeadMask(store, heads, kv, n_rep, nkv, hd), pre=True)
            if ffn:
                gate_linear(layer.mlp.up_proj, store, ffn, "out")
        return model

    # ------------------------------------------------------------------ data
    def model_inputs(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        return {"input_ids": batch}

    def output(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Logits ``[B, L, V]`` (no KV cache is built)."""
        return model(**self.model_inputs(batch), use_cache=False).logits

    def kd_mask(self, batch: Any) -> torch.Tensor | None:
        return batch.get("attention_mask") if isinstance(batch, dict) else None

    def example_inputs(self, model: nn.Module, batch_size: int = 2, seq_len: int = 12) -> Any:
        """``{"input_ids" [B, L], "attention_mask" [B, L]}``; the last row is right-padded."""
        g = torch.Generator().manual_seed(0)
        dev = next(model.parameters()).device
        vocab = _vocab_size(model)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        mask = torch.ones(batch_size, seq_len, dtype=torch.long)
        if batch_size > 1:
            mask[-1, seq_len - seq_len // 3 :] = 0
        return {"input_ids": ids.to(dev), "attention_mask": mask.to(dev)}

    def check_output(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits

    # ------------------------------------------------------------------ proxy
    def cost_terms(
        self,
        model: nn.Module,
        example_inputs: Any,
        phase: str | None = None,
        context: int | None = None,
        decode_steps: int | None = None,
    ) -> list[CostTerm]:
        """Prefill and/or decode cost terms at the batch of ``example_inputs``.

        ``phase``: ``prefill`` (``example_inputs["input_ids"]`` is the prompt ``[B, L]``),
        ``decode`` (one step against a KV cache of ``context`` tokens; ``B`` from the inputs)
        or ``mix`` (the prompt's prefill, then ``decode_steps`` steps at context ``L``).
        Unset arguments come from the adapter's ``phase``/``context``/``decode_steps``
        attributes (an LM job sets them from the recipe's target section).
        """
        phase = phase or self.phase
        context = context if context is not None else self.context
        decode_steps = decode_steps or self.decode_steps
        if phase not in ("prefill", "decode", "mix"):
            raise ValueError(f"phase must be prefill, decode or mix, got {phase!r}")
        ids = example_inputs["input_ids"] if isinstance(example_inputs, dict) else example_inputs[0]
        b, seq = int(ids.shape[0]), int(ids.shape[1])
        store: GateStore | None = gates_of(model)
        names = {s.name for s in store.segments} if store is not None else set()
        cfg, hd = model.config, head_dim_of(model)
        hidden, vocab = int(cfg.hidden_size), _vocab_size(model)
        terms: list[CostTerm] = []
        phases = []
        if phase in ("prefill", "mix"):
            phases.append(("prefill", b * seq, seq, 1))
        if phase == "decode":
            phases.append(("decode", b, int(context if context is not None else seq), 1))
        if phase == "mix":
            phases.append(("decode", b, seq, int(decode_steps)))
        for ph, tokens, ctx, rep in phases:
            spec_extra = {"repeat": rep} if rep > 1 else {}
            for i, w in enumerate(layer_widths(model)):
                nh, nkv, inter = w["heads"], w["kv_heads"], w["intermediate"]
                n_rep = nh // nkv if nkv else 0
                H = f"layer{i}.heads" if f"layer{i}.heads" in names else n_rep
                K = f"layer{i}.kv" if f"layer{i}.kv" in names else nkv
                F = f"layer{i}.ffn" if f"layer{i}.ffn" in names else inter
                p = f"{ph}.layer{i}"
                lt = {"tokens": tokens, **spec_extra}

                def lin(name, dims, fin, fout, spec, _rep=rep, _tok=tokens):
                    terms.append(
                        CostTerm(
                            name,
                            spec.pop("op", "linear"),
                            dims,
                            2.0 * _tok * fin * fout * _rep,
                            4.0 * (_tok * (fin + fout) + fin * fout) * _rep,
                            spec,
                        )
                    )

                if nh > 0:  # an EmptyAttention layer costs (almost) nothing
                    lin(
                        f"{p}.q_proj",
                        (H, K),
                        hidden,
                        nh * hd,
                        {"op": "linear_heads", "fixed": hidden, "mult": hd, "side": "out", **lt},
                    )
                    lin(f"{p}.k_proj", (hidden, K), hidden, nkv * hd, {"out_mult": hd, **lt})
                    lin(f"{p}.v_proj", (hidden, K), hidden, nkv * hd, {"out_mult": hd, **lt})
                    lin(
                        f"{p}.o_proj",
                        (H, K),
                        nh * hd,
                        hidden,
                        {"op": "linear_heads", "fixed": hidden, "mult": hd, "side": "in", **lt},
                    )
                    q_len = seq if ph == "prefill" else 1
                    kv_bytes = 4.0 * 2 * b * nkv * ctx * hd
                    terms.append(
                        CostTerm(
                            f"{p}.attention",
                            "attention_gqa" if ph == "prefill" else "decode_attention",
                            (H, K),
                            4.0 * b * nh * q_len * ctx * hd * rep / (2 if ph == "prefill" else 1),
                            (kv_bytes + 8.0 * b * nh * q_len * hd) * rep,
                            {"batch": b, "seq": q_len, "ctx": ctx, "head_dim": hd, **spec_extra},
                        )
                    )
                lin(f"{p}.gate_proj", (hidden, F), hidden, inter, dict(lt))
                lin(f"{p}.up_proj", (hidden, F), hidden, inter, dict(lt))
                lin(f"{p}.down_proj", (F, hidden), inter, hidden, dict(lt))
            terms.append(
                CostTerm(
                    f"{ph}.lm_head",
                    "linear",
                    (hidden, vocab),
                    2.0 * tokens * hidden * vocab * rep,
                    4.0 * (tokens * (hidden + vocab) + hidden * vocab) * rep,
                    {"tokens": tokens, **spec_extra},
                )
            )
        return terms

    # ------------------------------------------------------------------ export
    def export_keepall(self, gated: nn.Module) -> nn.Module:
        return clone_without_gates(gated)

    @torch.no_grad()
    def export_pruned(self, gated: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        # a fully closed FFN becomes zero-width linears; torch warns that initialising them is a no-op
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return self._export_pruned(gated, keep)

    def _export_pruned(self, gated: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
        slim = clone_without_gates(gated)
        hd = head_dim_of(slim)
        layout = []
        for i, layer in enumerate(decoder_base(slim).layers):
            attn, mlp = layer.self_attn, layer.mlp
            nh, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
            n_rep = nh // nkv
            slots = keep.get(f"layer{i}.heads", torch.arange(n_rep)).long().cpu()
            groups = keep.get(f"layer{i}.kv", torch.arange(nkv)).long().cpu()
            if slots.numel() == 0 or groups.numel() == 0:
                bias = attn.o_proj.bias
                layer.self_attn = EmptyAttention(slim.config.hidden_size, i, bias).to(
                    attn.o_proj.weight.device
                )
                q_heads = kv_heads = 0
            elif slots.numel() < n_rep or groups.numel() < nkv:
                heads = (groups.view(-1, 1) * n_rep + slots.view(1, -1)).reshape(-1)  # KV-group major
                ar = torch.arange(hd)
                q_rows = (heads.view(-1, 1) * hd + ar).reshape(-1)
                kv_rows = (groups.view(-1, 1) * hd + ar).reshape(-1)
                attn.q_proj = slice_linear(attn.q_proj, out_idx=q_rows)
                attn.k_proj = slice_linear(attn.k_proj, out_idx=kv_rows)
                attn.v_proj = slice_linear(attn.v_proj, out_idx=kv_rows)
                attn.o_proj = slice_linear(attn.o_proj, in_idx=q_rows)
                attn.num_key_value_groups = int(slots.numel())
                q_heads, kv_heads = int(heads.numel()), int(groups.numel())
            else:
                q_heads, kv_heads = nh, nkv
            f_keep = keep.get(f"layer{i}.ffn")
            if f_keep is not None and f_keep.numel() < mlp.up_proj.out_features:
                f_keep = f_keep.long().cpu()
                mlp.gate_proj = slice_linear(mlp.gate_proj, out_idx=f_keep)
                mlp.up_proj = slice_linear(mlp.up_proj, out_idx=f_keep)
                mlp.down_proj = slice_linear(mlp.down_proj, in_idx=f_keep)
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = int(f_keep.numel())
            layout.append({"heads": q_heads, "kv_heads": kv_heads, "intermediate": mlp.up_proj.out_features})
        _record_layout(slim, layout)
        slim.train(gated.training)
        return slim

    def uniform_policy(self, gated: nn.Module, policy: Any) -> ExportPolicy:
        """``policy`` with per-segment ``counts``: every layer keeps the same number of query
        slots, KV groups and FFN units (the mean over layers of what ``policy`` would keep).

        At least one query slot and one KV group stay: a stock config cannot say "no heads"."""
        from dataclasses import replace

        store: GateStore = store_of(gated)
        policy = policy or ExportPolicy()
        counts = keep_counts(store, policy)
        by_kind: dict[str, list] = {}
        for s in store.segments:
            by_kind.setdefault(s.kind, []).append(s)
        uni: dict[str, int] = {}
        for kind, segs in by_kind.items():
            mean = sum(counts[s.name] for s in segs) / len(segs)
            lo = 1 if kind in ("head", "kv_group") else 0
            for s in segs:
                uni[s.name] = min(s.units, max(lo, int(round(mean))))
        return replace(policy, counts=uni)

    # ------------------------------------------------------------------ files
    def load_model(self, arch: str, num_classes: int, path: str | None = None, **kw: Any) -> nn.Module:
        """A causal LM from the folder ``path`` (Hugging Face checkpoint or a saved slim model)."""
        if path is None:
            raise CheckpointError(
                f"model.path: the hf_decoder family needs a checkpoint folder (arch {arch!r})"
            )
        return load_causal_lm(path, **kw)

    def save(self, model: nn.Module, path: str) -> None:
        save_decoder(model, path)

    def load(self, path: str) -> nn.Module:
        return load_decoder(path)

    def layout(self, model: nn.Module) -> dict:
        cfg = model.config
        return {
            "family": self.family,
            "arch": type(model).__name__,
            "model_type": cfg.model_type,
            "head_dim": head_dim_of(model),
            "hidden_size": int(cfg.hidden_size),
            "vocab_size": _vocab_size(model),
            "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
            "layers": layer_widths(model),
        }


# ---------------------------------------------------------------------- config + files
def _is_uniform(layout: list[dict]) -> bool:
    first = layout[0]
    return all(lay == first for lay in layout) and first["heads"] > 0 and first["kv_heads"] > 0


def _record_layout(model: nn.Module, layout: list[dict]) -> None:
    """Write the per-layer widths into ``model.config`` (stock fields when uniform)."""
    cfg = model.config
    cfg.head_dim = head_dim_of(model)  # RoPE and attention read it; it must not follow num_heads
    if _is_uniform(layout):
        cfg.num_attention_heads = layout[0]["heads"]
        cfg.num_key_value_heads = layout[0]["kv_heads"]
        cfg.intermediate_size = layout[0]["intermediate"]
        if hasattr(cfg, "hawada_layout"):
            del cfg.hawada_layout
    else:
        cfg.hawada_layout = [dict(x) for x in layout]


MODELING_FILE = "modeling_hawada.py"


def _modeling_source(arch: str) -> str:
    """The ``trust_remote_code`` modeling file: the stock class plus :func:`apply_layout`."""
    return (
        '"""Per-layer widths for a pruned decoder (written by HawAda; needs only transformers)."""\n\n'
        "import torch\nfrom torch import nn\n"
        f"from transformers import {arch} as _Base\n\n\n"
        + inspect.getsource(EmptyAttention)
        + "\n\n"
        + inspect.getsource(apply_layout)
        + "\n\n"
        + f"class Hawada{arch}(_Base):\n"
        + "    def __init__(self, config):\n"
        + "        super().__init__(config)\n"
        + "        apply_layout(self, config.hawada_layout)\n"
        + "        self.post_init()\n"
    )


def save_decoder(model: nn.Module, path: str) -> None:
    """``save_pretrained`` (safetensors) + ``layout.json``; non-uniform layouts also get a
    ``modeling_hawada.py`` and ``auto_map`` so ``AutoModelForCausalLM`` loads them with
    ``trust_remote_code=True``."""
    os.makedirs(path, exist_ok=True)
    layout = layer_widths(model)
    _record_layout(model, layout)
    cfg = model.config
    arch = type(model).__name__
    uniform = _is_uniform(layout)
    if not uniform:
        cfg.auto_map = {"AutoModelForCausalLM": f"modeling_hawada.Hawada{arch}"}
        with open(os.path.join(path, MODELING_FILE), "w") as f:
            f.write(_modeling_source(arch))
    elif hasattr(cfg, "auto_map"):
        del cfg.auto_map
    model.save_pretrained(path, safe_serialization=True)
    lay = HFDecoderAdapter().layout(model)
    lay["uniform"] = uniform
    with open(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump(lay, f, indent=1)


def _read_config(path: str):
    if not os.path.isdir(path):
        raise CheckpointError(f"model folder not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def _state_dict_from(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for fn in files:
            state.update(load_file(os.path.join(path, fn)))
        return state
    single = os.path.join(path, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointError(f"{path} has no model.safetensors")
    return load_file(single)


def load_decoder(path: str) -> nn.Module:
    """Load a folder written by :func:`save_decoder` with stock transformers classes."""
    import transformers

    cfg = _read_config(path)
    with open(os.path.join(path, LAYOUT_FILE)) as f:
        lay = json.load(f)
    cls = getattr(transformers, lay["arch"], None)
    if cls is None or lay["arch"] not in KNOWN_CLASSES:
        raise ValueError(f"{path}: architecture {lay['arch']!r} is not one the hf_decoder family loads")
    if hasattr(cfg, "auto_map"):
        del cfg.auto_map
    model = cls(cfg)
    if not _is_uniform(lay["layers"]):
        apply_layout(model, lay["layers"])
    state = _state_dict_from(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if lay.get("tie_word_embeddings") else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"{path}: weights do not fit the layout (missing {sorted(set(missing) - tied)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]})"
        )
    if tied:
        model.tie_weights()
    _record_layout(model, lay["layers"])
    return model.eval()


def load_causal_lm(path: str, attn_implementation: str | None = None, dtype: Any = None) -> nn.Module:
    """A teacher from a Hugging Face folder (or a HawAda-saved slim folder)."""
    if os.path.isfile(os.path.join(path, LAYOUT_FILE)):
        return load_decoder(path)
    cfg = _read_config(path)
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {"local_files_only": True}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if dtype is not None:
        kw["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(path, config=cfg, **kw)
    if not HFDecoderAdapter.matches(model):
        raise ValueError(f"{path}: {type(model).__name__} does not have the LLaMA layer layout")
    return model.eval()

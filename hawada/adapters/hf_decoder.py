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
  ``num_key_value_groups`` stays one integer (docs/DESIGN.md, invariant 4).
* ``layer{i}.kv`` (kind ``kv_group``): one gate per KV group; a closed group removes its K/V
  rows, its query heads and their ``o_proj`` columns together.

  The per-head mask ``slot[h % n_rep] * kv[h // n_rep]`` multiplies ``o_proj``'s input (a
  forward pre-hook): a head whose output is zeroed contributes nothing, and a KV head whose
  query heads are all zeroed contributes nothing, so slicing them away is exact.
* ``layer{i}.ffn`` (kind ``ffn``): SwiGLU neurons in groups. ``up_proj``'s output is gated
  (:class:`~hawada.core.hooks.GatedLinear`), which zeroes ``act(gate) * up`` exactly, so
  ``gate_proj``/``up_proj`` rows and ``down_proj`` columns share this one keep set.
* ``layer{i}.layer`` (kind ``layer``): the whole decoder layer, one unit
  (:mod:`hawada.adapters.hf_layers`): its output becomes ``x + z (h - x)``, so a closed layer is
  the identity on the residual stream. Export removes it from ``model.layers``; the layers that
  stay get ``layer_idx`` 0..n-1 (their KV cache slots), ``num_hidden_layers`` and
  ``config.layer_types`` follow.

A layer whose heads are all closed is exported with :class:`EmptyAttention` (``o_proj``'s bias
only, and a one-element placeholder in the KV cache so the cache length stays right); a layer
whose FFN is all closed keeps zero-width linears (a matmul over zero features is exactly 0).
Non-uniform layouts are recorded per layer in ``config.hawada_layout`` and restored on load.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from hawada.adapters import hf_layers
from hawada.adapters.base import Adapter, register_adapter
from hawada.adapters.hf_decoder_files import (  # noqa: F401 - re-exported: the family's public names
    KNOWN_CLASSES,
    LAYOUT_FILE,
    CheckpointError,
    EmptyAttention,
    apply_layout,
    decoder_base,
    decoder_layout,
    has_layer_layout,
    head_dim_of,
    is_decoder,
    layer_widths,
    load_causal_lm,
    load_decoder,
    record_layout,
    save_decoder,
    vocab_size_of,
)
from hawada.core.export import ExportPolicy, clone_without_gates, keep_counts, slice_linear, store_of
from hawada.core.gates import GateConfig, GateStore
from hawada.core.hooks import add_hook, gate_linear, gates_of, install_store
from hawada.core.proxy_cost import CostTerm
from hawada.errors import InputError


class VocabMismatchError(InputError):
    """Teacher and student (or model and data) disagree on the vocabulary."""


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
        raise InputError(
            f"gates.min_keep.{kind}={mk} asks for more {what} than layer {layer} has ({available})"
        )


def check_same_vocab(teacher: nn.Module, student: nn.Module) -> None:
    """Raise :class:`VocabMismatchError` when the two models' vocabularies differ."""
    vt, vs = vocab_size_of(teacher), vocab_size_of(student)
    if vt != vs:
        raise VocabMismatchError(f"teacher vocabulary has {vt} tokens but the student's has {vs}")


# ---------------------------------------------------------------------- the adapter
@register_adapter
class HFDecoderAdapter(Adapter):
    family = "hf_decoder"
    kd_kind = "logits"
    default_group_size = {"head": 1, "kv_group": 1, "ffn": 64, "layer": 1}
    # what the latency proxy describes (set by the LM job from the recipe's target section)
    phase: str = "prefill"
    context: int | None = None
    decode_steps: int = 1

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_decoder(model)

    # ------------------------------------------------------------------ attach
    def attach(self, model: nn.Module, config: GateConfig) -> nn.Module:
        if gates_of(model) is not None:
            raise ValueError("model already has gates attached")
        if not has_layer_layout(model):
            raise InputError(f"{type(model).__name__} does not have the LLaMA layer layout")
        base = decoder_base(model)
        hd = head_dim_of(model)
        store = GateStore(config)
        plan = []
        for i, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if getattr(attn, "is_empty_attention", False):
                raise InputError(
                    "this model is already pruned (a layer has no attention); attach to the original"
                )
            nh, nkv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
            if nh % nkv:
                raise InputError(f"layer {i}: {nh} query heads are not a multiple of {nkv} KV heads")
            n_rep, inter = nh // nkv, mlp.up_proj.out_features
            _check_min_keep(config, "head", n_rep, "query heads per KV group", i)
            _check_min_keep(config, "kv_group", nkv, "KV heads", i)
            gs_ffn = config.group_for("ffn", self.default_group_size["ffn"])
            _check_min_keep(config, "ffn", -(-inter // gs_ffn), "FFN groups", i)
            _check_min_keep(config, "layer", 1, "layer gates", i)
            heads = kv = ffn = None
            if config.wants("head"):
                heads = store.register(f"layer{i}.heads", "head", n_rep, 1, i).name
            if config.wants("kv_group"):
                kv = store.register(f"layer{i}.kv", "kv_group", nkv, 1, i).name
            if config.wants("ffn"):
                ffn = store.register(f"layer{i}.ffn", "ffn", inter, gs_ffn, i).name
            plan.append((layer, heads, kv, ffn, n_rep, nkv))
        if config.wants("layer"):  # after every width gate: the width segments keep their places
            hf_layers.register_layer_gates(store, len(base.layers), config.group_for("layer", 1))
        if len(store) == 0:
            raise InputError(
                "GateConfig.kinds selects no kind the hf_decoder adapter gates "
                "('head', 'kv_group', 'ffn', 'layer')"
            )
        install_store(model, store, self)
        hf_layers.hook_layer_gates(store, base.layers)
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
        vocab = vocab_size_of(model)
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
        hidden, vocab = int(cfg.hidden_size), vocab_size_of(model)
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
                start = len(terms)

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
                if hf_layers.segment_name(i) in names:  # a removed layer costs none of its terms
                    for t in terms[start:]:
                        t.scale = hf_layers.segment_name(i)
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
        base = decoder_base(slim)
        kept = hf_layers.kept_layers(keep, len(base.layers))
        layout = []
        for i, layer in enumerate(base.layers):
            if i not in kept:  # removed below: nothing to slice
                layout.append(None)
                continue
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
        hf_layers.remove_layers(slim, base, "layers", kept)
        record_layout(slim, [layout[i] for i in kept])
        slim.train(gated.training)
        return slim

    def uniform_policy(self, gated: nn.Module, policy: Any) -> ExportPolicy:
        """``policy`` with per-segment ``counts``: every layer keeps the same number of query
        slots, KV groups and FFN units (the mean over layers of what ``policy`` would keep).

        At least one query slot and one KV group stay: a stock config cannot say "no heads".
        Layer gates are left as they are (a uniform model with fewer layers is still a stock
        config); the means are over the layers that stay."""
        from dataclasses import replace

        store: GateStore = store_of(gated)
        policy = policy or ExportPolicy()
        counts = keep_counts(store, policy)
        removed = {s.layer for s in store.segments if s.kind == "layer" and counts[s.name] == 0}
        by_kind: dict[str, list] = {}
        for s in store.segments:
            if s.kind != "layer":
                by_kind.setdefault(s.kind, []).append(s)
        uni: dict[str, int] = {}
        for kind, segs in by_kind.items():
            staying = [s for s in segs if s.layer not in removed] or segs
            mean = sum(counts[s.name] for s in staying) / len(staying)
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
        return decoder_layout(model)

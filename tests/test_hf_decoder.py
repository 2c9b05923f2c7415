"""hf_decoder adapter: invariants 1-4 on LLaMA, Mistral and Qwen2 GQA configs (eager and sdpa),
generate-equality with the KV cache, save/load both ways, uniform export, bad inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hawada.adapters.base import adapter_for, get_adapter  # noqa: E402
from hawada.adapters.hf_decoder import (  # noqa: E402
    CheckpointError,
    EmptyAttention,
    HFDecoderAdapter,
    VocabMismatchError,
    check_same_vocab,
    layer_widths,
)
from hawada.core.export import (  # noqa: E402
    ExportPolicy,
    export,
    export_keepall,
    keep_indices,
    relative_error,
    store_of,
)
from hawada.core.gates import GateConfig  # noqa: E402
from hawada.slim_io import load_slim, save_slim  # noqa: E402

FAMILIES = ("llama", "mistral", "qwen2")


def tiny_config(family: str, attn: str = "eager", tied: bool = False, **kw):
    common = dict(
        vocab_size=128,
        hidden_size=96,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        attn_implementation=attn,
    )
    common.update(kw)
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[family]
    return cls(**common)


def tiny_model(family: str, attn: str = "eager", tied: bool = False, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[family]
    return cls(tiny_config(family, attn, tied, **kw)).eval()


def gated(model, **gate_kw):
    m = __import__("copy").deepcopy(model)
    HFDecoderAdapter().attach(m, GateConfig(group_size={"ffn": 16}, **gate_kw))
    return m


def random_logits(m, seed: int, closed: dict[str, str] | None = None) -> None:
    """Random gate logits with both signs; ``closed``: segment name -> "all" closes it. Every
    layer gate stays open (tests/test_layer_gates.py closes whole layers)."""
    store = store_of(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        store.logits.copy_(torch.randn(len(store), generator=g) * 2)
        for s in store.segments:
            if s.kind == "layer":
                store.logits[s.start : s.stop] = 1.0
        for name in closed or {}:
            s = store.segment(name)
            store.logits[s.start : s.stop] = -1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_all_three_families(family):
    m = tiny_model(family)
    assert adapter_for(m).family == "hf_decoder"
    assert HFDecoderAdapter.matches(m.model)  # the bare *Model too
    assert not HFDecoderAdapter.matches(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_open_gates_equal_base_and_keepall(family, attn):
    """All gates open: the gated model IS the base model; keep-all export reproduces it (inv. 1)."""
    base = tiny_model(family, attn)
    g = gated(base)
    ad = get_adapter("hf_decoder")
    x = ad.example_inputs(base)
    ref = ad.check_output(base, x)
    g.eval()
    assert torch.equal(ad.check_output(g, x), ref)
    keep = export_keepall(g)
    assert not hasattr(keep, "hawada_gates")
    assert torch.equal(ad.check_output(keep, x), ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("seed", [1, 2])
def test_export_equals_gated_random_logits(family, attn, seed):
    """Invariant 2 on random logits; seed 1 closes a whole layer's heads, seed 2 a whole FFN
    and one KV group of the other layer."""
    base = tiny_model(family, attn, seed=seed)
    g = gated(base)
    closed = {1: {"layer0.heads": "all"}, 2: {"layer1.ffn": "all", "layer0.kv": "all"}}.get(seed)
    random_logits(g, seed, closed)
    if seed == 2:  # re-open layer0's second KV group so only one group is closed
        s = store_of(g).segment("layer0.kv")
        with torch.no_grad():
            store_of(g).logits[s.start + 1] = 1.0
    g.eval()
    slim = export(g)  # checks rel. error <= 1e-4 against the eval-mode gated model
    ad = HFDecoderAdapter()
    x = ad.example_inputs(base)
    with torch.no_grad():
        err = relative_error(ad.check_output(slim, x), ad.check_output(g, x))
    assert err <= 1e-4
    store = store_of(g)
    open_u = {s["name"]: s["open"] for s in store.summary()}
    for i, w in enumerate(layer_widths(slim)):
        slots, kv = open_u[f"layer{i}.heads"], open_u[f"layer{i}.kv"]
        if slots == 0 or kv == 0:
            assert w["heads"] == 0 and isinstance(slim.model.layers[i].self_attn, EmptyAttention)
        else:
            assert w == {"heads": slots * kv, "kv_heads": kv, "intermediate": open_u[f"layer{i}.ffn"]}
            assert slim.model.layers[i].self_attn.num_key_value_groups == slots
    if seed == 1:
        assert layer_widths(slim)[0]["heads"] == 0
    if seed == 2:
        assert layer_widths(slim)[1]["intermediate"] == 0


def test_kept_heads_read_their_own_kv_head():
    """Invariant 4: slicing keeps, for every kept query head, the KV head it read before."""
    base = tiny_model("llama")
    g = gated(base)
    store = store_of(g)
    with torch.no_grad():
        store.logits.fill_(1.0)
        s = store.segment("layer0.heads")
        store.logits[s.start + 1] = -1.0  # drop query slot 1 of every group: heads 1 and 4
    slim = export(g)
    q_old = base.model.layers[0].self_attn.q_proj.weight
    q_new = slim.model.layers[0].self_attn.q_proj.weight
    kept_heads = [0, 2, 3, 5]
    for new_h, old_h in enumerate(kept_heads):
        assert torch.equal(q_new[new_h * 16 : (new_h + 1) * 16], q_old[old_h * 16 : (old_h + 1) * 16])
        # new head new_h reads new KV head new_h // 2, which is old KV head old_h // 3
        assert new_h // slim.model.layers[0].self_attn.num_key_value_groups == old_h // 3


def test_ffn_shares_one_keep_set():
    base = tiny_model("qwen2")
    g = gated(base)
    random_logits(g, 5)
    keep = keep_indices(store_of(g))["layer0.ffn"]
    slim = export(g)
    mlp0, mlp1 = base.model.layers[0].mlp, slim.model.layers[0].mlp
    assert torch.equal(mlp1.gate_proj.weight, mlp0.gate_proj.weight[keep])
    assert torch.equal(mlp1.up_proj.weight, mlp0.up_proj.weight[keep])
    assert torch.equal(mlp1.down_proj.weight, mlp0.down_proj.weight[:, keep])
    # the last FFN group is partial: 100 = 6 * 16 + 4
    assert store_of(g).segment("layer0.ffn").gate_sizes()[-1] == 4


def test_probability_matches_sampling_distribution():
    """Invariant 3: the fraction of sampled non-zero gates matches probs()."""
    g = gated(tiny_model("llama"))
    store = store_of(g)
    with torch.no_grad():
        store.logits.copy_(torch.linspace(-3, 3, len(store)))
    store.train()
    n = 4000
    hits = torch.zeros(len(store))
    for _ in range(n):
        hits += (store.sample() > 0).float()
    assert torch.allclose(hits / n, store.probs().detach(), atol=0.04)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_equal_with_kv_cache(family):
    base = tiny_model(family, "sdpa", seed=3)
    g = gated(base)
    random_logits(g, 3, {"layer0.heads": "all"})  # an EmptyAttention layer first: cache length must hold
    g.eval()
    slim = export(g)
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        out_g = g.generate(ids, **kw)
        out_s = slim.generate(ids, **kw)
    assert torch.equal(out_g, out_s)
    assert out_s.shape == (2, 13)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_load_round_trips(tmp_path, family):
    base = tiny_model(family, tied=True, seed=4)
    g = gated(base)
    random_logits(g, 4, {"layer1.heads": "all"})
    slim = export(g)
    x = HFDecoderAdapter().example_inputs(slim)
    ref = HFDecoderAdapter().check_output(slim, x)
    path = str(tmp_path / "slim")
    save_slim(slim, path)
    with open(os.path.join(path, "layout.json")) as f:
        lay = json.load(f)
    assert lay["family"] == "hf_decoder" and not lay["uniform"]
    a = load_slim(path)  # stock classes, no remote code
    assert type(a) is type(base)
    assert relative_error(HFDecoderAdapter().check_output(a, x), ref) <= 1e-5
    assert a.lm_head.weight.data_ptr() == a.model.embed_tokens.weight.data_ptr()  # still tied
    b = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    assert type(b).__name__.startswith("Hawada")
    assert relative_error(HFDecoderAdapter().check_output(b, x), ref) <= 1e-5
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()
    assert layer_widths(a) == layer_widths(b) == layer_widths(slim)


def test_uniform_export_is_a_stock_checkpoint(tmp_path):
    base = tiny_model("mistral", seed=6)
    g = gated(base)
    random_logits(g, 6)
    ad = HFDecoderAdapter()
    policy = ad.uniform_policy(g, ExportPolicy())
    slim = export(g, policy)
    widths = layer_widths(slim)
    assert all(w == widths[0] for w in widths)
    assert widths[0]["heads"] > 0 and widths[0]["kv_heads"] > 0  # seed 6 alone would close every KV group
    path = str(tmp_path / "uni")
    save_slim(slim, path)
    assert not os.path.exists(os.path.join(path, "modeling_hawada.py"))
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert "auto_map" not in cfg and "hawada_layout" not in cfg
    plain = transformers.AutoModelForCausalLM.from_pretrained(path).eval()  # no remote code at all
    x = ad.example_inputs(slim)
    assert relative_error(ad.check_output(plain, x), ad.check_output(slim, x)) <= 1e-5
    assert plain.config.num_attention_heads == widths[0]["heads"]


def test_cost_terms_cover_prefill_and_decode():
    g = gated(tiny_model("llama"))
    ad = HFDecoderAdapter()
    ids = torch.zeros(2, 10, dtype=torch.long)
    pre = {t.name for t in ad.cost_terms(g, {"input_ids": ids}, phase="prefill")}
    dec = ad.cost_terms(g, {"input_ids": ids[:, :1]}, phase="decode", context=32)
    names = {t.name for t in dec}
    for part in ("q_proj", "k_proj", "v_proj", "o_proj", "attention", "gate_proj", "up_proj", "down_proj"):
        assert f"prefill.layer0.{part}" in pre and f"decode.layer1.{part}" in names
    assert "decode.lm_head" in names
    att = next(t for t in dec if t.name == "decode.layer0.attention")
    assert (
        att.op == "decode_attention" and att.spec["ctx"] == 32 and att.dims == ("layer0.heads", "layer0.kv")
    )
    mix = ad.cost_terms(g, {"input_ids": ids}, phase="mix", decode_steps=4)
    assert {t.name.split(".")[0] for t in mix} == {"prefill", "decode"}


def test_proxy_lut_builds_every_decoder_op():
    from hawada.core.proxy_cost import LatencyProxy

    g = gated(tiny_model("llama"))
    ad = HFDecoderAdapter()
    terms = ad.cost_terms(g, {"input_ids": torch.zeros(1, 1, dtype=torch.long)}, phase="decode", context=8)
    proxy = LatencyProxy(store_of(g), terms[:6], mode="lut")
    assert proxy.measure_table(repeats=1, budget_s=0.01) > 0
    assert float(proxy.term_ms(store_of(g).open_units()).sum()) > 0


# ---------------------------------------------------------------------- bad input
def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        HFDecoderAdapter().load_model("llama", 0, str(tmp_path))


def test_more_heads_than_exist():
    with pytest.raises(
        ValueError, match=r"min_keep.head=4 asks for more query heads per KV group than layer 0 has \(3\)"
    ):
        HFDecoderAdapter().attach(tiny_model("llama"), GateConfig(min_keep={"head": 4}))


def test_vocab_mismatch():
    with pytest.raises(VocabMismatchError, match="128 tokens but the student's has 64"):
        check_same_vocab(tiny_model("llama"), tiny_model("llama", vocab_size=64))

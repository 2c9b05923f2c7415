"""The hf_encoder adapter on small random BERT/ViT configs with odd sizes (6 heads, FFN 100 in
groups of 16): invariants 1-4, closed heads/FFN, eager and sdpa, save/load both ways, uniform
export, layout errors, cost terms, a training step, and loading the class a folder declares."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DeiTConfig,
    DeiTModel,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import hawada
from hawada.adapters.base import UnknownModelError, adapter_for, get_adapter
from hawada.adapters.hf_encoder import HFEncoderAdapter, mean_pool
from hawada.core.export import ExportError, ExportPolicy, keep_indices, relative_error
from hawada.core.gates import GateConfig, expand_to_units
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.train import LagrangeTrainer, TrainConfig
from hawada.hf_remote.modeling_hawada import EmptyAttention
from hawada.slim_io import load_slim, save_slim

HEADS, HIDDEN, FFN, GROUP, LAYERS = 6, 48, 100, 16, 3


def bert_cfg(attn: str = "sdpa", **kw) -> BertConfig:
    c = BertConfig(
        vocab_size=61,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        **kw,
    )
    c._attn_implementation = attn
    return c


def vit_cfg(attn: str = "sdpa", cls=ViTConfig) -> ViTConfig:
    c = cls(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        image_size=12,
        patch_size=4,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=5,
    )
    c._attn_implementation = attn
    return c


BUILDERS = {
    "BertModel": lambda a: BertModel(bert_cfg(a)),
    "BertForSequenceClassification": lambda a: BertForSequenceClassification(bert_cfg(a)),
    "ViTModel": lambda a: ViTModel(vit_cfg(a)),
    "ViTForImageClassification": lambda a: ViTForImageClassification(vit_cfg(a)),
}


def gated(name: str, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    model = BUILDERS[name](attn).eval()
    return hawada.attach(model, GateConfig(group_size={"ffn": GROUP}))


def open_layers(store, logit: float = 1.0) -> None:
    """Every layer gate open at ``logit`` (tests/test_layer_gates.py closes whole layers)."""
    with torch.no_grad():
        for s in store.segments:
            if s.kind == "layer":
                store.logits[s.start : s.stop] = logit


def randomize(store, seed: int = 1) -> None:
    """Random logits; layer 0 loses every head, layer 1 its whole FFN, layer 2 is mixed; every
    layer stays."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        store.logits.copy_(torch.randn(len(store), generator=g))
        open_layers(store)
        for name in ("layer0.heads", "layer1.ffn"):
            s = store.segment(name)
            store.logits[s.start : s.stop] = -1.0
        s = store.segment("layer2.heads")  # at least one head open, one closed
        store.logits[s.start] = 1.0
        store.logits[s.start + 1] = -1.0


def out(model: nn.Module, x) -> torch.Tensor:
    return HFEncoderAdapter().check_output(model, x)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_keepall_and_pruned_export_match(name: str, attn: str) -> None:
    g = gated(name, attn)
    store = hawada.gates(g)
    ad = adapter_for(g)
    x = ad.example_inputs(g)
    # Invariant 1: keep-all export reproduces the original model.
    torch.manual_seed(0)
    ref = BUILDERS[name](attn).eval()
    keep_all = hawada.export_keepall(g)
    assert relative_error(out(keep_all, x), out(ref, x)) < 1e-6
    # Invariant 2: open-iff-logit>0, slim == eval-mode gated, with closed heads/FFN.
    randomize(store)
    slim = hawada.export(g)
    g.eval()
    with torch.no_grad():
        gated_out = out(g, x)  # the hard gates of the store, no override
    err = relative_error(out(slim, x), gated_out)
    assert err <= 1e-4, err
    lay = ad.layout(slim)
    open_u = {s.name: int(o) for s, o in zip(store.segments, store.open_units().tolist())}
    assert [la["attn"] // lay["head_dim"] for la in lay["layers"]] == [
        open_u[f"layer{i}.heads"] for i in range(LAYERS)
    ]
    assert [la["ffn"] for la in lay["layers"]] == [open_u[f"layer{i}.ffn"] for i in range(LAYERS)]
    assert lay["layers"][0]["attn"] == 0 and lay["layers"][1]["ffn"] == 0
    assert any(isinstance(m, EmptyAttention) for m in slim.modules())
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in ref.parameters())
    # the closed parts really change the output (the test would not notice a no-op mask)
    assert relative_error(out(ref, x), gated_out) > 1e-3


def test_ffn_partial_last_group_and_mask_matches_export() -> None:
    g = gated("BertModel")
    store = hawada.gates(g)
    seg = store.segment("layer2.ffn")
    assert seg.count == 7 and seg.gate_sizes()[-1] == FFN - 6 * GROUP  # 100 = 6 * 16 + 4
    with torch.no_grad():
        store.logits.fill_(1.0)
        store.logits[seg.stop - 1] = -1.0
    slim = hawada.export(g)
    assert slim.encoder.layer[2].intermediate.dense.out_features == 96


def test_invariant3_training_forward_uses_the_sampled_gates() -> None:
    g = gated("BertModel")
    store = hawada.gates(g)
    randomize(store)
    ad = adapter_for(g)
    x = ad.example_inputs(g)
    g.train()
    with torch.no_grad():
        train_out = g(**x).last_hidden_state
    sampled = store.gate_mask().detach().clone()
    assert ((sampled > 0) & (sampled < 1)).any(), "hard-concrete samples should include soft values"
    units = {s.name: expand_to_units(sampled[s.start : s.stop], s) for s in store.segments}
    g.eval()
    with store.override(units), torch.no_grad():
        replay = g(**x).last_hidden_state
    assert relative_error(train_out, replay) < 1e-6
    # P(gate > 0) of the sampler equals probs()
    draws = torch.stack([store.sample() for _ in range(4000)]).detach()
    freq = (draws > 0).float().mean(0)
    assert (freq - store.probs().detach()).abs().max() < 0.04


def test_invariant4_head_rows_and_columns_share_a_keep_set() -> None:
    g = gated("BertModel")
    store = hawada.gates(g)
    randomize(store)
    keep = keep_indices(store)
    slim = hawada.export(g)
    hd = HIDDEN // HEADS
    kh = keep["layer2.heads"]
    feat = (kh.view(-1, 1) * hd + torch.arange(hd)).reshape(-1)
    src, dst = g.encoder.layer[2].attention, slim.encoder.layer[2].attention
    for k in ("query", "key", "value"):
        assert torch.equal(getattr(dst.self, k).weight, getattr(src.self, k).weight[feat])
        assert torch.equal(getattr(dst.self, k).bias, getattr(src.self, k).bias[feat])
    assert torch.equal(dst.output.dense.weight, src.output.dense.weight[:, feat])
    assert dst.self.num_attention_heads == kh.numel()


@pytest.mark.parametrize("name", ["BertModel", "ViTForImageClassification"])
def test_save_load_round_trips_both_ways(tmp_path, name: str) -> None:
    g = gated(name)
    randomize(hawada.gates(g))
    slim = hawada.export(g)
    ad = adapter_for(g)
    x = ad.example_inputs(slim)
    save_slim(slim, str(tmp_path))
    ref = out(slim, x)
    a = load_slim(str(tmp_path))
    assert type(a) is type(slim)  # a stock transformers class
    assert torch.equal(out(a, x), ref)
    auto = AutoModelForImageClassification if name.startswith("ViTFor") else AutoModel
    b = auto.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    assert type(b).__name__ == "Hawada" + name
    assert torch.equal(out(b, x), ref)
    c = AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    assert torch.equal(out(c, x), ref)


@pytest.mark.parametrize("name", ["BertModel", "ViTModel"])
def test_uniform_export_is_a_stock_config(tmp_path, name: str) -> None:
    g = gated(name)
    randomize(hawada.gates(g))
    ad = adapter_for(g)
    policy = ad.uniform_policy(g, ExportPolicy())
    slim = hawada.export(g, policy)
    lay = ad.layout(slim)
    assert len({(la["attn"], la["ffn"]) for la in lay["layers"]}) == 1
    if name == "BertModel":  # BertConfig ties head size to hidden / heads: every head stays
        assert lay["layers"][0]["attn"] == HIDDEN
    else:
        assert lay["layers"][0]["attn"] < HIDDEN
    assert lay["layers"][0]["ffn"] % GROUP == 0 and lay["layers"][0]["ffn"] < FFN
    save_slim(slim, str(tmp_path))
    x = ad.example_inputs(slim)
    plain = AutoModel.from_pretrained(str(tmp_path)).eval()  # no remote code, no layout
    assert type(plain) is type(slim)
    assert torch.equal(out(plain, x), out(slim, x))


@pytest.mark.parametrize(
    "build",
    [
        lambda: RobertaModel(
            RobertaConfig(
                vocab_size=61,
                hidden_size=HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=HEADS,
                intermediate_size=FFN,
                max_position_embeddings=40,
            )
        ),
        lambda: DeiTModel(vit_cfg(cls=DeiTConfig)),
    ],
    ids=["RobertaModel", "DeiTModel"],
)
def test_other_verified_classes(build) -> None:
    model = build().eval()
    g = hawada.attach(model, GateConfig(group_size={"ffn": GROUP}))
    store = hawada.gates(g)
    with torch.no_grad():
        store.logits.copy_(torch.randn(len(store), generator=torch.Generator().manual_seed(3)))
        open_layers(store)
        s = store.segment("layer0.heads")
        store.logits[s.start : s.stop] = -1.0
    slim = hawada.export(g)  # checked against the gated model inside export
    assert adapter_for(slim).layout(slim)["layers"][0]["attn"] == 0


def test_unknown_layout_names_the_first_module() -> None:
    model = BertModel(bert_cfg()).eval()
    model.encoder.layer[1].intermediate.dense = nn.Identity()
    with pytest.raises(UnknownModelError, match=r"encoder\.layer\.1\.intermediate\.dense"):
        hawada.attach(model)
    vit = ViTModel(vit_cfg()).eval()
    vit.layers[2].attention.o_proj = nn.Conv1d(HIDDEN, HIDDEN, 1)
    with pytest.raises(UnknownModelError, match=r"layers\.2\.attention\.o_proj"):
        get_adapter("hf_encoder").attach(vit, GateConfig())


def test_activation_that_is_not_zero_at_zero_is_refused() -> None:
    model = BertModel(bert_cfg()).eval()
    model.encoder.layer[0].intermediate.intermediate_act_fn = nn.Sigmoid()
    with pytest.raises(ValueError, match="does not map 0 to 0"):
        hawada.attach(model)


def test_export_fails_loudly_when_slim_differs() -> None:
    g = gated("BertModel")
    randomize(hawada.gates(g))
    ad = g._hawada_adapter  # the instance export() uses
    real = ad.export_pruned

    def broken(gm, keep):
        slim = real(gm, keep)
        old = slim.encoder.layer[2].output.dense
        # a new, untrained projection (not one the batched slicing fills in later)
        slim.encoder.layer[2].output.dense = torch.nn.Linear(old.in_features, old.out_features)
        return slim

    ad.export_pruned = broken
    with pytest.raises(ExportError, match="relative error"):
        hawada.export(g)


def test_kd_kind_and_outputs() -> None:
    g = gated("BertModel")
    ad = adapter_for(g)
    assert g._hawada_adapter.kd_kind == "embedding"
    x = ad.example_inputs(g)
    e = ad.output(g, x)
    assert e.shape == (2, HIDDEN)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
    # padding is excluded from the mean
    h = torch.randn(2, 4, 3)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(mean_pool(h, m)[0], torch.nn.functional.normalize(h[0, :2].mean(0), dim=0))
    c = gated("BertForSequenceClassification")
    assert c._hawada_adapter.kd_kind == "logits"
    assert adapter_for(c).output(c, x).shape == (2, 3)


def test_cost_terms_follow_the_gates() -> None:
    g = gated("BertModel")
    ad = adapter_for(g)
    x = {
        "input_ids": torch.zeros(4, 16, dtype=torch.long),
        "attention_mask": torch.ones(4, 16, dtype=torch.long),
    }
    terms = ad.cost_terms(g, x)
    assert len(terms) == LAYERS * 10
    store = hawada.gates(g)
    proxy = LatencyProxy(store, terms, mode="analytic")
    full = proxy.features(store.seg_units)
    half = proxy.features(store.seg_units / 2)
    assert half[0] < full[0] and half[1] < full[1]
    attn = next(t for t in terms if t.op == "attention")
    assert attn.spec == {"batch": 4, "seq": 16, "head_dim": HIDDEN // HEADS}
    qt = next(t for t in terms if t.name == "layer0.q")
    assert qt.dims == (HIDDEN, "layer0.heads") and qt.spec["out_mult"] == HIDDEN // HEADS
    vit = gated("ViTForImageClassification")
    vt = adapter_for(vit).cost_terms(vit, torch.zeros(2, 3, 12, 12))
    assert next(t for t in vt if t.op == "attention").spec["seq"] == 10  # 3 x 3 patches + CLS


def test_vit_attach_export_and_train_step() -> None:
    g = gated("ViTForImageClassification")
    torch.manual_seed(0)
    teacher = ViTForImageClassification(vit_cfg()).eval()
    ad = g._hawada_adapter
    store = hawada.gates(g)
    # a layer whose gate samples 0 in this step (P = 1 - sigmoid(logit)) gets no gradient
    open_layers(store, store.config.logit_clip)
    x = torch.randn(4, 3, 12, 12)
    batch = (x, torch.zeros(4, dtype=torch.long))
    proxy = LatencyProxy(store, ad.cost_terms(g, ad.example_inputs(g, 4)), mode="analytic")
    proxy.calibrate([store.seg_units, store.seg_units / 2], [2.0, 1.0])
    before_w = g.vit.layers[0].mlp.fc1.weight.detach().clone()
    before_l = store.logits.detach().clone()
    tr = LagrangeTrainer(g, teacher, proxy, 1.0, TrainConfig(steps=1, progress=False))
    rec = tr.step(batch)
    assert rec["kd"] > 0 and torch.isfinite(torch.tensor(rec["kd"]))
    assert not torch.equal(g.vit.layers[0].mlp.fc1.weight, before_w)
    assert not torch.equal(store.logits.detach(), before_l)
    slim = hawada.export(g)
    assert ad.output(slim, batch).shape == (4, 5)


def test_hidden_state_kd_is_zero_for_the_teacher_and_positive_once_pruned() -> None:
    from hawada.core.distill import KDConfig, student_teacher_loss

    g = gated("BertModel").eval()  # hard gates: all open
    ad = adapter_for(g)
    teacher = ad.export_keepall(g).eval()
    x = ad.example_inputs(g)
    out, states = ad.kd_outputs(g, x)
    assert torch.equal(out, ad.output(g, x))
    assert len(states) == LAYERS and all(s.shape == (2, 11, HIDDEN) for s in states)
    hidden_only = KDConfig(alpha_cos=0.0, alpha_emb_mse=0.0, alpha_hidden=1.0)
    assert float(student_teacher_loss(ad, g, teacher, x, hidden_only).detach()) < 1e-10
    with torch.no_grad():  # close two heads of the last layer: its states differ from the teacher's
        s = g.hawada_gates.segment("layer2.heads")
        g.hawada_gates.logits[s.start : s.start + 2] = -5.0
    loss = float(student_teacher_loss(ad, g, teacher, x, hidden_only).detach())
    assert loss > 1e-7
    # padded positions (the last 4 of rows 1..) do not count
    x2 = dict(x, input_ids=x["input_ids"].clone())
    x2["input_ids"][1:, -4:] = (x2["input_ids"][1:, -4:] + 1) % 61
    assert float(student_teacher_loss(ad, g, teacher, x2, hidden_only).detach()) == pytest.approx(
        loss, rel=1e-4
    )
    g.train()  # sampled gates: the hidden-state term alone gives the gate logits a gradient
    student_teacher_loss(ad, g, teacher, x, hidden_only).backward()
    assert g.hawada_gates.logits.grad is not None and g.hawada_gates.logits.grad.abs().sum() > 0


def test_hidden_state_kd_needs_an_adapter_that_gives_states() -> None:
    from hawada.adapters.base import Adapter
    from hawada.core.distill import KDConfig, student_teacher_loss

    class NoStates(Adapter):
        family = "nostates"
        kd_kind = "embedding"

        def output(self, model, batch):
            return model(batch)

    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="alpha_hidden > 0, but the 'nostates' family"):
        student_teacher_loss(NoStates(), lin, lin, torch.randn(2, 3), KDConfig(alpha_hidden=1.0))
    assert float(student_teacher_loss(NoStates(), lin, lin, torch.randn(2, 3), KDConfig()).detach()) < 1e-10


@pytest.mark.parametrize(
    "name, labels", [("ViTForImageClassification", 5), ("BertForSequenceClassification", 3)]
)
def test_load_model_keeps_the_classifier_the_folder_declares(tmp_path, name: str, labels: int) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name]("sdpa").eval()
    model.save_pretrained(str(tmp_path / "teacher"))
    ad = get_adapter("hf_encoder")
    loaded = ad.load_model("unused", 0, str(tmp_path / "teacher"))
    assert type(loaded) is type(model) and ad.kd_kind == "logits"
    x = ad.example_inputs(model)
    assert torch.equal(out(loaded, x), out(model, x))  # head weights loaded, not re-initialised
    assert ad.output(loaded, x).shape == (2, labels)
    # gated, pruned, saved and reloaded: still the classifier, same logits
    g = hawada.attach(loaded, GateConfig(group_size={"ffn": GROUP}))
    assert g._hawada_adapter.kd_kind == "logits"
    randomize(hawada.gates(g))
    slim = hawada.export(g)
    save_slim(slim, str(tmp_path / "slim"))
    back = load_slim(str(tmp_path / "slim"))
    assert type(back) is type(model) and back.classifier.out_features == labels
    assert torch.equal(out(back, x), out(slim, x))


def test_load_model_of_a_bare_folder_gives_the_encoder(tmp_path) -> None:
    torch.manual_seed(0)
    BUILDERS["ViTModel"]("sdpa").save_pretrained(str(tmp_path))
    ad = get_adapter("hf_encoder")
    model = ad.load_model("unused", 0, str(tmp_path))
    assert type(model) is ViTModel and ad.kd_kind == "embedding"


@pytest.mark.parametrize(
    "declared, message",
    [
        ("SwinForImageClassification", "declares a SwinForImageClassification; the hf_encoder family loads"),
        ("BertForSequenceClassification", "but its config is a ViTConfig (model_type 'vit')"),
    ],
)
def test_load_model_refuses_a_classifier_it_cannot_keep(tmp_path, declared: str, message: str) -> None:
    import json

    torch.manual_seed(0)
    BUILDERS["ViTForImageClassification"]("sdpa").save_pretrained(str(tmp_path))
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = [declared]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(UnknownModelError) as e:
        get_adapter("hf_encoder").load_model("unused", 0, str(tmp_path))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "BertModel"])
def test_every_head_of_every_layer_closed_exports_saves_and_loads(tmp_path, name: str) -> None:
    g = gated(name)
    store = hawada.gates(g)
    with torch.no_grad():
        for i in range(LAYERS):
            s = store.segment(f"layer{i}.heads")
            store.logits[s.start : s.stop] = -1.0
    slim = hawada.export(g)  # checked against the eval-mode gated model inside export
    lay = adapter_for(slim).layout(slim)
    assert lay["head_dim"] == HIDDEN // HEADS and all(la["attn"] == 0 for la in lay["layers"])
    save_slim(slim, str(tmp_path))
    back = load_slim(str(tmp_path))
    x = adapter_for(slim).example_inputs(slim)
    assert torch.equal(out(back, x), out(slim, x))

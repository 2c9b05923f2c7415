"""Layer (depth) gates on BERT, ViT, LLaMA and Qwen2 with GQA (docs/DESIGN.md, invariants 1-2,
"Saved models"): a closed layer is the identity on the residual stream, export removes it from
the layer list, and the slim model equals the eval-mode gated model (text with padding; decoders
also generate the same tokens with the KV cache), for a closed first layer, a closed last layer,
and a closed layer next to closed heads and FFN groups elsewhere; the folder its own
``save_pretrained`` writes loads through ``AutoModel*`` (remote code) and ``hawada.load_slim``.
Also: the proxy drops exactly a closed layer's terms, search rounding never touches a layer gate,
hidden-state distillation pairs by original layer, and the report names removed layers."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

import hawada
from hawada.adapters.base import adapter_for
from hawada.adapters.hf_decoder import HFDecoderAdapter, layer_widths
from hawada.core.export import (
    ExportPolicy,
    ExportRequestError,
    Rounding,
    keep_counts,
    relative_error,
)
from hawada.core.gates import GateConfig, project_gates_into_constraints
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.search_export import _grid_trials, closed_gates_by_logit, open_gates_by_logit
from hawada.errors import InputError
from hawada.run import report
from hawada.run.setup import minimal_keep_logits
from tests import test_hf_decoder as dec
from tests import test_hf_encoder as enc
from tests.test_save_pretrained import GEN, prompt, read_config, set_open

ENCODERS = {"BertModel": AutoModel, "ViTForImageClassification": AutoModelForImageClassification}
# (closed layers, extra closed width segments): first, last, and one among closed heads / FFN
CASES = {
    "first": ([0], {}),
    "last": ([2], {}),
    "mixed": ([1], {"layer0.heads": [0, 2], "layer2.ffn": [1, 4], "layer0.ffn": []}),
}


def close_layers(store, layers: list[int], widths: dict[str, list[int]]) -> None:
    """Every gate open, then layers ``layers`` closed and each width segment in ``widths`` keeping
    only the listed units (gate indices)."""
    with torch.no_grad():
        store.logits.fill_(2.0)
    for i in layers:
        set_open(store, f"layer{i}.layer", [])
    for name, units in widths.items():
        set_open(store, name, units)


def enc_gated(name: str):
    torch.manual_seed(0)
    model = enc.BUILDERS[name]("sdpa").eval()
    ref = copy.deepcopy(model)
    return ref, hawada.attach(model, GateConfig(group_size={"ffn": enc.GROUP}))


# ---------------------------------------------------------------------- encoders
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_layer_removal_is_exact_and_saves(tmp_path, name: str, case: str) -> None:
    ref, g = enc_gated(name)
    store, ad = hawada.gates(g), adapter_for(g)
    assert [s.name for s in store.segments if s.kind == "layer"] == [
        f"layer{i}.layer" for i in range(enc.LAYERS)
    ]
    x = ad.example_inputs(g)  # text: the second row is padded
    g.eval()
    with torch.no_grad():  # all open: the gated model is the stock model, keep-all too (inv. 1)
        assert torch.equal(enc.out(g, x), enc.out(ref, x))
        assert torch.equal(enc.out(hawada.export_keepall(g), x), enc.out(ref, x))
        assert torch.equal(enc.out(hawada.export(g), x), enc.out(ref, x))
    closed, widths = CASES[case]
    close_layers(store, closed, widths)
    slim = hawada.export(g)
    with torch.no_grad():
        gated_out = enc.out(g, x)
        slim_out = enc.out(slim, x)
    assert relative_error(slim_out, gated_out) <= 1e-4
    assert relative_error(gated_out, enc.out(ref, x)) > 1e-3  # the closed layer mattered
    kept = [i for i in range(enc.LAYERS) if i not in closed]
    assert slim.config.num_hidden_layers == len(kept) == len(ad.layout(slim)["layers"])
    assert slim.config.hawada_depth == {"layers": enc.LAYERS, "kept": kept}
    lay = ad.layout(slim)
    assert lay["kept_layers"] == kept and lay["layers_of"] == enc.LAYERS
    if case == "mixed":  # layer 0 keeps 2 heads and no FFN, layer 2 (now 1) keeps 2 FFN groups
        assert [la["attn"] // lay["head_dim"] for la in lay["layers"]] == [2, enc.HEADS]
        assert [la["ffn"] for la in lay["layers"]] == [0, 2 * enc.GROUP]
    # the model's own save_pretrained, loaded by transformers (remote code when non-uniform) and HawAda
    folder = str(tmp_path / "slim")
    slim.save_pretrained(folder)
    cfg = read_config(folder)
    assert cfg["num_hidden_layers"] == len(kept) and cfg["hawada_depth"]["kept"] == kept
    uniform = case != "mixed"
    assert ("hawada_layout" not in cfg) == uniform and ("auto_map" not in cfg) == uniform
    if not uniform:
        assert len(cfg["hawada_layout"]["layers"]) == len(kept)
    auto = ENCODERS[name]
    loaded = [auto.from_pretrained(folder, trust_remote_code=not uniform), hawada.load_slim(folder)]
    for m in loaded:
        m.eval()
        with torch.no_grad():
            assert torch.equal(enc.out(m, x), slim_out)
        assert adapter_for(m).layout(m) == lay


def test_encoder_kd_states_pair_by_original_layer() -> None:
    torch.manual_seed(0)
    model = enc.BUILDERS["BertModel"]("sdpa").eval()
    x = adapter_for(model).example_inputs(model)
    # transformers' hook that records hidden states is installed before the gates here
    model(**x, output_hidden_states=True)
    g = hawada.attach(model, GateConfig(group_size={"ffn": enc.GROUP}))
    store, ad = hawada.gates(g), adapter_for(g)
    close_layers(store, [1], {"layer2.heads": [0, 3]})
    g.eval()
    slim = hawada.export(g)
    with torch.no_grad():
        out_g, states_g = ad.kd_outputs(g, x)
        out_s, states_s = ad.kd_outputs(slim, x)
    assert len(states_g) == len(states_s) == enc.LAYERS
    assert torch.equal(states_g[1], states_g[0])  # the recorded state of a closed layer is its input
    assert relative_error(out_s, out_g) <= 1e-4
    for a, b in zip(states_s, states_g):
        assert relative_error(a, b) <= 1e-4
    assert states_s[1] is states_s[0]  # a removed layer's state is the one before it


def test_uniform_policy_keeps_layer_gates_and_stays_stock(tmp_path) -> None:
    ref, g = enc_gated("ViTForImageClassification")
    store = hawada.gates(g)
    close_layers(store, [2], {"layer0.ffn": [0, 1, 2], "layer1.heads": [0, 1, 2, 3]})
    ad = adapter_for(g)
    policy = ad.uniform_policy(g, ExportPolicy())
    assert not any(k.endswith(".layer") for k in policy.counts)  # the gates decide the depth
    # the means are over the layers that stay: (3 + 7) / 2 FFN groups, (6 + 4) / 2 heads
    assert policy.counts["layer0.ffn"] == 5 * enc.GROUP and policy.counts["layer0.heads"] == 5
    slim = hawada.export(g, policy)
    assert slim.config.num_hidden_layers == 2
    slim.save_pretrained(str(tmp_path))
    cfg = read_config(tmp_path)
    assert "auto_map" not in cfg and "hawada_layout" not in cfg
    plain = AutoModelForImageClassification.from_pretrained(str(tmp_path)).eval()
    x = ad.example_inputs(slim)
    with torch.no_grad():
        assert torch.equal(enc.out(plain, x), enc.out(slim, x))


def test_every_layer_closed_keeps_the_best_one_or_is_refused() -> None:
    _, g = enc_gated("BertModel")
    store = hawada.gates(g)
    close_layers(store, [0, 1, 2], {})
    with torch.no_grad():
        store.logits[store.segment("layer2.layer").start] = -0.5  # the highest closed logit
    slim = hawada.export(g)  # checked against the gated model with that keep set
    assert slim.config.hawada_depth == {"layers": 3, "kept": [2]}
    counts = {f"layer{i}.layer": 0 for i in range(3)}
    with pytest.raises(ExportRequestError, match="every one of the 3 layers is closed"):
        hawada.export(g, ExportPolicy(counts=counts))
    d = dec.gated(dec.tiny_model("llama"))
    close_layers(hawada.gates(d), [0, 1], {})
    with pytest.raises(ExportRequestError, match="layers is closed"):
        hawada.export(d, ExportPolicy(counts={"layer0.layer": 0, "layer1.layer": 0}))


def test_min_keep_and_the_smallest_model_keep_layers() -> None:
    torch.manual_seed(0)
    model = enc.BUILDERS["BertModel"]("sdpa").eval()
    g = hawada.attach(model, GateConfig(min_keep={"layer": 1}))
    store = hawada.gates(g)
    assert all(s.min_keep == 1 for s in store.segments if s.kind == "layer")
    close_layers(store, [0, 2], {})
    project_gates_into_constraints(store)
    assert all(o == 1 for s, o in zip(store.segments, store.open_units().tolist()) if s.kind == "layer")
    # without min_keep the fastest allowed model keeps one layer: it exports
    _, g2 = enc_gated("BertModel")
    s2 = hawada.gates(g2)
    with s2.logits_as(minimal_keep_logits(s2)):
        slim = hawada.export(g2, ExportPolicy(check=False))
    assert slim.config.num_hidden_layers == 1
    with pytest.raises(InputError, match="min_keep.layer=2"):
        dec.gated(dec.tiny_model("llama"), min_keep={"layer": 2})


def test_training_forward_reaches_the_layer_logits() -> None:
    torch.manual_seed(0)
    model = enc.BUILDERS["BertForSequenceClassification"]("sdpa")
    # sigmoid gates: a soft z in (0, 1), whose gradient a saturated hard-concrete sample would not have
    g = hawada.attach(model, GateConfig(mode="sigmoid"))
    store, ad = hawada.gates(g), adapter_for(g)
    g.train()
    ad.output(g, ad.example_inputs(g)).pow(2).sum().backward()
    grads = [float(store.logits.grad[s.start].abs()) for s in store.segments if s.kind == "layer"]
    assert len(grads) == enc.LAYERS and all(v > 0 for v in grads)


# ---------------------------------------------------------------------- decoders
def dec_model(family: str):
    if family == "qwen2":  # layer_types ["full", "sliding", "sliding"]: filtered with the layers
        return dec.tiny_model(
            family,
            "sdpa",
            seed=5,
            num_hidden_layers=3,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=1,
        )
    return dec.tiny_model(family, "sdpa", tied=True, seed=5, num_hidden_layers=3)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_layer_removal_is_exact_generates_and_saves(tmp_path, family: str, case: str) -> None:
    base = dec_model(family)
    g = dec.gated(base)
    store, ad = hawada.gates(g), HFDecoderAdapter()
    x, ids = ad.example_inputs(base), prompt()
    g.eval()
    with torch.no_grad():
        assert torch.equal(ad.check_output(g, x), ad.check_output(base, x))
        assert torch.equal(ad.check_output(hawada.export_keepall(g), x), ad.check_output(base, x))
    closed, widths = CASES[case]
    if case == "mixed":  # decoders: one KV group of layer 0 closed, FFN groups of layer 2
        widths = {"layer0.kv": [1], "layer0.heads": [0, 2], "layer2.ffn": [1, 4]}
    close_layers(store, closed, widths)
    slim = hawada.export(g)
    kept = [i for i in range(3) if i not in closed]
    assert slim.config.num_hidden_layers == len(slim.model.layers) == len(kept)
    assert [layer.self_attn.layer_idx for layer in slim.model.layers] == list(range(len(kept)))
    if family == "qwen2":
        assert slim.config.layer_types == [
            ["full_attention", "sliding_attention", "sliding_attention"][i] for i in kept
        ]
    with torch.no_grad():
        gated_out = ad.check_output(g, x)
        slim_out = ad.check_output(slim, x)
        assert relative_error(slim_out, gated_out) <= 1e-4
        assert relative_error(gated_out, ad.check_output(base, x)) > 1e-3
        gen = slim.generate(ids, **GEN)
        assert torch.equal(gen, g.generate(ids, **GEN))  # KV cache: renumbered slots
    folder = str(tmp_path / "slim")
    slim.save_pretrained(folder)
    cfg = read_config(folder)
    assert cfg["num_hidden_layers"] == len(kept) and cfg["hawada_depth"] == {"layers": 3, "kept": kept}
    uniform = case != "mixed"
    assert ("hawada_layout" not in cfg) == uniform
    if not uniform:
        assert cfg["hawada_layout"] == layer_widths(slim)
    loaded = [
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=not uniform),
        hawada.load_slim(folder),
    ]
    for m in loaded:
        m.eval()
        assert layer_widths(m) == layer_widths(slim)
        with torch.no_grad():
            assert torch.equal(ad.check_output(m, x), slim_out)
            assert torch.equal(m.generate(ids, **GEN), gen)
    lay = ad.layout(slim)
    assert lay["kept_layers"] == kept and len(lay["layers"]) == len(kept)


# ---------------------------------------------------------------------- proxy
@pytest.mark.parametrize("mode", ["analytic", "lut"])
@pytest.mark.parametrize("family", ["BertModel", "llama"])
def test_proxy_drops_exactly_a_closed_layers_terms(family: str, mode: str) -> None:
    if family == "llama":
        g = dec.gated(dec.tiny_model("llama", num_hidden_layers=3))
        x = {"input_ids": torch.zeros(2, 8, dtype=torch.long)}
        prefix = "prefill.layer1."
    else:
        _, g = enc_gated(family)
        x = adapter_for(g).example_inputs(g)
        prefix = "layer1."
    store, ad = hawada.gates(g), adapter_for(g)
    terms = ad.cost_terms(g, x)
    own = [t for t in terms if t.name.startswith(prefix)]
    assert own and all(t.scale == "layer1.layer" for t in own)
    assert all(
        t.scale is None for t in terms if not t.name.startswith(("layer", "prefill.layer", "decode.layer"))
    )

    def build(ts):
        p = LatencyProxy(store, ts, mode=mode)
        if mode == "lut":
            p.measure_table(time_op=lambda op, spec, w: 1.0 + 0.01 * sum(w))
        else:
            p.coef.copy_(torch.tensor([2.0, 3.0, 0.5, 1.0]))
        return p

    proxy, alone = build(terms), build(own)
    intercept = float(proxy.coef[3])
    full = store.seg_units.clone()
    closed = full.clone()
    closed[[i for i, s in enumerate(store.segments) if s.name == "layer1.layer"]] = 0.0
    with torch.no_grad():
        layer_cost = float(alone(full)) - intercept
        assert layer_cost > 0
        # the hard keep set: the closed layer costs nothing of its terms, whatever its widths
        assert float(proxy(full) - proxy(closed)) == pytest.approx(layer_cost, rel=1e-5)
        # the expected widths: a layer kept with probability 1/2 costs half
        half = full.clone()
        half[[i for i, s in enumerate(store.segments) if s.name == "layer1.layer"]] = 0.5
        assert float(proxy(full) - proxy(half)) == pytest.approx(layer_cost / 2, rel=1e-5)
    # the hard path from the gates' keep set
    close_layers(store, [1], {})
    with torch.no_grad():
        assert float(proxy(store.open_units())) == pytest.approx(float(proxy(closed)), rel=1e-6)


# ---------------------------------------------------------------------- search and report
def test_rounding_never_touches_a_layer_gate() -> None:
    _, g = enc_gated("BertModel")
    store = hawada.gates(g)
    close_layers(store, [1], {"layer0.ffn": [0]})
    # a global rounding that would reopen any closed one-unit segment leaves the layer closed
    counts = keep_counts(store, ExportPolicy(rounding=Rounding(8, "ceil", min_keep_ratio=0.5)))
    assert counts["layer1.layer"] == 0 and counts["layer0.layer"] == 1
    assert counts["layer0.ffn"] >= enc.FFN // 2  # the rounding did apply to the other kinds
    with pytest.raises(InputError, match="'layer' gates are never rounded"):
        _grid_trials(g, None, [8], ["ceil"], ["layer"])
    # the fill/trim probes neither reopen the closed layer nor close an open one, even with the
    # lowest logit of the store
    with torch.no_grad():
        store.logits[store.segment("layer2.layer").start] = 0.01
    base = keep_counts(store)
    closed = closed_gates_by_logit(store, base)
    opened = open_gates_by_logit(store, base)
    assert closed and opened
    assert not any(name.endswith(".layer") for name, _ in closed + opened)


def test_report_names_removed_layers() -> None:
    ref, g = enc_gated("BertModel")
    close_layers(hawada.gates(g), [0], {"layer2.heads": [0]})
    slim = hawada.export(g)
    ad = adapter_for(g)
    layout = {"base": ad.layout(ref), "slim": ad.layout(slim)}
    widths = report.layer_widths(json.loads(json.dumps(layout)))
    assert widths["heads 0"] == (enc.HEADS, 0) and widths["FFN 0"] == (enc.FFN, 0)
    assert widths["heads 2"] == (enc.HEADS, 1) and widths["FFN 1"] == (enc.FFN, enc.FFN)
    rows = dict(report.layout_rows(layout["slim"], layout["base"]))
    assert rows["removed layers"] == "0  (1 of 3)"
    assert rows["heads per layer"].startswith(f"{enc.HEADS} 1 ")
    d = dec.gated(dec.tiny_model("llama", num_hidden_layers=3))
    close_layers(hawada.gates(d), [2], {})
    s = hawada.export(d)
    dl = {"base": HFDecoderAdapter().layout(d), "slim": HFDecoderAdapter().layout(s)}
    assert report.layer_widths(dl)["KV heads 2"] == (2, 0)
    assert dict(report.layout_rows(dl["slim"]))["removed layers"] == "2  (1 of 3)"


def test_layer_gate_hooks_are_stripped_and_copied() -> None:
    _, g = enc_gated("BertModel")
    close_layers(hawada.gates(g), [1], {})
    c = copy.deepcopy(g)
    hook_stores = {
        id(h.store) for m in c.modules() for h in m._forward_hooks.values() if hasattr(h, "segment")
    }
    assert hook_stores == {id(hawada.gates(c))}
    plain = hawada.export_keepall(g)
    assert not any(
        getattr(h, "_hawada_gate", False) for m in plain.modules() for h in m._forward_hooks.values()
    )


# ---------------------------------------------------------------------- training commits depth
def vit_trainer(steps: int, **cfg_kw):
    """A gated tiny ViT (3 layers) against its teacher, with an analytic proxy; layer 0's gate
    just open (logit +0.05), layer 1's shut (-1), layer 2's open."""
    from transformers import ViTForImageClassification

    from hawada.core.train import LagrangeTrainer, TrainConfig

    g = enc.gated("ViTForImageClassification")
    torch.manual_seed(0)
    teacher = ViTForImageClassification(enc.vit_cfg()).eval()
    store, ad = hawada.gates(g), g._hawada_adapter
    proxy = LatencyProxy(store, ad.cost_terms(g, ad.example_inputs(g, 4)), mode="analytic")
    proxy.calibrate([store.seg_units, store.seg_units / 2], [2.0, 1.0])
    for i, logit in enumerate((0.05, -1.0, 3.0)):
        with torch.no_grad():
            store.logits[store.segment(f"layer{i}.layer").start] = logit
    cfg = TrainConfig(
        steps=steps, target_ramp_steps=0, price_eval_frac=0.5, constraint="equality", progress=False, **cfg_kw
    )
    tr = LagrangeTrainer(g, teacher, proxy, 1.5, cfg)
    batch = (torch.randn(4, 3, 12, 12), torch.zeros(4, dtype=torch.long))
    return tr, store, batch


def layer_logits(store) -> list[float]:
    return [float(store.logits.detach()[s.start]) for s in store.segments if s.kind == "layer"]


def test_the_eval_set_phase_pins_each_layer_gate_on_its_eval_side() -> None:
    """Before the eval-set phase layer gates train like any other; from its first step each is
    pinned at +-logit_clip on the side export reads (logit > 0), and stays there while the
    optimizer's momentum and lambda push on it. Widths keep training. ``commit_layers: false``
    leaves them free."""
    tr, store, batch = vit_trainer(4)
    clip = store.config.logit_clip
    for _ in range(2):  # steps 0 and 1 of 4: not yet the eval-set phase (steps 2 and 3)
        tr.step(batch)
    free = layer_logits(store)
    assert all(abs(v) < clip for v in free) and free != [0.05, -1.0, 3.0]
    sides = [v > 0 for v in free]
    assert True in sides and False in sides  # both sides are pinned
    widths = store.logits.detach().clone()
    for _ in range(2):
        tr.step(batch)
        assert layer_logits(store) == [clip if o else -clip for o in sides]
    # width gates are still trained in the phase
    w = [g for s in store.segments if s.kind != "layer" for g in range(s.start, s.stop)]
    assert not torch.equal(store.logits.detach()[w], widths[w])

    tr, store, batch = vit_trainer(4, commit_layers=False)
    for _ in range(4):
        tr.step(batch)
    assert all(abs(v) < clip for v in layer_logits(store))

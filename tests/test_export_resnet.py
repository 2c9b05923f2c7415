"""DESIGN invariants 1, 2 and 4 on torchvision ResNet-18 and ResNet-50."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import hawada
from hawada.adapters.resnet import ConstantBranchBlock, load_resnet, save_resnet
from hawada.core.export import (
    ExportError,
    ExportPolicy,
    Rounding,
    keep_counts,
    keep_element_indices_from_gate,
    keep_group_indices_from_gate,
    relative_error,
    slice_batchnorm,
    slice_conv2d,
    slice_embedding,
    slice_linear,
)
from hawada.core.hooks import gates_of
from hawada.slim_io import load_slim
from tests.helpers import randomize_bn

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["resnet18", "resnet50"])
def base(request):
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, request.param)(num_classes=10)).eval()


def random_gated(base, seed, close=()):
    """A gated copy with random logits; segments whose name is in ``close`` fully closed."""
    g = hawada.attach(copy.deepcopy(base))
    st = hawada.gates(g)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        st.logits.copy_(torch.randn(len(st), generator=gen))
        for s in st.segments:
            if s.name in close:
                st.logits[s.start : s.stop] = -1.0
            if s.kind == "stage":  # keep streams alive
                st.logits[s.start] = 1.0
    return g.eval()


def test_keepall_reproduces_the_original(base):
    """Invariant 1."""
    g = hawada.attach(copy.deepcopy(base)).eval()
    ref = base(X)
    assert torch.equal(g(X), ref)  # all gates open: the gated forward is the stock forward
    plain = hawada.export_keepall(g)
    assert type(plain) is type(base) and not hasattr(plain, "hawada_gates")
    assert gates_of(g) is hawada.gates(g) and gates_of(plain) is None and gates_of(base) is None
    assert not any(h for m in plain.modules() for h in m._forward_hooks.values())
    assert torch.equal(plain(X), ref)
    assert set(plain.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("seed", [0, 1])
def test_slim_equals_eval_gated_model(base, seed):
    """Invariant 2 with random logits, including closed blocks."""
    close = {"layer2.0.inner", "layer3.1.inner", "layer2.0.inner1", "layer3.1.inner2", "layer4.0.inner1"}
    g = random_gated(base, seed, close)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    slim = hawada.export(g)
    assert relative_error(slim(X), g(X)) <= 1e-4
    assert any(isinstance(m, ConstantBranchBlock) for m in slim.modules())
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in base.parameters())
    after = g.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), (
        "export must leave the gated model untouched"
    )
    # exactly the open units are kept
    st = hawada.gates(g)
    counts = keep_counts(st)
    assert counts == {s.name: int((st.logits[s.start : s.stop] > 0).sum()) for s in st.segments}
    assert slim.fc.in_features == counts["layer4"]


def test_closed_stage_is_refused(base):
    g = random_gated(base, 0)
    st = hawada.gates(g)
    s = st.segment("layer3")
    with torch.no_grad():
        st.logits[s.start : s.stop] = -1.0
    with pytest.raises(ExportError, match="residual stream 'layer3'"):
        hawada.export(g)


def test_every_tensor_added_into_a_stream_shares_one_keep_set(base):
    """Invariant 4: conv outputs, downsample outputs and identities of a stage agree."""
    g = random_gated(base, 2)
    slim = hawada.export(g)
    for i in range(1, 5):
        layer = getattr(slim, f"layer{i}")
        widths = set()
        for blk in layer:
            if isinstance(blk, ConstantBranchBlock):
                widths.add(blk.bias.numel())
                continue
            last = blk.conv3 if hasattr(blk, "conv3") else blk.conv2
            widths.add(last.out_channels)
            if blk.downsample is not None:
                widths.add(blk.downsample[0].out_channels)
        assert len(widths) == 1
    st = hawada.gates(g)
    assert slim.fc.in_features == keep_counts(st)["layer4"]


def test_rounded_export_is_checked_against_the_rounded_keep_set(base):
    g = random_gated(base, 3)
    pol = ExportPolicy(rounding=Rounding(multiple=8, mode="ceil"))
    slim = hawada.export(g, pol)
    st = hawada.gates(g)
    for s in st.segments:
        k = keep_counts(st, pol)[s.name]
        assert k == s.units or k % 8 == 0
    assert slim.fc.in_features % 8 == 0


def test_a_broken_export_is_refused(base, monkeypatch):
    g = random_gated(base, 4)
    adapter = g._hawada_adapter
    real = adapter.export_pruned

    def wrong(gated, keep):
        slim = real(gated, keep)
        slim.fc = nn.Linear(slim.fc.in_features, slim.fc.out_features)  # not the trained head
        return slim

    monkeypatch.setattr(adapter, "export_pruned", wrong)
    with pytest.raises(ExportError, match="differs from the gated model"):
        hawada.export(g)


def test_save_and_load_round_trip(base, tmp_path):
    g = random_gated(base, 5, {"layer3.0.inner", "layer3.0.inner1"})
    slim = hawada.export(g)
    save_resnet(slim, str(tmp_path / "m"))
    again = load_slim(str(tmp_path / "m"))
    assert torch.equal(again(X), slim(X))
    assert torch.equal(load_resnet(str(tmp_path / "m"))(X), slim(X))


def test_keep_index_helpers():
    lg = torch.tensor([0.5, -1.0, 2.0, 0.5])
    assert keep_group_indices_from_gate(lg, 2).tolist() == [0, 2]
    assert keep_group_indices_from_gate(lg, 0).tolist() == []
    # groups of 3 over 10 units (last group: unit 9); the count 5 takes group 1 (3 units), the one-unit
    # group 3, then the lowest unit of group 0
    idx = keep_element_indices_from_gate(torch.tensor([1.0, 3.0, -1.0, 2.0]), 3, 10, 5)
    assert idx.tolist() == [0, 3, 4, 5, 9]
    assert Rounding(8, "floor").apply(13, 64) == 8
    assert Rounding(8, "ceil").apply(13, 64) == 16
    assert Rounding(8, "nearest").apply(13, 64) == 16
    assert Rounding(8, "floor").apply(3, 64) == 8  # an open segment never rounds to zero
    assert Rounding(8, "floor").apply(0, 64) == 0
    assert Rounding(8, "ceil").apply(62, 60) == 60
    assert Rounding(4, "floor", min_keep_ratio=0.5).apply(4, 64) == 32


def test_slice_primitives_are_exact():
    lin = nn.Linear(7, 5)
    out, inn = torch.tensor([4, 0, 2]), torch.tensor([1, 6])
    s = slice_linear(lin, out, inn)
    assert torch.equal(s.weight, lin.weight[out][:, inn]) and torch.equal(s.bias, lin.bias[out])
    conv = nn.Conv2d(6, 4, 3, padding=1)
    c = slice_conv2d(conv, torch.tensor([3]), torch.tensor([0, 5]))
    assert torch.equal(c.weight, conv.weight[[3]][:, [0, 5]]) and c.padding == (1, 1)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(6)))[0]
    b = slice_batchnorm(bn, torch.tensor([5, 1]))
    assert torch.equal(b.running_var, bn.running_var[[5, 1]])
    emb = nn.Embedding(10, 6)
    assert torch.equal(slice_embedding(emb, torch.tensor([2, 3])).weight, emb.weight[:, [2, 3]])
    with pytest.raises(IndexError, match="out of range"):
        slice_linear(lin, torch.tensor([5]))
    with pytest.raises(TypeError, match="int64 or int32"):
        slice_linear(lin, torch.tensor([1.0]))
    empty = slice_linear(lin, torch.tensor([], dtype=torch.long))
    assert empty.weight.shape == (0, 7)

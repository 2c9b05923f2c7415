import pytest
import torch
import torch.nn.functional as F

from hawada.core.distill import (
    KDConfig,
    cosine_loss,
    distill_loss,
    kd_loss,
    mean_cosine,
    mse_reg,
    retrieval_agreement,
    top1_agreement,
)


def test_kd_loss_is_batchmean_kl_times_t_squared():
    s, t = torch.randn(7, 11), torch.randn(7, 11)
    ref = (
        F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), reduction="batchmean", log_target=True)
        * 9
    )
    assert kd_loss(s, t, 3.0) == pytest.approx(float(ref), rel=1e-5)
    assert kd_loss(t, t, 2.0) == pytest.approx(0.0, abs=1e-6)


def test_per_token_kd_uses_the_mask_and_chunking_does_not_change_it():
    s, t = torch.randn(3, 5, 13), torch.randn(3, 5, 13)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    keep = mask.bool()
    ref = kd_loss(s[keep], t[keep], 2.0)
    for chunk in (1, 4, 1000):
        assert kd_loss(s, t, 2.0, mask, chunk) == pytest.approx(float(ref), rel=1e-5)
    # masked-out positions do not matter
    s2 = s.clone()
    s2[~keep] = 100.0
    assert kd_loss(s2, t, 2.0, mask) == pytest.approx(float(ref), rel=1e-5)


def test_kd_gradient_flows_to_student_only():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))


def test_mse_and_cosine_and_embedding_loss():
    a, b = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0]] * 4)
    assert mse_reg(a, b, mask) == pytest.approx(float(((a[:, :2] - b[:, :2]) ** 2).mean()), rel=1e-5)
    e1, e2 = torch.randn(6, 8), torch.randn(6, 8)
    assert cosine_loss(e1, e1) == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(e1, -e1) == pytest.approx(2.0, abs=1e-6)
    cfg = KDConfig(alpha_cos=2.0, alpha_emb_mse=0.5)
    expect = 2.0 * cosine_loss(e1, e2) + 0.5 * mse_reg(e1, e2)
    assert distill_loss(e1, e2, cfg, "embedding") == pytest.approx(float(expect), rel=1e-5)


def test_agreement_metrics():
    logits = torch.randn(50, 10)
    assert top1_agreement(logits, logits) == 1.0
    assert top1_agreement(logits, -logits) == 0.0
    e = torch.randn(30, 16)
    assert mean_cosine(e, 2 * e) == pytest.approx(1.0, abs=1e-6)
    r = retrieval_agreement(e, e * 3, k=5)
    assert r == {"top1": 1.0, "top5": 1.0}
    r2 = retrieval_agreement(e, torch.randn(30, 16), k=5)
    assert r2["top1"] < 0.5 and r2["top5"] < 0.6


def test_kd_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        KDConfig(temperature=0)


def test_relative_hidden_state_mse_is_zero_for_equal_states_and_ignores_padding():
    from hawada.core.distill import hidden_state_mse

    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 5, 4, generator=g), 10.0 * torch.randn(2, 5, 4, generator=g)]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert hidden_state_mse([x.clone() for x in t], t, mask, relative=True) == 0.0
    s = [x.clone() for x in t]
    s[0][1, 4] += 100.0  # padding: ignored
    assert hidden_state_mse(s, t, mask, relative=True) == 0.0
    s[0][0, 0] += 1.0  # a real token
    assert hidden_state_mse(s, t, mask, relative=True) > 0.0
    # relative: the same relative error weighs the same on a layer of any scale
    a = hidden_state_mse([1.1 * t[0]], [t[0]], mask, relative=True)
    b = hidden_state_mse([1.1 * t[1]], [t[1]], mask, relative=True)
    assert torch.allclose(a, torch.tensor(0.01)) and torch.allclose(b, torch.tensor(0.01))
    assert not torch.allclose(hidden_state_mse([1.1 * t[1]], [t[1]], mask), torch.tensor(0.01))


def test_kd_config_refuses_a_negative_hidden_weight():
    with pytest.raises(ValueError, match="alpha_hidden"):
        KDConfig(alpha_hidden=-1.0)

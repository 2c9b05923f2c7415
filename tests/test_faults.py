"""Non-finite steps: skipped (no update, lambda unchanged) and counted; K in a row stop the
run with a checkpoint and a one-line message naming the step."""

import copy
import json
import os

import torch
import yaml

import hawada
import hawada.run.context as run_context
from hawada.adapters.base import get_adapter
from hawada.cli import main
from hawada.core.checkpoint import load_checkpoint
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.train import LagrangeTrainer, NonFiniteError, TrainConfig
from tests.helpers import tiny_digits_recipe, tiny_resnet

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
NAN = torch.full_like(X, float("nan"))


def trainer(**kw) -> LagrangeTrainer:
    teacher = tiny_resnet()
    student = hawada.attach(copy.deepcopy(teacher), hawada.GateConfig(mode="hard_concrete"))
    store = hawada.gates(student)
    proxy = LatencyProxy(store, get_adapter("resnet").cost_terms(student, X), mode="analytic")
    keepall = float(proxy(store.seg_units))
    cfg = TrainConfig(progress=False, probe_every=0, lr_gates=0.2, lambda_lr=2.0, lr_weights=1e-3, **kw)
    return LagrangeTrainer(student, teacher, proxy, target_ms=0.5 * keepall, cfg=cfg)


def snapshot(tr: LagrangeTrainer) -> dict:
    return {k: v.clone() for k, v in tr.student.state_dict().items() if v.is_floating_point()}


def test_nan_batch_is_skipped_counted_and_training_goes_on():
    tr = trainer(steps=6, max_bad_steps=2)
    snaps = []
    hist = tr.fit([(X, Y), (NAN, Y), (X, Y)], on_step=lambda rec: snaps.append((snapshot(tr), float(tr.lam))))
    assert [h.get("skipped", False) for h in hist] == [False, True, False, False, True, False]
    assert tr.bad_total == 2 and tr.guard.in_row == 0  # the phase's StepGuard counts skipped steps
    for i in (1, 4):  # a skipped step changes no weight, no gate, no lambda
        before, after = snaps[i - 1], snaps[i]
        assert after[1] == before[1]
        for k in before[0]:
            assert torch.equal(before[0][k], after[0][k]), k
    # a good step does change them
    assert not torch.equal(snaps[2][0]["hawada_gates.logits"], snaps[1][0]["hawada_gates.logits"])
    assert snaps[2][1] != snaps[1][1]


def test_non_finite_gradient_with_finite_loss_is_skipped():
    tr = trainer(steps=3)
    poison = {"on": False}
    tr.store.logits.register_hook(lambda g: g * float("nan") if poison["on"] else g)
    tr.fit([(X, Y)], on_step=lambda rec: poison.update(on=rec["step"] == 1))
    assert [h.get("skipped", False) for h in tr.history] == [False, True, False]
    assert tr.bad_total == 1


def test_k_bad_steps_in_a_row_checkpoint_and_stop():
    tr = trainer(steps=20, max_bad_steps=3)
    written = []
    try:
        tr.fit(
            [(X, Y), (NAN, Y), (NAN, Y), (NAN, Y)], checkpoint=lambda t: written.append(t.step_idx) or "ck"
        )
    except NonFiniteError as e:
        msg = str(e)
    else:
        raise AssertionError("no NonFiniteError")
    assert "3 non-finite steps in a row" in msg and "at step 4" in msg and "checkpoint: ck" in msg
    assert written == [4] and tr.step_idx == 4


TINY = tiny_digits_recipe(
    name="tiny-nan",
    train={"steps": 10, "probe_every": 0, "max_bad_steps": 3},
    target={"ratio": 0.6, "batch_size": 4},
    proxy={"mode": "analytic", "calib_points": 2},
)


def test_cli_stops_with_exit_2_one_line_and_a_checkpoint(tmp_path, monkeypatch, capsys):
    real = run_context.build_job

    def nan_job(recipe, device):
        job = real(recipe, device)
        job.train_loader = [(torch.full((4, 3, 16, 16), float("nan")), torch.zeros(4, dtype=torch.long))]
        return job

    monkeypatch.setattr(run_context, "build_job", nan_job)
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "output": {**TINY["output"], "dir": str(out)}}))
    assert main(["optimize", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "non-finite steps in a row" in err and "the last at step 3" in err
    assert not out.exists()
    ck = tmp_path / "run.partial" / "state" / "checkpoints"
    _, state, path = load_checkpoint(str(ck))
    assert state["step"] == 3 and state["bad_in_row"] == 3 and path in err
    recs = [json.loads(x) for x in (tmp_path / "run.partial" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [True] * 3 and recs[0]["kd"] is None  # NaN written as null
    assert any(k.startswith("kept_") for k in recs[0])  # kept fraction per segment kind
    assert os.path.isfile(tmp_path / "run.partial" / "state" / "recipe.json")


def test_finetune_skips_non_finite_steps_and_stops_after_k_in_a_row():
    from hawada.core.finetune import FinetuneConfig, finetune_student

    teacher = tiny_resnet().eval()
    student = copy.deepcopy(teacher)
    adapter = get_adapter("resnet")
    snaps = []
    cfg = FinetuneConfig(
        steps=5, lr=1e-2, warmup_steps=0, bn_recalib_batches=0, max_bad_steps=2, progress=False
    )

    class Loader(list):  # records the student's state as each batch is drawn
        def __iter__(self):
            for b in list.__iter__(self):
                snaps.append({k: v.clone() for k, v in student.state_dict().items() if v.is_floating_point()})
                yield b

    _, hist = finetune_student(student, teacher, adapter, Loader([(X, Y), (NAN, Y), (X, Y)]), cfg)
    assert [h.get("skipped", False) for h in hist] == [False, True, False, False, True]
    # the NaN step (2) changed no weight and no BatchNorm statistic; a good step (1) did
    for k in snaps[1]:
        assert torch.equal(snaps[1][k], snaps[2][k]), k
    assert not torch.equal(snaps[0]["fc.weight"], snaps[1]["fc.weight"])
    assert all(torch.isfinite(v).all() for v in student.state_dict().values() if v.is_floating_point())

    cfg.max_bad_steps, cfg.steps = 2, 6
    try:
        finetune_student(student, teacher, adapter, [(X, Y), (NAN, Y), (NAN, Y)], cfg)
    except NonFiniteError as e:
        assert str(e) == "finetune: 2 non-finite steps in a row (loss or gradient), the last at step 3"
    else:
        raise AssertionError("no NonFiniteError")

"""Claim (issue 2a): one gated KD step costs at most ~1.25x one plain KD step of the same student.

ResNet-18, batch 64 at 32x32 on this CPU. Plain: forward/backward of KL(teacher || student) and an
AdamW step. Gated: LagrangeTrainer.step (sampled gates, penalties, latency proxy, lambda update,
projection, both optimizers). Timed interleaved in one run; the ratio of medians is the result.
"""

from __future__ import annotations

import copy
import sys

import torch
import torchvision
from common import interleaved, write_result

import hawada
from hawada.adapters.base import get_adapter
from hawada.core.distill import KDConfig, distill_loss
from hawada.core.gates import PenaltyWeights
from hawada.core.proxy_cost import LatencyProxy
from hawada.core.train import LagrangeTrainer, TrainConfig


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(64, 3, 32, 32)
    batch = (x, torch.zeros(64, dtype=torch.long))
    kd = KDConfig()

    plain = copy.deepcopy(teacher).train()
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)

    def plain_step() -> None:
        with torch.inference_mode():
            t = teacher(x)
        loss = distill_loss(plain(x), t.clone(), kd, "logits")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        opt.step()

    gated = hawada.attach(copy.deepcopy(teacher))
    store = hawada.gates(gated)
    proxy = LatencyProxy(store, get_adapter("resnet").cost_terms(gated, x), mode="analytic")
    cfg = TrainConfig(steps=10**6, progress=False, penalties=PenaltyWeights(l0=0.1, floor=1.0, bimodal=0.1))
    trainer = LagrangeTrainer(gated, teacher, proxy, target_ms=1.0, cfg=cfg)
    trainer.lam.fill_(1.0)

    def gated_step() -> None:
        trainer.step(batch)

    res = interleaved({"plain_kd_step": plain_step, "gated_step": gated_step}, rounds=6, repeats=5, warmup=3)
    ratio = res["gated_step"]["median_ms"] / res["plain_kd_step"]["median_ms"]
    write_result(
        f"trainer_overhead_{threads}t",
        {
            "threads": threads,
            "model": "resnet18",
            "batch": [64, 3, 32, 32],
            "gates": len(store),
            "timings": res,
            "ratio_gated_over_plain": ratio,
            "aim": "<= 1.25",
        },
    )


if __name__ == "__main__":
    main()

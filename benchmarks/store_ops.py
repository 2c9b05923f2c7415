"""Claim (issue 2b): penalties + projection + latency proxy over the whole gate store are >= 10x
faster vectorised (one GateStore) than as a per-module Python loop.

Layout: 32 layers x (32 heads + 86 FFN groups), a LLaMA-scale gate store. Each iteration computes
the combined penalty (expected L0, keep floor, bimodality), the latency proxy on the expected
widths, backward to the logits, and the min-keep projection. The loop baseline holds one
parameter per module and does the same math module by module.
"""

from __future__ import annotations

import sys

import torch
from common import interleaved, write_result

from hawada.core.gates import GateConfig, GateStore, PenaltyWeights, combined_penalty
from hawada.core.gates import project_gates_into_constraints as project
from hawada.core.proxy_cost import CostTerm, LatencyProxy

LAYERS, HEADS, FFN_GROUPS, FFN_GROUP = 32, 32, 86, 64
W = PenaltyWeights(l0=0.1, floor=1.0, floor_frac=0.05, bimodal=0.1, cost_weighted=False)


def build_store() -> tuple[GateStore, LatencyProxy]:
    st = GateStore(GateConfig(min_keep={"head": 1, "ffn": 1}))
    terms = []
    for i in range(LAYERS):
        st.register(f"l{i}.heads", "head", HEADS, 1, i)
        st.register(f"l{i}.ffn", "ffn", FFN_GROUPS * FFN_GROUP, FFN_GROUP, i)
        terms += [
            CostTerm(f"l{i}.qkv", "linear", (2048, f"l{i}.heads"), 2e9, 1e7),
            CostTerm(f"l{i}.attn", "attention", (f"l{i}.heads",), 1e9, 1e7),
            CostTerm(f"l{i}.up", "linear", (2048, f"l{i}.ffn"), 8e9, 3e7),
            CostTerm(f"l{i}.down", "linear", (f"l{i}.ffn", 2048), 8e9, 3e7),
        ]
    proxy = LatencyProxy(st, terms, mode="analytic")
    proxy.coef.copy_(torch.tensor([0.5, 0.01, 0.001, 1.0]))
    with torch.no_grad():
        st.logits.normal_()
    return st, proxy


class LoopModel:
    """The same gates as one parameter per module, processed in a Python loop."""

    def __init__(self, st: GateStore) -> None:
        self.cfg = st.config
        self.mods = []
        for s in st.segments:
            p = torch.nn.Parameter(st.logits.detach()[s.start : s.stop].clone())
            sizes = torch.tensor(s.gate_sizes(), dtype=torch.float32)
            self.mods.append((s, p, sizes))

    def step(self) -> None:
        total_units = sum(float(sz.sum()) for _, _, sz in self.mods)
        l0 = floor = bim = 0.0
        n_gates = sum(p.numel() for _, p, _ in self.mods)
        widths = {}
        for s, p, sz in self.mods:
            prob = torch.sigmoid(p)
            exp_u = (prob * sz).sum()
            widths[s.name] = exp_u
            l0 = l0 + exp_u / total_units
            short = torch.relu(W.floor_frac * s.units - exp_u) / s.units
            floor = floor + short * short / len(self.mods)
            bim = bim + (prob * (1 - prob)).sum() / n_gates
        lat = 0.0
        for i in range(LAYERS):
            h = widths[f"l{i}.heads"] / HEADS
            f = widths[f"l{i}.ffn"] / (FFN_GROUPS * FFN_GROUP)
            flops = (2e9 * h + 1e9 * h + 8e9 * f + 8e9 * f) / 1e9
            mem = (1e7 * (1 + h) / 2 + 1e7 * h + 3e7 * (1 + f) / 2 * 2) / 1e6
            lat = lat + 0.5 * flops + 0.01 * mem + 0.001 * 4 + 1.0 / LAYERS
        loss = W.l0 * l0 + W.floor * floor + W.bimodal * bim + lat
        for _, p, _ in self.mods:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for s, p, _ in self.mods:
                p.clamp_(-self.cfg.logit_clip, self.cfg.logit_clip)
                top = torch.topk(p, s.min_keep).indices
                p[top] = p[top].clamp_min(0.05)


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    st, proxy = build_store()
    loop = LoopModel(st)

    def vectorised() -> None:
        st.logits.grad = None
        loss = combined_penalty(st, W) + proxy(st.expected_units())
        loss.backward()
        project(st)

    res = interleaved({"vectorised_store": vectorised, "per_module_loop": loop.step}, rounds=5, repeats=20)
    ratio = res["per_module_loop"]["median_ms"] / res["vectorised_store"]["median_ms"]
    write_result(
        f"store_ops_{threads}t",
        {
            "threads": threads,
            "layout": f"{LAYERS} layers x ({HEADS} heads + {FFN_GROUPS} FFN groups)",
            "gates": len(st),
            "segments": st.num_segments,
            "timings": res,
            "speedup_vectorised_over_loop": ratio,
            "aim": ">= 10",
        },
    )


if __name__ == "__main__":
    main()

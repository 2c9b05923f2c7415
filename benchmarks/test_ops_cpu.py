"""CPU claim: the vectorised torch store ops (one flat logits vector, segment sums by index_add)
beat a per-module Python loop over the 32-layer store (32 x (32 heads + 86 FFN groups)).

Run: ``python -m pytest benchmarks/ --benchmark-only`` (pytest-benchmark groups each op's two
implementations per thread count; compare the medians within a group).

Each case runs with 1 and 2 intra-op threads: these tensors hold a few thousand elements, and on a
busy machine waking a second thread for one elementwise op can cost more than the op itself.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))

from store_loops import penalties_loop, project_loop, sample_loop  # noqa: E402

from hawada.core.gates import (  # noqa: E402
    GateConfig,
    GateStore,
    PenaltyWeights,
    combined_penalty,
    project_gates_into_constraints,
)
from hawada.ops import use_backend  # noqa: E402

W = PenaltyWeights(l0=1.0, floor=1.0, floor_frac=0.1, bimodal=0.1)


def store_32() -> GateStore:
    store = GateStore(GateConfig(min_keep={"head": 1, "ffn": 4}))
    for i in range(32):
        store.register(f"layers.{i}.attn.heads", "head", 32, 1, layer=i)
        store.register(f"layers.{i}.mlp.groups", "ffn", 8192, 96, layer=i)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        store.logits.copy_(torch.randn(len(store), generator=g) * 2)
    store.set_segment_costs(torch.rand(store.num_segments, generator=g) + 0.5)
    return store


@pytest.fixture(autouse=True, params=[1, 2], ids=lambda n: f"threads{n}")
def _torch_backend(request):
    prev = torch.get_num_threads()
    torch.set_num_threads(request.param)
    with use_backend("torch"):
        yield
    torch.set_num_threads(prev)


@pytest.mark.parametrize("impl", ["vectorised", "per_module_loop"])
def test_sample(benchmark, impl):
    benchmark.group = f"store-sample-fwd-bwd-threads{torch.get_num_threads()}"
    store, noise = store_32(), torch.rand(3776)
    if impl == "vectorised":

        def f():
            store.sample(noise).sum().backward()
    else:

        def f():
            torch.stack([z.sum() for z in sample_loop(store, noise)]).sum().backward()

    benchmark(f)
    torch.testing.assert_close(store.sample(noise), torch.cat(sample_loop(store, noise)))


@pytest.mark.parametrize("impl", ["vectorised", "per_module_loop"])
def test_penalties(benchmark, impl):
    benchmark.group = f"store-penalties-widths-fwd-bwd-threads{torch.get_num_threads()}"
    store = store_32()
    gexp = torch.rand(store.num_segments)
    if impl == "vectorised":

        def f():
            return combined_penalty(store, W), store.expected_units()
    else:

        def f():
            return penalties_loop(store, W)

    def fb():
        total, widths = f()
        (total + (widths * gexp).sum()).backward()

    benchmark(fb)
    (a, wa), (b, wb) = (combined_penalty(store, W), store.expected_units()), penalties_loop(store, W)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)


@pytest.mark.parametrize("impl", ["vectorised", "per_module_loop"])
def test_project(benchmark, impl):
    benchmark.group = f"store-project-threads{torch.get_num_threads()}"
    store = store_32()
    start = store.logits.detach() * 4 - 6

    def f():
        store.logits.data.copy_(start)
        if impl == "vectorised":
            project_gates_into_constraints(store)
        else:
            project_loop(store)

    benchmark(f)
    f()
    got = store.logits.detach().clone()
    store.logits.data.copy_(start)
    project_gates_into_constraints(store)
    assert torch.equal(got, store.logits.detach())

"""slice_many (compiled extension) against the torch reference: bitwise, every dtype, every layout."""

import math
import threading
import time

import pytest
import torch
from torch import nn

import hawada
from hawada import _ext
from hawada.core.export import slice_batchnorm, slice_conv2d, slice_embedding, slice_linear
from hawada.core.slicing import batched_slicing
from hawada.ops import SliceError, slice_many, slice_many_ref
from tests.ext_helpers import require_ext

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.float8_e4m3fn,
    torch.complex64,
    torch.complex128,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]


@pytest.fixture(scope="module")
def ext():
    return require_ext()


def random_bits(shape, dtype, gen):
    """Random bytes viewed as ``dtype``: NaNs with payloads, infinities and subnormals included."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    n = 1
    for s in shape:
        n *= s
    esize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * esize,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).reshape(shape)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(as_bytes(a), as_bytes(b))


def layouts(gen, dtype):
    """Sources with odd shapes: contiguous, transposed, strided, channels-last, expanded, 1-D."""
    base4 = random_bits((19, 23, 3, 5), dtype, gen)
    return {
        "2d": random_bits((37, 53), dtype, gen),
        "2d_transposed": random_bits((53, 37), dtype, gen).t(),
        "2d_strided": random_bits((37, 106), dtype, gen)[:, ::2],
        "4d": base4,
        "4d_channels_last": base4.clone().to(memory_format=torch.channels_last)
        if dtype.is_floating_point
        else base4.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
        "4d_inner_sliced": random_bits((19, 23, 3, 9), dtype, gen)[:, :, :, 2:7],
        "expanded": random_bits((1, 53), dtype, gen).expand(37, 53),
        "1d": random_bits((41,), dtype, gen),
        "1d_strided": random_bits((82,), dtype, gen)[::2],
    }


def keep(n, gen, kind, dtype=torch.int64):
    if kind == "none":
        return None
    if kind == "empty":
        return torch.zeros(0, dtype=dtype)
    if kind == "sorted":
        return torch.randperm(n, generator=gen)[: max(1, n // 2)].sort().values.to(dtype)
    return torch.randint(0, n, (n + 3,), generator=gen).to(dtype)  # any order, repeats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bitwise_equal_to_index_select(ext, dtype):
    gen = torch.Generator().manual_seed(1)
    srcs, rows, cols = [], [], []
    for name, src in layouts(gen, dtype).items():
        for rk in ("none", "sorted", "any", "empty"):
            for ck in ("none", "sorted", "any", "empty") if src.dim() >= 2 else ("none",):
                idt = torch.int32 if (rk == "any" or ck == "sorted") else torch.int64
                srcs.append(src)
                rows.append(keep(src.shape[0], gen, rk, idt))
                cols.append(keep(src.shape[1], gen, ck, idt) if src.dim() >= 2 else None)
        assert name
    got = slice_many(srcs, rows, cols)  # one call, many tensors
    ref = slice_many_ref(srcs, rows, cols)
    assert len(got) == len(ref) == len(srcs)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert g.is_contiguous()
        assert bitwise_equal(g, r), f"job {i}: shape {tuple(srcs[i].shape)} stride {srcs[i].stride()}"
    # Direct reference: Python slicing of the source.
    s, r_, c_ = srcs[5], rows[5], cols[5]
    expect = s if r_ is None else s[r_.long()]
    expect = expect if c_ is None else expect[:, c_.long()]
    assert bitwise_equal(got[5], expect)


def test_fills_given_destinations_and_large_tensors(ext):
    gen = torch.Generator().manual_seed(2)
    src = torch.randn(1024, 700, generator=gen)  # several parallel blocks per tensor
    rows = torch.randperm(1024, generator=gen)[:600].sort().values
    cols = torch.randperm(700, generator=gen)[:333]
    out = [torch.full((600, 333), float("nan")), torch.empty(600, 700)]
    res = slice_many([src, src], [rows, rows], [cols, None], out=out)
    assert res[0] is out[0] and res[1] is out[1]
    assert bitwise_equal(out[0], src[rows][:, cols])
    assert bitwise_equal(out[1], src[rows])


def test_other_python_threads_run_while_it_copies(ext):
    """The extension releases the GIL while it copies: a Python thread that stamps the clock every
    millisecond keeps stamping in the middle of a long call. Were the GIL held, that thread could
    run only in a switch interval (5 ms) before the call enters C++, or after it returns."""
    big = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(4))
    src = big.t()  # column gathers 8 KiB apart: a slow, cache-missing copy
    cols = torch.arange(2047, -1, -1)
    dst = torch.empty(2048, 2048)
    stamps: list[float] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)  # bounded list; the GIL is asked for again after each sleep

    def call(jobs: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        ext.slice_many([src] * jobs, [None] * jobs, [cols] * jobs, [dst] * jobs)
        return t0, time.perf_counter()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core copies (and jobs sharing `dst` run one after another)
    th = threading.Thread(target=worker, daemon=True)
    try:
        t0, t1 = call(1)
        jobs = min(256, max(1, math.ceil(0.15 / max(t1 - t0, 1e-6))))  # a call of >= ~0.15 s
        th.start()
        tries = []
        for _ in range(3):  # a loaded machine may deschedule the thread for a whole call
            time.sleep(0.02)
            t0, t1 = call(jobs)
            margin = max(0.25 * (t1 - t0), 0.015)
            inside = [s for s in list(stamps) if t0 + margin < s < t1 - margin]
            tries.append((round(t1 - t0, 3), len(inside)))
            if inside:
                break
    finally:
        stop.set()
        if th.is_alive():
            th.join()
        torch.set_num_threads(threads)
    assert tries[-1][1] > 0, f"no progress of the other thread during the copy: (seconds, stamps) {tries}"
    assert bitwise_equal(dst, src[:, cols])


BAD = {
    "float_index": lambda s: ([s], [torch.tensor([0.0, 1.0])], [None]),
    "bool_index": lambda s: ([s], [torch.tensor([True, False])], [None]),
    "uint8_index": lambda s: ([s], [None], [torch.tensor([1, 2], dtype=torch.uint8)]),
    "row_too_big": lambda s: ([s], [torch.tensor([0, 7])], [None]),
    "negative_col": lambda s: ([s], [None], [torch.tensor([-1])]),
    "col_too_big_int32": lambda s: ([s], [None], [torch.tensor([5], dtype=torch.int32)]),
    "2d_index": lambda s: ([s], [torch.tensor([[0, 1]])], [None]),
    "cols_on_1d": lambda s: ([s[0]], [None], [torch.tensor([0])]),
    "lengths": lambda s: ([s, s], [None], [None, None]),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("impl", ["ext", "ref"])
def test_bad_input_is_a_clear_error(ext, case, impl):
    src = torch.randn(7, 5)
    srcs, rows, cols = BAD[case](src)
    fn = slice_many if impl == "ext" else slice_many_ref
    with pytest.raises(ValueError, match="slice_many") as info:
        fn(srcs, rows, cols)
    assert "\n" not in str(info.value)


def test_nothing_written_before_every_job_is_checked(ext):
    src = torch.randn(7, 5)
    out = [torch.full((2, 5), 42.0), torch.full((1, 5), 42.0)]
    with pytest.raises(SliceError, match="out of range"):
        slice_many([src, src], [torch.tensor([0, 1]), torch.tensor([99])], [None, None], out=out)
    assert bool((out[0] == 42).all()) and bool((out[1] == 42).all())
    with pytest.raises(SliceError, match="shape"):
        slice_many([src], [torch.tensor([0, 1])], [None], out=[torch.empty(3, 5)])
    with pytest.raises(SliceError, match="dtype"):
        slice_many([src], [torch.tensor([0, 1])], [None], out=[torch.empty(2, 5, dtype=torch.float64)])


def test_batched_module_primitives_equal_the_immediate_ones(ext):
    gen = torch.Generator().manual_seed(3)
    lin, conv = nn.Linear(33, 21), nn.Conv2d(13, 11, 3, bias=True)
    bn, emb = nn.BatchNorm2d(11), nn.Embedding(50, 29, padding_idx=3)
    with torch.no_grad():
        bn.running_mean.normal_(generator=gen)
        bn.running_var.uniform_(0.5, 2, generator=gen)
        bn.num_batches_tracked.fill_(17)
    o, i = torch.tensor([0, 4, 5, 20]), torch.tensor([1, 2, 30], dtype=torch.int32)
    co, ci = torch.tensor([2, 3, 10]), torch.tensor([0, 12])

    def build():
        return [
            slice_linear(lin, o, i),
            slice_linear(lin, None, i),
            slice_conv2d(conv, co, ci),
            slice_batchnorm(bn, co),
            slice_embedding(emb, torch.tensor([0, 28, 5])),
            slice_linear(lin, torch.zeros(0, dtype=torch.long), None),
        ]

    eager = build()
    for enabled in (True, None):  # extension backend; None = "batch when the extension is loaded"
        with batched_slicing(enabled) as batch:
            assert batch is not None and len(batch.jobs) == 0
            deferred = build()
            assert len(batch.jobs) == 13
        for a, b in zip(eager, deferred):
            assert type(a) is type(b)
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys()
            for k in sa:
                assert bitwise_equal(sa[k], sb[k]), k


def test_batched_slicing_with_python_backend(monkeypatch):
    """The batching mechanism also works on the reference path (extension switched off)."""
    monkeypatch.setenv("HAWADA_EXT", "off")
    _ext.reset()
    try:
        lin = nn.Linear(9, 8)
        o = torch.tensor([7, 0, 3])
        assert _ext.load() is None
        with batched_slicing() as b0:
            assert b0 is None  # nothing deferred without the extension: the per-tensor path as before
        with batched_slicing(True):
            new = slice_linear(lin, o, None)
        assert bitwise_equal(new.weight.detach(), lin.weight.detach()[o])
        assert bitwise_equal(new.bias.detach(), lin.bias.detach()[o])
    finally:
        monkeypatch.delenv("HAWADA_EXT")
        _ext.reset()


def test_export_with_extension_equals_python_export(ext, monkeypatch):
    """hawada.export (ResNet family) batches through slice_many; the slim weights are bitwise the
    per-tensor Python export's, and the export check (invariant 2) passes."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gated = hawada.attach(model)
    store = hawada.gates(gated)
    with torch.no_grad():
        store.logits.copy_(torch.randn(store.logits.shape) * 2 + 0.5)
    calls = []
    real = hawada.ops.slice_many  # the name hawada.core.slicing calls
    monkeypatch.setattr(hawada.ops, "slice_many", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    slim_ext = hawada.export(gated, example_inputs=torch.randn(2, 3, 32, 32))
    assert len(calls) == 1 and calls[0] > 80  # every weight of the model in one call
    monkeypatch.setenv("HAWADA_EXT", "off")
    _ext.reset()
    try:
        slim_py = hawada.export(gated, example_inputs=torch.randn(2, 3, 32, 32))
    finally:
        monkeypatch.delenv("HAWADA_EXT")
        _ext.reset()
    assert len(calls) == 1
    a, b = slim_ext.state_dict(), slim_py.state_dict()
    assert a.keys() == b.keys()
    assert sum(t.numel() for t in a.values()) < sum(t.numel() for t in model.state_dict().values())
    for k in a:
        assert bitwise_equal(a[k], b[k]), k

"""The CUDA kernels against the CPU kernels and the reference (docs/algorithms.md#the-ops), on fresh random inputs.

What is checked, on a GPU (the whole module skips cleanly without one):
  * layerwise_topk (plain and subtract=) and layerwise_topk_mask: CUDA == CPU bit for bit (values,
    indices, offsets, masks) and == the reference, for every dtype, both directions, ratios from 1e-4 to
    1, layer lists with empty / one-element / odd-shaped / multi-work-item layers, heavy ties, ties that
    straddle the kernels' 65536-element chunks, more layers than one kernel-parameter table holds, and
    sizes from 0 to 1e8 elements (the large ones only on a GPU with enough memory);
  * poisoned outputs: outputs allocated by the op come from NaN / INT_MAX / True filled memory
    (deterministic fill, and a caching allocator primed with 0xFF blocks), so a position the kernel
    forgets to write shows up; in-place ops get NaN payloads at the positions they must not touch, which
    must keep their exact bits;
  * sparse_accumulate_: CUDA == CPU bit for bit where the order of additions is fixed (one stored
    update, or deterministic mode), close otherwise, for all dense x value dtypes, repeated indices, and
    bitwise run-to-run reproducibility under torch.use_deterministic_algorithms(True);
  * masked_sgd_ / masked_adam_: CUDA == CPU bit for bit (both round every float32 operation once; nvcc
    runs with --fmad=false), close to the reference, and the frozen-coordinate invariant (off_scale = 0:
    param and state of an unselected coordinate keep their bits, over many steps);
  * bad input: NaN, bad ratio, bad indices / offsets (nothing written), mixed devices (ValueError from
    the raw ops as well as the wrappers); and the kernels run on the current stream.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import unlearn_ext
from conftest import DTYPES, assert_step_close
from unlearn_ext import ops
from unlearn_ext.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

RAW = torch.ops.unlearn_ext
CHUNK = 65536  # elements per work item of the CUDA kernels (csrc/cuda/multi_tensor.cuh)


def _gpu_has(gib: float) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= gib * 2**30


# Sizes up to 1e8 elements (and the 2**31 limit): only on a GPU with room for them and their CPU copies.
large = pytest.mark.skipif(not _gpu_has(16), reason="large sizes need a GPU with >= 16 GiB")


# ---- helpers -------------------------------------------------------------------------------------------

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.bool: torch.uint8, torch.int32: torch.int32, torch.int64: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(_BITS[t.dtype])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and every bit (NaN payloads and signed zeros included)."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    g, w = _bits(got), _bits(want)
    if not torch.equal(g, w):
        diff = (g != w).reshape(-1).nonzero().reshape(-1)
        first = diff[:5].tolist()
        raise AssertionError(f"{what}: {diff.numel()} of {g.numel()} positions differ, first at {first}: got "
                             f"{got.detach().cpu().reshape(-1)[first].tolist()}, want "
                             f"{want.detach().cpu().reshape(-1)[first].tolist()}")


def assert_all_bitwise(got, want, what: str = "") -> None:
    got, want = list(got), list(want)
    assert len(got) == len(want), f"{what}: {len(got)} tensors != {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert_bitwise(g, w, f"{what}[{i}]")


def cuda(ts):
    return [t.cuda() for t in ts]


def cpu(ts):
    return [t.cpu() for t in ts]


def clone(ts):
    return [t.clone() for t in ts]


@contextlib.contextmanager
def deterministic(fill: bool = True):
    """torch.use_deterministic_algorithms(True); with `fill`, torch.empty fills new memory with NaN
    (floats), INT_MAX (ints) or True (bool), which also poisons every output the ops allocate."""
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = fill
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


def poison_allocator(*nbytes: int) -> None:
    """Primes the CUDA caching allocator with 0xFF-filled free blocks of these sizes, so that tensors the
    next op allocates (torch.empty) most likely start as NaN / -1 / 0xFF bytes."""
    blocks = [torch.full((max(int(n), 1),), 0xFF, dtype=torch.uint8, device="cuda") for n in nbytes for _ in range(2)]
    torch.cuda.synchronize()
    del blocks


_PAYLOAD = {torch.float32: 0x7FC0DEAD, torch.float16: 0x7E5A, torch.bfloat16: 0x7FDA}  # quiet NaNs


def poison_where(t: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """t with a NaN payload at `where` (bool, shape of t)."""
    bits = t.clone().view(_BITS[t.dtype])
    bits[where] = _PAYLOAD[t.dtype]  # all below 2**15 (resp. 2**31): no sign wrap in the int view
    return bits.view(t.dtype)


def layer(shape, dtype, kind: str, gen: torch.Generator) -> torch.Tensor:
    """A CPU layer: `normal`, `ties` (a few integer levels, signed zeros), `scaled` (many binades), `equal`."""
    if kind == "ties":
        x = torch.randint(-3, 4, shape, generator=gen).float()
        x[torch.rand(shape, generator=gen) < 0.1] = -0.0
    elif kind == "scaled":
        hi = 10 if dtype == torch.float16 else 20
        x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-20, hi, shape, generator=gen).float())
    elif kind == "equal":
        x = torch.full(shape, -1.5)
    else:
        x = torch.randn(shape, generator=gen)
    return x.to(dtype)


def updates(dense, B: int, gen: torch.Generator, value_dtype, ratio: float = 0.3, repeats: bool = False):
    """B stored updates for `dense` in the layerwise_topk format, concatenated (on the CPU)."""
    vals, idxs, offs = [], [], [0]
    for _ in range(B):
        xs = [torch.randn(d.shape, generator=gen).to(value_dtype) for d in dense]
        v, i, o = ops.layerwise_topk(xs, ratio)
        if repeats:  # each segment: 2n random picks of its entries (repeated, unordered indices)
            pv, pi, po = [], [], [0]
            for l in range(len(dense)):
                n = int(o[l + 1] - o[l])
                pick = torch.randint(0, max(n, 1), (2 * n,), generator=gen) + int(o[l])
                pv.append(v[pick])
                pi.append(i[pick])
                po.append(po[-1] + 2 * n)
            v, i, o = torch.cat(pv), torch.cat(pi), torch.tensor(po)
        vals.append(v)
        idxs.append(i)
        offs += (o[1:] + offs[-1]).tolist()
    return torch.cat(vals), torch.cat(idxs), torch.tensor(offs, dtype=torch.int64)


def test_cuda_kernels_are_compiled_and_registered():
    info = unlearn_ext.build_info()
    assert info["backend"] == "compiled", info
    assert info["cuda_compiled"], f"a GPU is visible but the CUDA kernels were not built: {info}"
    for name in ("layerwise_topk", "layerwise_topk_mask", "sparse_accumulate_", "masked_sgd_", "masked_adam_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"unlearn_ext::{name}", "CUDA"), name


# ---- layerwise_topk / layerwise_topk_mask -------------------------------------------------------------

RATIOS = (1e-4, 0.01, 0.1, 1 / 3, 0.5, 0.999, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", (True, False))
@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("with_subtract", (False, True))
def test_topk_matches_cpu_and_reference(make_layers, seed, dtype, largest, ratio, with_subtract):
    xs = make_layers(dtype, big=True)
    gen = torch.Generator().manual_seed(seed + 1)
    subs = [torch.randn(x.shape, generator=gen).to(dtype) for x in xs] if with_subtract else None
    want = ops.layerwise_topk(xs, ratio, largest, subs)
    got = ops.layerwise_topk(cuda(xs), ratio, largest, cuda(subs) if subs else None)
    assert all(t.device.type == "cuda" for t in got)
    assert_all_bitwise(got, want, "cuda vs cpu")
    assert_all_bitwise(want, reference.layerwise_topk(xs, ratio, largest, subs), "cpu vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", (True, False))
@pytest.mark.parametrize("ratio", RATIOS)
def test_topk_mask_matches_cpu_and_reference(make_layers, dtype, largest, ratio):
    xs = make_layers(dtype, big=True)
    want = ops.layerwise_topk_mask(xs, ratio, largest)
    got = ops.layerwise_topk_mask(cuda(xs), ratio, largest)
    assert all(m.device.type == "cuda" and m.dtype == torch.bool for m in got)
    assert_all_bitwise(got, want, "cuda vs cpu")
    assert_all_bitwise(want, reference.layerwise_topk_mask(xs, ratio, largest), "cpu vs reference")


def _check_topk_sizes(sizes, dtype, kind, ratio, largest, seed, ref_on_gpu):
    gen = torch.Generator().manual_seed(seed)
    xs = [layer((n,), dtype, kind, gen) for n in sizes]
    xg = cuda(xs)
    got = ops.layerwise_topk(xg, ratio, largest)
    assert_all_bitwise(got, ops.layerwise_topk(xs, ratio, largest), "cuda vs cpu")
    ref = reference.layerwise_topk(xg if ref_on_gpu else xs, ratio, largest)
    assert_all_bitwise(got, ref, "cuda vs reference")
    masks = ops.layerwise_topk_mask(xg, ratio, largest)
    for l, (m, x) in enumerate(zip(masks, xs)):  # the mask holds exactly the selected indices
        idx = got[1][int(got[2][l]):int(got[2][l + 1])].long()
        assert int(m.sum()) == idx.numel() == reference.keep_count(x.numel(), ratio)
        assert bool(m[idx].all())


@pytest.mark.parametrize("n", (0, 1, 2, 255, CHUNK - 1, CHUNK, CHUNK + 1, 1_000_003))
@pytest.mark.parametrize("kind", ("normal", "ties", "equal"))
def test_topk_sizes(seed, n, kind):
    for dtype in DTYPES:
        for ratio, largest in ((0.1, True), (0.5, False), (1e-4, True)):
            _check_topk_sizes([n, 3], dtype, kind, ratio, largest, seed, ref_on_gpu=n > 100_000)


@large
@pytest.mark.parametrize("sizes", ([100_000_000], [512 * CHUNK + 1, 40_000_000, 0, 1, 26_445_567]),
                         ids=("1e8", "1e8-over-layers"))
@pytest.mark.parametrize("kind", ("normal", "ties"))
def test_topk_sizes_large(seed, sizes, kind):
    _check_topk_sizes(sizes, torch.float32, kind, 0.1, True, seed, ref_on_gpu=True)
    _check_topk_sizes(sizes, torch.bfloat16, kind, 0.001, False, seed, ref_on_gpu=True)


@pytest.mark.parametrize("largest", (True, False))
def test_ties_take_lowest_indices_across_chunks(largest):
    n = 3 * CHUNK + 17
    x = torch.full((n,), 2.0)
    k = reference.keep_count(n, 0.5)
    v, i, o = ops.layerwise_topk([x.cuda()], 0.5, largest)
    assert torch.equal(i.cpu(), torch.arange(k, dtype=torch.int32))
    # a few strictly better entries at the end, the rest of the keep count from the tie, lowest first
    x[-5:] = 3.0 if largest else 1.0
    v, i, o = ops.layerwise_topk([x.cuda()], 0.5, largest)
    want = torch.cat([torch.arange(k - 5), torch.arange(n - 5, n)]).to(torch.int32)
    assert torch.equal(i.cpu(), want)
    assert_all_bitwise((v, i, o), ops.layerwise_topk([x], 0.5, largest), "cuda vs cpu")


def test_more_layers_than_one_launch_table(seed):
    """Hundreds of layers (a kernel-parameter table holds 39..102) and layers cut across launches."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3000, (400,), generator=gen).tolist() + [520 * CHUNK + 3, 5]
    kinds = ("normal", "ties", "scaled")
    xs = [layer((n,), torch.float32, kinds[j % 3], gen) for j, n in enumerate(sizes)]
    for ratio in (0.01, 0.3):
        assert_all_bitwise(ops.layerwise_topk(cuda(xs), ratio), ops.layerwise_topk(xs, ratio), "topk")
        assert_all_bitwise(ops.layerwise_topk_mask(cuda(xs), ratio), ops.layerwise_topk_mask(xs, ratio), "mask")
    grads = [torch.randn(x.shape, generator=gen) for x in xs]
    bufs = [torch.randn(x.shape, generator=gen) for x in xs]
    want_p, want_b = clone(xs), clone(bufs)
    ops.masked_sgd_(want_p, grads, want_b, None, ratio=0.05, lr=0.1, momentum=0.9, weight_decay=1e-3)
    got_p, got_b = cuda(xs), cuda(bufs)
    ops.masked_sgd_(got_p, cuda(grads), got_b, None, ratio=0.05, lr=0.1, momentum=0.9, weight_decay=1e-3)
    assert_all_bitwise(got_p, want_p, "params")
    assert_all_bitwise(got_b, want_b, "momentum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_outputs_fully_written_from_poisoned_memory(make_layers, seed, dtype):
    xs = make_layers(dtype, big=True)
    gen = torch.Generator().manual_seed(seed + 2)
    subs = [torch.randn(x.shape, generator=gen).to(dtype) for x in xs]
    for ratio, largest in ((0.2, True), (0.7, False)):
        want = ops.layerwise_topk(xs, ratio, largest, subs)
        want_m = ops.layerwise_topk_mask(xs, ratio, largest)
        xg, sg = cuda(xs), cuda(subs)
        with deterministic(fill=True):  # every at::empty of the op starts as NaN / INT_MAX / True
            got = ops.layerwise_topk(xg, ratio, largest, sg)
            got_m = ops.layerwise_topk_mask(xg, ratio, largest)
        assert_all_bitwise(got, want, "deterministic-fill topk")
        assert_all_bitwise(got_m, want_m, "deterministic-fill mask")
        total = int(want[2][-1])
        poison_allocator(total * want[0].element_size(), total * 4, *(x.numel() for x in xs))
        got = ops.layerwise_topk(xg, ratio, largest, sg)
        poison_allocator(*(x.numel() for x in xs))
        got_m = ops.layerwise_topk_mask(xg, ratio, largest)
        assert_all_bitwise(got, want, "0xFF-cache topk")
        assert_all_bitwise(got_m, want_m, "0xFF-cache mask")


def test_topk_empty_layers_only():
    xs = [torch.zeros(0, device="cuda"), torch.zeros(3, 0, device="cuda")]
    v, i, o = RAW.layerwise_topk(xs, 0.5, True, None)
    assert v.numel() == 0 and i.numel() == 0 and o.tolist() == [0, 0, 0]
    assert v.device.type == i.device.type == o.device.type == "cuda"
    assert [tuple(m.shape) for m in RAW.layerwise_topk_mask(xs, 0.5, True)] == [(0,), (3, 0)]


@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_topk_nonfinite_raises_naming_the_layer(bad):
    xs = [torch.randn(10, device="cuda"), torch.randn(CHUNK + 9, device="cuda")]
    xs[1][CHUNK + 3] = bad
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        RAW.layerwise_topk(xs, 0.5, True, None)
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        RAW.layerwise_topk_mask(xs, 0.5, True)
    subs = [torch.zeros_like(x) for x in xs]
    with pytest.raises(ValueError, match=r"xs - subtract\[1\]"):
        RAW.layerwise_topk(xs, 0.5, True, subs)


@pytest.mark.parametrize("ratio", (0.0, -0.1, 1.0001, float("nan")))
def test_bad_ratio_raises_on_cuda(ratio):
    xs = [torch.randn(5, device="cuda")]
    with pytest.raises(ValueError, match="ratio"):
        RAW.layerwise_topk(xs, ratio, True, None)
    with pytest.raises(ValueError, match="ratio"):
        RAW.layerwise_topk_mask(xs, ratio, True)
    with pytest.raises(ValueError, match="ratio"):
        RAW.masked_sgd_(clone(xs), xs, [], None, ratio, 0.1, 0.0, 0.0, 0.0, False, False, 0.0)


@large
def test_layer_of_2_31_elements_raises():
    x = torch.empty(2**31, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="2\\*\\*31"):
        RAW.layerwise_topk([x], 0.5, True, None)
    del x
    torch.cuda.empty_cache()


# ---- sparse_accumulate_ ------------------------------------------------------------------------------

SHAPES = [(0,), (1,), (), (5, 3), (17, 3, 3), (129,), (1000, 3), (CHUNK + 7,), (3 * CHUNK,)]


def _dense(dtype, gen, shapes=SHAPES):
    return [torch.randn(s, generator=gen).to(dtype) for s in shapes]


_ACC_TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("B", (1, 4))
@pytest.mark.parametrize("det", (False, True), ids=("default", "deterministic"))
def test_accumulate_matches_cpu_and_reference(seed, dtype, value_dtype, B, det):
    gen = torch.Generator().manual_seed(seed)
    dense = _dense(dtype, gen)
    values, indices, offsets = updates(dense, B, gen, value_dtype, ratio=0.4)
    alpha = float(torch.empty(()).uniform_(-2, 2, generator=gen))
    want = clone(dense)
    ops.sparse_accumulate_(want, values, indices, offsets, alpha)
    got = cuda(dense)
    with deterministic(fill=True) if det else contextlib.nullcontext():
        ops.sparse_accumulate_(got, values.cuda(), indices.cuda(), offsets.cuda(), alpha)
    if det or B == 1:  # the additions happen in the same order as on the CPU
        assert_all_bitwise(got, want, "cuda vs cpu")
    else:
        rtol, atol = _ACC_TOL[dtype]
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=rtol, atol=atol)
    ref = clone(dense)
    reference.sparse_accumulate_(ref, values, indices, offsets, alpha)
    for w, r in zip(want, ref):
        assert_step_close(w, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_repeated_unordered_indices(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    dense = _dense(dtype, gen)
    values, indices, offsets = updates(dense, 3, gen, torch.float32, repeats=True)
    want = clone(dense)
    ops.sparse_accumulate_(want, values, indices, offsets, -1.0)
    got = cuda(dense)
    ops.sparse_accumulate_(got, values.cuda(), indices.cuda(), offsets.cuda(), -1.0)
    rtol, atol = _ACC_TOL[dtype]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=rtol * 4, atol=atol * 4)


@pytest.mark.parametrize("repeats", (False, True))
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_deterministic_is_bitwise_reproducible(seed, repeats, dtype):
    gen = torch.Generator().manual_seed(seed)
    dense = _dense(dtype, gen, SHAPES + [(1_000_003,)])
    values, indices, offsets = updates(dense, 8, gen, torch.float32, ratio=0.6, repeats=repeats)
    args = (values.cuda(), indices.cuda(), offsets.cuda(), 0.75)
    runs = []
    for _ in range(3):
        d = cuda(dense)
        with deterministic(fill=False):
            ops.sparse_accumulate_(d, *args)
        runs.append(d)
    assert_all_bitwise(runs[1], runs[0], "run 2 vs run 1")
    assert_all_bitwise(runs[2], runs[0], "run 3 vs run 1")
    if not repeats:  # ordered, and the CPU kernel's arithmetic: equal to it as well
        want = clone(dense)
        ops.sparse_accumulate_(want, values, indices, offsets, 0.75)
        assert_all_bitwise(runs[0], want, "cuda vs cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", (1, 3))
def test_accumulate_leaves_untouched_positions_bit_exact(seed, dtype, B):
    """Positions no segment names hold NaN payloads before the call; they must keep them."""
    gen = torch.Generator().manual_seed(seed)
    dense = _dense(dtype, gen)
    values, indices, offsets = updates(dense, B, gen, torch.float32, ratio=0.2)
    L = len(dense)
    touched = [torch.zeros(d.numel(), dtype=torch.bool) for d in dense]
    for s in range(len(offsets) - 1):
        touched[s % L][indices[int(offsets[s]):int(offsets[s + 1])].long()] = True
    poisoned = [poison_where(d, ~t.view(d.shape)) for d, t in zip(dense, touched)]
    want = clone(poisoned)
    ops.sparse_accumulate_(want, values, indices, offsets, 1.5)
    got = cuda(poisoned)
    ops.sparse_accumulate_(got, values.cuda(), indices.cuda(), offsets.cuda(), 1.5)
    for l, (g, w, p, t) in enumerate(zip(got, want, poisoned, touched)):
        assert_bitwise(g.reshape(-1)[~t.cuda()], p.reshape(-1)[~t], f"untouched positions of layer {l}")
        assert not g.reshape(-1)[t.cuda()].isnan().any(), f"layer {l}"
        if B == 1:
            assert_bitwise(g, w, f"layer {l}")


def _bad_accumulate_cases(dense):
    f, i32, i64 = torch.float32, torch.int32, torch.int64
    return {
        "index too large": (torch.ones(2), torch.tensor([0, dense[0].numel()], dtype=i32), torch.tensor([0, 2, 2], dtype=i64)),
        "negative index": (torch.ones(2), torch.tensor([-1, 0], dtype=i32), torch.tensor([0, 1, 2], dtype=i64)),
        "negative offset": (torch.ones(3), torch.tensor([0, 1, 2], dtype=i32), torch.tensor([0, -5, 3], dtype=i64)),
        "decreasing offsets": (torch.ones(3), torch.tensor([0, 1, 2], dtype=i32), torch.tensor([0, 3, 2, 3, 3], dtype=i64)),
        "end != len(values)": (torch.ones(3), torch.tensor([0, 1, 2], dtype=i32), torch.tensor([0, 1, 2], dtype=i64)),
        "segments not a multiple of L": (torch.ones(3), torch.tensor([0, 1, 2], dtype=i32), torch.tensor([0, 1, 2, 3], dtype=i64)),
        "lengths differ": (torch.ones(3, dtype=f), torch.tensor([0, 1], dtype=i32), torch.tensor([0, 1, 2], dtype=i64)),
    }


@pytest.mark.parametrize("case", list(_bad_accumulate_cases([torch.zeros(4)]).keys()))
def test_accumulate_bad_input_raises_and_writes_nothing(case):
    dense = [torch.randn(4, device="cuda"), torch.randn(3, 2, device="cuda")]
    before = clone(dense)
    values, indices, offsets = _bad_accumulate_cases(dense)[case]
    with pytest.raises(ValueError):
        RAW.sparse_accumulate_(dense, values.cuda(), indices.cuda(), offsets.cuda(), 1.0)
    torch.cuda.synchronize()
    assert_all_bitwise(dense, before, case)


# ---- masked_sgd_ / masked_adam_ ------------------------------------------------------------------------

SGD_HP = (dict(momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False),
          dict(momentum=0.5, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=True),
          dict(momentum=0.0, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False))


def _sgd_state(make_layers, dtype, seed):
    gen = torch.Generator().manual_seed(seed + 3)
    params = make_layers(dtype, big=True)
    grads = [layer(p.shape, dtype, "normal", gen) for p in params]
    bufs = [layer(p.shape, dtype, "normal", gen) for p in params]
    masks = [torch.rand(p.shape, generator=gen) < 0.3 for p in params]
    return params, grads, bufs, masks


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", SGD_HP, ids=("nesterov-wd", "damp-max", "no-momentum"))
@pytest.mark.parametrize("off_scale", (0.0, 0.1, 1.0))
@pytest.mark.parametrize("given_masks", (False, True))
def test_masked_sgd_matches_cpu_and_reference(make_layers, seed, dtype, hp, off_scale, given_masks):
    params, grads, bufs, masks = _sgd_state(make_layers, dtype, seed)
    m = masks if given_masks else None
    kw = dict(ratio=0.25, lr=0.05, off_scale=off_scale, **hp)
    bufs_arg = bufs if hp["momentum"] else []
    want_p, want_b = clone(params), clone(bufs_arg)
    ops.masked_sgd_(want_p, grads, want_b, m, **kw)
    got_p, got_b = cuda(params), cuda(bufs_arg)
    ops.masked_sgd_(got_p, cuda(grads), got_b, cuda(m) if m else None, **kw)
    assert_all_bitwise(got_p, want_p, "params cuda vs cpu")
    assert_all_bitwise(got_b, want_b, "momentum cuda vs cpu")
    ref_p, ref_b = clone(params), clone(bufs_arg)
    reference.masked_sgd_(ref_p, grads, ref_b, m, kw["ratio"], kw["lr"], hp["momentum"], hp["dampening"],
                          hp["weight_decay"], hp["nesterov"], hp["maximize"], off_scale)
    for g, r in zip(got_p + got_b, ref_p + ref_b):
        assert_step_close(g.cpu(), r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("off_scale", (0.0, 0.1))
@pytest.mark.parametrize("given_masks", (False, True))
def test_masked_adam_matches_cpu_and_reference(make_layers, seed, dtype, off_scale, given_masks):
    params, grads, m1, masks = _sgd_state(make_layers, dtype, seed)
    m2 = [(b.float() ** 2).to(dtype) for b in m1]
    m = masks if given_masks else None
    kw = dict(ratio=0.25, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, step=3,
              maximize=False, off_scale=off_scale)
    want = [clone(params), clone(m1), clone(m2)]
    ops.masked_adam_(want[0], grads, want[1], want[2], m, **kw)
    got = [cuda(params), cuda(m1), cuda(m2)]
    ops.masked_adam_(got[0], cuda(grads), got[1], got[2], cuda(m) if m else None, **kw)
    for name, g, w in zip(("params", "exp_avgs", "exp_avg_sqs"), got, want):
        assert_all_bitwise(g, w, f"{name} cuda vs cpu")
    ref = [clone(params), clone(m1), clone(m2)]
    reference.masked_adam_(ref[0], grads, ref[1], ref[2], m, kw["ratio"], kw["lr"], kw["beta1"], kw["beta2"],
                           kw["eps"], kw["weight_decay"], kw["step"], kw["maximize"], off_scale)
    for gs, rs in zip(got, ref):
        for g, r in zip(gs, rs):
            assert_step_close(g.cpu(), r)


def test_masked_sgd_mixed_param_dtypes(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [layer((n,), dt, "normal", gen) for n, dt in ((300, torch.float32), (CHUNK + 5, torch.bfloat16),
                                                           (77, torch.float16), (5, torch.float32))]
    grads = [layer(p.shape, p.dtype, "normal", gen) for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    want_p, want_b = clone(params), clone(bufs)
    ops.masked_sgd_(want_p, grads, want_b, None, ratio=0.1, lr=0.1, momentum=0.9)
    got_p, got_b = cuda(params), cuda(bufs)
    ops.masked_sgd_(got_p, cuda(grads), got_b, None, ratio=0.1, lr=0.1, momentum=0.9)
    assert_all_bitwise(got_p, want_p, "params")
    assert_all_bitwise(got_b, want_b, "momentum")


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sgd_frozen_coordinates_keep_their_bits_over_many_steps(make_layers, seed, dtype):
    """off_scale = 0: weight decay, momentum and nesterov must not move a frozen coordinate — its param and
    buffer hold NaN payloads, which must survive 20 steps bit for bit (and never leak into the others)."""
    params, grads, bufs, masks = _sgd_state(make_layers, dtype, seed)
    params = [poison_where(p, ~m) for p, m in zip(params, masks)]
    bufs = [poison_where(b, ~m) for b, m in zip(bufs, masks)]
    frozen_p, frozen_b = clone(params), clone(bufs)
    gen = torch.Generator().manual_seed(seed + 4)
    got_p, got_b, mg = cuda(params), cuda(bufs), cuda(masks)
    want_p, want_b = clone(params), clone(bufs)
    for _ in range(20):
        g = [layer(p.shape, dtype, "normal", gen) for p in params]
        kw = dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=True, off_scale=0.0)
        ops.masked_sgd_(got_p, cuda(g), got_b, mg, **kw)
        ops.masked_sgd_(want_p, g, want_b, masks, **kw)
    for l, m in enumerate(masks):
        assert_bitwise(got_p[l][~mg[l]], frozen_p[l][~m], f"frozen params of layer {l}")
        assert_bitwise(got_b[l][~mg[l]], frozen_b[l][~m], f"frozen buffers of layer {l}")
        assert not got_p[l][mg[l]].isnan().any() and not got_b[l][mg[l]].isnan().any()
    assert_all_bitwise(got_p, want_p, "params cuda vs cpu")
    assert_all_bitwise(got_b, want_b, "momentum cuda vs cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_steps_frozen_by_topk_selection_keep_their_bits(make_layers, seed, dtype):
    """The same invariant when the op selects the top-|grad| itself (masks=None), SGD and Adam."""
    params, grads, bufs, _ = _sgd_state(make_layers, dtype, seed)
    sel = ops.layerwise_topk_mask(grads, 0.2)
    params = [poison_where(p, ~m) for p, m in zip(params, sel)]
    bufs = [poison_where(b, ~m) for b, m in zip(bufs, sel)]
    got_p, got_b = cuda(params), cuda(bufs)
    ops.masked_sgd_(got_p, cuda(grads), got_b, None, ratio=0.2, lr=0.1, momentum=0.9, weight_decay=0.1)
    want_p, want_b = clone(params), clone(bufs)
    ops.masked_sgd_(want_p, grads, want_b, None, ratio=0.2, lr=0.1, momentum=0.9, weight_decay=0.1)
    assert_all_bitwise(got_p, want_p, "sgd params")
    assert_all_bitwise(got_b, want_b, "sgd momentum")
    for l, m in enumerate(sel):
        assert_bitwise(got_p[l].cpu()[~m], params[l][~m], f"frozen params of layer {l}")
    sq = [poison_where(b.abs(), ~m) for b, m in zip(bufs, sel)]
    got = [cuda(params), cuda(bufs), cuda(sq)]
    ops.masked_adam_(got[0], cuda(grads), got[1], got[2], None, ratio=0.2, step=2)
    for l, m in enumerate(sel):
        for name, g, p in zip(("param", "exp_avg", "exp_avg_sq"), got, (params, bufs, sq)):
            assert_bitwise(g[l].cpu()[~m], p[l][~m], f"adam frozen {name} of layer {l}")


def test_masked_sgd_nonfinite_grad_raises_and_writes_nothing():
    params = [torch.randn(100, device="cuda"), torch.randn(CHUNK + 1, device="cuda")]
    grads = [torch.randn_like(p) for p in params]
    grads[1][CHUNK] = float("nan")
    bufs = [torch.randn_like(p) for p in params]
    before_p, before_b = clone(params), clone(bufs)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        RAW.masked_sgd_(params, grads, bufs, None, 0.5, 0.1, 0.9, 0.0, 0.1, False, False, 0.0)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        RAW.masked_adam_(params, grads, bufs, [b.abs() for b in bufs], None, 0.5, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1,
                         False, 0.0)
    torch.cuda.synchronize()
    assert_all_bitwise(params, before_p, "params")
    assert_all_bitwise(bufs, before_b, "momentum")


@large
def test_large_accumulate_and_masked_sgd(seed):
    gen = torch.Generator().manual_seed(seed)
    dense = [torch.randn(100_000_000, generator=gen), torch.randn(7, generator=gen)]
    values, indices, offsets = updates(dense, 2, gen, torch.float32, ratio=0.01)
    want = clone(dense)
    ops.sparse_accumulate_(want, values, indices, offsets, -1.0)
    got = cuda(dense)
    with deterministic(fill=False):
        ops.sparse_accumulate_(got, values.cuda(), indices.cuda(), offsets.cuda(), -1.0)
    assert_all_bitwise(got, want, "sparse_accumulate_")
    del got, want
    grads = [torch.randn(d.shape, generator=gen) for d in dense]
    bufs = [torch.zeros_like(d) for d in dense]
    want_p, want_b = clone(dense), clone(bufs)
    ops.masked_sgd_(want_p, grads, want_b, None, ratio=0.1, lr=0.1, momentum=0.9, weight_decay=1e-4)
    got_p, got_b = cuda(dense), cuda(bufs)
    ops.masked_sgd_(got_p, cuda(grads), got_b, None, ratio=0.1, lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert_all_bitwise(got_p, want_p, "params")
    assert_all_bitwise(got_b, want_b, "momentum")


# ---- devices and streams -------------------------------------------------------------------------------

def _mixed_device_calls():
    g, c = torch.randn(6, device="cuda"), torch.randn(6)
    i32 = torch.tensor([0, 1], dtype=torch.int32)
    off = torch.tensor([0, 2], dtype=torch.int64)
    return {
        "topk xs": lambda: RAW.layerwise_topk([g, c], 0.5, True, None),
        "topk xs cpu first": lambda: RAW.layerwise_topk([c, g], 0.5, True, None),
        "topk subtract": lambda: RAW.layerwise_topk([g], 0.5, True, [c]),
        "topk subtract on cuda": lambda: RAW.layerwise_topk([c], 0.5, True, [g]),
        "mask xs": lambda: RAW.layerwise_topk_mask([g, c], 0.5, True),
        "accumulate values": lambda: RAW.sparse_accumulate_([g.clone()], c[:2], i32.cuda(), off.cuda(), 1.0),
        "accumulate indices": lambda: RAW.sparse_accumulate_([g.clone()], g[:2], i32, off.cuda(), 1.0),
        "accumulate offsets": lambda: RAW.sparse_accumulate_([g.clone()], g[:2], i32.cuda(), off, 1.0),
        "accumulate dense": lambda: RAW.sparse_accumulate_([g.clone(), c.clone()], g[:2], i32.cuda(),
                                                           torch.tensor([0, 1, 2], device="cuda"), 1.0),
        "sgd grads": lambda: RAW.masked_sgd_([g.clone()], [c], [], None, 0.5, 0.1, 0.0, 0.0, 0.0, False, False, 0.0),
        "sgd params": lambda: RAW.masked_sgd_([c.clone()], [g], [], None, 0.5, 0.1, 0.0, 0.0, 0.0, False, False, 0.0),
        "sgd momentum": lambda: RAW.masked_sgd_([g.clone()], [g], [c.clone()], None, 0.5, 0.1, 0.9, 0.0, 0.0, False,
                                                False, 0.0),
        "sgd masks": lambda: RAW.masked_sgd_([g.clone()], [g], [], [c > 0], 0.5, 0.1, 0.0, 0.0, 0.0, False, False, 0.0),
        "adam state": lambda: RAW.masked_adam_([g.clone()], [g], [c.clone()], [g.clone()], None, 0.5, 1e-3, 0.9, 0.999,
                                               1e-8, 0.0, 1, False, 0.0),
    }


MIXED_CASES = ("topk xs", "topk xs cpu first", "topk subtract", "topk subtract on cuda", "mask xs",
               "accumulate values", "accumulate indices", "accumulate offsets", "accumulate dense", "sgd grads",
               "sgd params", "sgd momentum", "sgd masks", "adam state")


@pytest.mark.parametrize("case", MIXED_CASES)
def test_mixed_devices_raise_in_the_raw_ops(case):
    with pytest.raises(ValueError, match="(is on|device)"):
        _mixed_device_calls()[case]()


def test_mixed_devices_raise_in_the_wrappers():
    g, c = torch.randn(6, device="cuda"), torch.randn(6)
    with pytest.raises(ValueError):
        ops.layerwise_topk([g, c], 0.5)
    with pytest.raises(ValueError):
        ops.layerwise_topk([g], 0.5, subtract=[c])
    with pytest.raises(ValueError):
        ops.layerwise_topk_mask([c, g], 0.5)
    with pytest.raises(ValueError):
        ops.sparse_accumulate_([g], c[:1], torch.tensor([0], dtype=torch.int32), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        ops.masked_sgd_([g.clone()], [c], [], None, ratio=0.5)


def test_kernels_run_on_the_current_stream(seed):
    """Smoke test: inputs are written on a side stream behind a long sleep and the ops run inside
    torch.cuda.stream(side); results must be right. (Weak as a detector: the ops' small pageable
    host-to-device copies make the host wait for the side stream.)"""
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep not available")
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=gen) for n in (1000, CHUNK * 3 + 1)]
    grads = [torch.randn(x.shape, generator=gen) for x in xs]
    values, indices, offsets = updates(xs, 2, gen, torch.float32)
    want_topk = ops.layerwise_topk(xs, 0.1)
    want_acc = clone(xs)
    ops.sparse_accumulate_(want_acc, values, indices, offsets, 1.0)
    want_sgd = clone(xs)
    ops.masked_sgd_(want_sgd, grads, [], None, ratio=0.1, lr=0.1)
    side = torch.cuda.Stream()
    src, gsrc = cuda(xs), cuda(grads)
    dev = [torch.zeros(x.shape, device="cuda") for x in xs]
    gdev = [torch.zeros(x.shape, device="cuda") for x in xs]
    vi = (values.cuda(), indices.cuda(), offsets.cuda())
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        for d, x, gd, g in zip(dev, src, gdev, gsrc):
            d.copy_(x)
            gd.copy_(g)
        got_topk = ops.layerwise_topk(dev, 0.1)
        acc = clone(dev)
        ops.sparse_accumulate_(acc, *vi, 1.0)
        sgd = clone(dev)
        ops.masked_sgd_(sgd, gdev, [], None, ratio=0.1, lr=0.1)
    side.synchronize()
    assert_all_bitwise(got_topk, want_topk, "topk")
    assert_all_bitwise(acc, want_acc, "sparse_accumulate_")
    assert_all_bitwise(sgd, want_sgd, "masked_sgd_")

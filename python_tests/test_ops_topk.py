"""layerwise_topk / layerwise_topk_mask (docs/algorithms.md#the-selection-rule) against the pure-PyTorch
reference: random layer lists (fresh seed per test), odd sizes, empty and one-element layers, heavy ties, many
layers, the three dtypes, the ``subtract=`` form; opcheck; and every bad input raising a ValueError that names
it."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import DTYPES
from unlearn_ext import ops
from unlearn_ext.ops import reference

RATIOS = (1e-6, 0.1, 0.37, 0.999, 1.0)


def _assert_same(a, b):
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert torch.equal(u, v)


def _check_format(xs, ratio, out):
    values, indices, offsets = out
    assert indices.dtype == torch.int32 and offsets.dtype == torch.int64
    assert offsets.shape == (len(xs) + 1,) and int(offsets[0]) == 0
    assert values.numel() == indices.numel() == int(offsets[-1])
    for l, x in enumerate(xs):
        lo, hi = int(offsets[l]), int(offsets[l + 1])
        assert hi - lo == ops.keep_count(x.numel(), ratio)
        seg = indices[lo:hi]
        assert bool((seg[1:] > seg[:-1]).all()), "indices must ascend within a layer"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("largest", (True, False))
def test_topk_matches_reference(make_layers, op_device, dtype, largest):
    xs = [x.to(op_device) for x in make_layers(dtype)]
    for ratio in RATIOS:
        out = ops.layerwise_topk(xs, ratio, largest)
        _check_format(xs, ratio, out)
        _assert_same(out, reference.layerwise_topk(xs, ratio, largest))
        masks = ops.layerwise_topk_mask(xs, ratio, largest)
        ref_masks = reference.layerwise_topk_mask(xs, ratio, largest)
        assert len(masks) == len(xs)
        for m, r, x in zip(masks, ref_masks, xs):
            assert m.dtype == torch.bool and m.shape == x.shape
            assert torch.equal(m, r)


@pytest.mark.parametrize("largest", (True, False))
def test_big_layers_match_reference(make_layers, op_device, largest):
    # layers spanning several of the CPU kernel's 65536-element work items
    xs = [x.to(op_device) for x in make_layers(torch.float32, big=True)]
    for ratio in (0.01, 0.5):
        _assert_same(ops.layerwise_topk(xs, ratio, largest), reference.layerwise_topk(xs, ratio, largest))
    masks = ops.layerwise_topk_mask(xs, 0.1, largest)
    for m, r in zip(masks, reference.layerwise_topk_mask(xs, 0.1, largest)):
        assert torch.equal(m, r)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_subtract_matches_reference(make_layers, op_device, dtype, seed):
    after = [x.to(op_device) for x in make_layers(dtype)]
    gen = torch.Generator().manual_seed(seed + 1)
    before = [(x.float() + 0.1 * torch.randn(x.shape, generator=gen).to(x.device)).to(dtype) for x in after]
    for ratio in (0.01, 0.1, 0.5, 1.0):
        for largest in (True, False):
            out = ops.layerwise_topk(after, ratio, largest, subtract=before)
            _check_format(after, ratio, out)
            _assert_same(out, reference.layerwise_topk(after, ratio, largest, before))
            # and it is the selection of the materialised difference, with its signed values
            diff = [a - b for a, b in zip(after, before)]
            _assert_same(out, ops.layerwise_topk(diff, ratio, largest))


def test_many_layers(op_device, seed):
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 40, (400,), generator=gen).tolist()
    xs = [torch.randint(-2, 3, (n,), generator=gen).float().to(op_device) for n in sizes]
    for ratio in (0.05, 0.3, 1.0):
        _assert_same(ops.layerwise_topk(xs, ratio), reference.layerwise_topk(xs, ratio))


@pytest.mark.parametrize("n", (1, 2, 3, 1000, 65536, 65537, 140001))
def test_all_equal_layer_takes_lowest_indices(op_device, n):
    for v in (0.0, -0.0, 2.5):
        x = torch.full((n,), v, device=op_device)
        x[::2] = abs(v)  # mix +0.0 / -0.0: they are ties
        for ratio in (0.01, 0.33, 1.0):
            k = ops.keep_count(n, ratio)
            values, indices, offsets = ops.layerwise_topk([x], ratio)
            assert indices.tolist() == list(range(k))
            assert offsets.tolist() == [0, k]
            _, small_idx, _ = ops.layerwise_topk([x], ratio, largest=False)
            assert small_idx.tolist() == list(range(k))


def test_ties_split_across_work_items(op_device):
    # 3 x 65536 + 5 elements: threshold ties span several of the CPU kernel's work items.
    n = 3 * 65536 + 5
    x = torch.ones(n, device=op_device)
    x[torch.arange(0, n, 7, device=op_device)] = 2.0
    x[n - 1] = 3.0
    for ratio in (0.1, 0.2, 0.6):
        _assert_same(ops.layerwise_topk([x], ratio), reference.layerwise_topk([x], ratio))


def test_signed_values_and_magnitude_order(op_device):
    x = torch.tensor([0.5, -4.0, 3.0, -0.25, 4.0, 2.0**-100, -2.0**100], device=op_device)
    values, indices, _ = ops.layerwise_topk([x], 3 / 7)
    assert indices.tolist() == [1, 4, 6] and values.tolist() == [-4.0, 4.0, -2.0**100]
    values, indices, _ = ops.layerwise_topk([x], 2 / 7, largest=False)
    assert indices.tolist() == [3, 5]


def test_keep_count_rule():
    assert ops.keep_count(0, 0.5) == 0
    assert ops.keep_count(1, 1e-9) == 1
    assert ops.keep_count(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 keeps 3
    assert ops.keep_count(31, 0.1) == 4
    assert ops.keep_count(10, 1.0) == 10
    for n in (1, 7, 100, 12345):
        for r in (0.001, 0.25, 0.5, 0.75, 1.0):
            assert ops.keep_count(n, r) == min(n, max(1, math.ceil(round(r * n, 9))))


def test_empty_list_and_empty_layers(op_device):
    values, indices, offsets = ops.layerwise_topk([], 0.5)
    assert values.numel() == 0 and indices.numel() == 0 and offsets.tolist() == [0]
    xs = [torch.zeros(0, device=op_device), torch.zeros(3, 0, device=op_device)]
    values, indices, offsets = ops.layerwise_topk(xs, 0.5)
    assert values.numel() == 0 and offsets.tolist() == [0, 0, 0]
    assert [m.shape for m in ops.layerwise_topk_mask(xs, 0.5)] == [(0,), (3, 0)]


def test_non_contiguous_input_is_copied(op_device, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(37, 41, generator=gen).to(op_device)
    xs = [base.t(), base[:, ::3]]
    assert not xs[0].is_contiguous()
    _assert_same(ops.layerwise_topk(xs, 0.2), ops.layerwise_topk([x.contiguous() for x in xs], 0.2))


def test_thread_count_does_not_change_the_result(make_layers):
    xs = make_layers(torch.float32, big=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.layerwise_topk(xs, 0.1)
        torch.set_num_threads(max(2, threads))
        many = ops.layerwise_topk(xs, 0.1)
    finally:
        torch.set_num_threads(threads)
    _assert_same(one, many)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ratio", (0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf"), -float("inf")))
def test_bad_ratio(ratio):
    xs = [torch.randn(10)]
    for fn in (ops.layerwise_topk, ops.layerwise_topk_mask):
        with pytest.raises(ValueError, match="ratio"):
            fn(xs, ratio)


@pytest.mark.parametrize("ratio", (np.float32(0.3), np.float64(0.3), np.int64(1), 1, Fraction(3, 10)))
def test_ratio_may_be_any_real_number(ratio):
    """Issue 14: np.float32(0.5) was refused as a ratio."""
    xs = [torch.randn(10), torch.randn(4, 5)]
    _assert_same(ops.layerwise_topk(xs, ratio), ops.layerwise_topk(xs, float(ratio)))
    assert all(torch.equal(a, b) for a, b in zip(ops.layerwise_topk_mask(xs, ratio),
                                                 ops.layerwise_topk_mask(xs, float(ratio))))


@pytest.mark.parametrize("ratio", (True, np.True_, "0.5", None, [0.5], torch.tensor(0.5), 1 + 0j))
def test_ratio_that_is_no_real_number_is_refused(ratio):
    for fn in (ops.layerwise_topk, ops.layerwise_topk_mask):
        with pytest.raises(ValueError, match="ratio must be a real number"):
            fn([torch.randn(10)], ratio)


@pytest.mark.parametrize("ratio", (0.0, 1.5))
def test_bad_ratio_raw_op(compiled_backend, ratio):
    with pytest.raises(ValueError, match="ratio"):
        torch.ops.unlearn_ext.layerwise_topk([torch.randn(10)], ratio, True, None)
    with pytest.raises(ValueError, match="ratio"):
        torch.ops.unlearn_ext.layerwise_topk_mask([torch.randn(10)], ratio, True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
def test_nonfinite_raises_naming_the_layer(op_device, dtype, bad):
    xs = [torch.randn(5, device=op_device, dtype=dtype), torch.randn(70000, device=op_device, dtype=dtype),
          torch.randn(9, device=op_device, dtype=dtype)]
    xs[1][66000] = bad
    for ratio in (0.1, 1.0):  # also when the layer is kept whole
        with pytest.raises(ValueError, match=r"xs\[1\]"):
            ops.layerwise_topk(xs, ratio)
        with pytest.raises(ValueError, match=r"xs\[1\]"):
            ops.layerwise_topk_mask(xs, ratio)
    before = [torch.zeros_like(x) for x in xs]
    with pytest.raises(ValueError, match=r"subtract\[1\]|xs - subtract"):
        ops.layerwise_topk(xs, 0.5, subtract=before)


def test_subtract_overflow_to_inf_raises():
    big = torch.finfo(torch.float16).max
    xs = [torch.tensor([big, 1.0], dtype=torch.float16)]
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.layerwise_topk(xs, 0.5, subtract=[torch.tensor([-big, 0.0], dtype=torch.float16)])


@pytest.mark.parametrize("bad_dtype", (torch.float64, torch.int32, torch.int64, torch.bool))
def test_wrong_dtype(bad_dtype):
    xs = [torch.randn(4), torch.ones(4).to(bad_dtype)]
    for fn in (ops.layerwise_topk, ops.layerwise_topk_mask):
        with pytest.raises(ValueError, match=r"xs\[1\]"):
            fn(xs, 0.5)


def test_wrong_dtype_raw_op(compiled_backend):
    with pytest.raises(ValueError, match=r"xs\[0\]"):
        torch.ops.unlearn_ext.layerwise_topk([torch.randn(4).double()], 0.5, True, None)
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        torch.ops.unlearn_ext.layerwise_topk([torch.randn(4), torch.randn(4).half()], 0.5, True, None)


def test_mixed_dtypes_in_list():
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        ops.layerwise_topk([torch.randn(4), torch.randn(4, dtype=torch.float16)], 0.5)


def test_not_a_list():
    with pytest.raises(ValueError, match="xs"):
        ops.layerwise_topk(torch.randn(4), 0.5)
    with pytest.raises(ValueError, match=r"xs\[0\]"):
        ops.layerwise_topk([[1.0, 2.0]], 0.5)


def test_subtract_mismatches():
    xs = [torch.randn(4), torch.randn(3, 2)]
    with pytest.raises(ValueError, match="subtract"):
        ops.layerwise_topk(xs, 0.5, subtract=[torch.randn(4)])
    with pytest.raises(ValueError, match=r"subtract\[1\]"):
        ops.layerwise_topk(xs, 0.5, subtract=[torch.randn(4), torch.randn(6)])
    with pytest.raises(ValueError, match=r"subtract\[0\]"):
        ops.layerwise_topk(xs, 0.5, subtract=[torch.randn(4).half(), torch.randn(3, 2).half()])


def test_subtract_mismatches_raw_op(compiled_backend):
    op = torch.ops.unlearn_ext.layerwise_topk
    xs = [torch.randn(4), torch.randn(3, 2)]
    with pytest.raises(ValueError, match="subtract"):
        op(xs, 0.5, True, [torch.randn(4)])
    with pytest.raises(ValueError, match=r"subtract\[1\]"):
        op(xs, 0.5, True, [torch.randn(4), torch.randn(2, 3)])
    with pytest.raises(ValueError, match=r"subtract\[1\]"):
        op(xs, 0.5, True, [torch.randn(4), torch.randn(3, 2).bfloat16()])


def test_non_contiguous_raw_op(compiled_backend):
    """The raw op copies read-only inputs to contiguous memory, as the wrapper does, on either device."""
    op = torch.ops.unlearn_ext.layerwise_topk
    x, s = torch.randn(6, 5).t(), torch.randn(6, 5).t()
    _assert_same(op([x], 0.5, True, None), op([x.contiguous()], 0.5, True, None))
    _assert_same(op([x], 0.5, True, [s]), op([x.contiguous()], 0.5, True, [s.contiguous()]))
    mask = torch.ops.unlearn_ext.layerwise_topk_mask([x], 0.5, True)[0]
    assert mask.shape == x.shape and torch.equal(mask, reference.layerwise_topk_mask([x], 0.5)[0])


def test_mixed_devices():
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        ops.layerwise_topk([torch.randn(4), torch.randn(4, device="meta")], 0.5)
    with pytest.raises(ValueError, match=r"subtract\[0\]"):
        ops.layerwise_topk([torch.randn(4)], 0.5, subtract=[torch.randn(4, device="meta")])


@pytest.mark.parametrize("xs_device, subtract_device", (("cpu", "meta"), ("meta", "cpu")))
def test_mixed_devices_raw_op(compiled_backend, xs_device, subtract_device):
    """Issue 14: the device check comes before any device work, whichever kernel the call dispatches to
    (the fake kernel on meta tensors returned outputs for xs on meta and subtract on the CPU)."""
    xs, subtract = [torch.randn(4, device=xs_device)], [torch.randn(4, device=subtract_device)]
    with pytest.raises(ValueError, match=rf"layerwise_topk: subtract\[0\] is on {subtract_device} but xs\[0\] is "
                                         rf"on {xs_device}"):
        torch.ops.unlearn_ext.layerwise_topk(xs, 0.5, True, subtract)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_cpu_cuda():
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        ops.layerwise_topk([torch.randn(4), torch.randn(4, device="cuda")], 0.5)
    # Issue 14: xs on the CPU, subtract on CUDA raised a RuntimeError from the CUDA device guard.
    for fn in (ops.layerwise_topk, torch.ops.unlearn_ext.layerwise_topk):
        with pytest.raises(ValueError, match=r"subtract\[0\] is on cuda:0 but xs\[0\] is on cpu"):
            fn([torch.randn(4)], 0.5, True, [torch.randn(4, device="cuda")])


def test_too_many_elements():
    huge = torch.empty(2**31, device="meta")
    with pytest.raises(ValueError, match=r"xs\[0\].*2\*\*31"):
        ops.layerwise_topk([huge], 0.5)


# ---- opcheck ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(compiled_backend, op_device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=gen).to(dtype).to(op_device) for s in ((7, 3), (1,), (0,), (130,))]
    ss = [torch.randn(x.shape, generator=gen).to(dtype).to(op_device) for x in xs]
    torch.library.opcheck(torch.ops.unlearn_ext.layerwise_topk.default, (xs, 0.3, True, None))
    torch.library.opcheck(torch.ops.unlearn_ext.layerwise_topk.default, (xs, 0.3, False, ss))
    torch.library.opcheck(torch.ops.unlearn_ext.layerwise_topk_mask.default, (xs, 0.5, True))


@pytest.mark.parametrize("n", (2**14, 100003))
@pytest.mark.parametrize("largest", (True, False))
def test_unrepresentative_sample_still_exact(n, largest):
    """The CPU kernel brackets a big layer's threshold from 256 blocks of 16 evenly spaced entries; a layer
    whose sampled blocks look nothing like the rest must fall back to the exact radix select."""
    starts = [b * (n - 16) // 255 for b in range(256)]
    sampled = torch.zeros(n, dtype=torch.bool)
    for s in starts:
        sampled[s:s + 16] = True
    for inside, outside in ((0.0, 1.0), (5.0, 1.0), (1.0, torch.rand(n).add(0.5))):
        x = torch.where(sampled, torch.full((n,), inside), outside * torch.ones(n))
        for ratio in (0.01, 0.1, 0.5):
            _assert_same(ops.layerwise_topk([x], ratio, largest), reference.layerwise_topk([x], ratio, largest))

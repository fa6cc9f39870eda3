"""sparse_accumulate_ (docs/algorithms.md#sparse_accumulate_): B stored updates in one call equal their
sequential application and the reference, bitwise reproducible under deterministic algorithms; every bad input
raises a ValueError naming it and writes nothing."""
import pytest
import torch

from conftest import DTYPES
from unlearn_ext import ops
from unlearn_ext.ops import reference

SHAPES = [(0,), (1,), (), (5, 3), (17, 3, 3), (129,), (1000, 3), (70001,)]


def _dense(dtype, device, gen):
    return [torch.randn(s, generator=gen).to(dtype).to(device) for s in SHAPES]


def _updates(dense, B, gen, value_dtype, ratio=0.3, repeats=False):
    """B stored updates in the layerwise_topk format, concatenated: (values, indices, offsets)."""
    vals, idxs, offs = [], [], [0]
    for _ in range(B):
        xs = [torch.randn(d.shape, generator=gen).to(value_dtype) for d in dense]
        v, i, o = ops.layerwise_topk(xs, ratio)
        if repeats:  # unordered segments with repeated indices (not what layerwise_topk makes, still valid)
            perm_v, perm_i = [], []
            for l in range(len(dense)):
                seg = slice(int(o[l]), int(o[l + 1]))
                n = int(o[l + 1] - o[l])
                pick = torch.randint(0, max(n, 1), (2 * n,), generator=gen) if n else torch.zeros(0, dtype=torch.long)
                perm_v.append(v[seg][pick])
                perm_i.append(i[seg][pick])
            v, i = torch.cat(perm_v), torch.cat(perm_i)
            o = torch.tensor([0] + [sum(x.numel() for x in perm_i[:l + 1]) for l in range(len(dense))])
        vals.append(v)
        idxs.append(i)
        offs += (o[1:] + offs[-1]).tolist()
    device = dense[0].device
    return torch.cat(vals).to(device), torch.cat(idxs).to(device), torch.tensor(offs, dtype=torch.int64, device=device)


def _clone(ts):
    return [t.clone() for t in ts]


def _assert_equal(a, b):
    for x, y in zip(a, b):
        assert x.device == y.device
        if x.device.type != "meta":
            assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("value_dtype", DTYPES)
@pytest.mark.parametrize("repeats", (False, True))
def test_matches_reference(op_device, seed, dtype, value_dtype, repeats):
    gen = torch.Generator().manual_seed(seed)
    dense = _dense(dtype, op_device, gen)
    values, indices, offsets = _updates(dense, 3, gen, value_dtype, repeats=repeats)
    alpha = float(torch.empty(()).uniform_(-2, 2, generator=gen))
    got, want = _clone(dense), _clone(dense)
    ops.sparse_accumulate_(got, values, indices, offsets, alpha)
    reference.sparse_accumulate_(want, values, indices, offsets, alpha)
    if dtype == torch.float32:
        _assert_equal(got, want)
    else:  # one float32 sum per segment, rounded once per segment: equal to the reference
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("B", (1, 2, 5))
def test_batch_equals_sequential(op_device, seed, B):
    gen = torch.Generator().manual_seed(seed)
    dense = _dense(torch.float32, op_device, gen)
    values, indices, offsets = _updates(dense, B, gen, torch.float32)
    L = len(dense)
    batched, seq = _clone(dense), _clone(dense)
    ops.sparse_accumulate_(batched, values, indices, offsets, -1.0)
    for b in range(B):
        lo, hi = int(offsets[b * L]), int(offsets[(b + 1) * L])
        ops.sparse_accumulate_(seq, values[lo:hi], indices[lo:hi], offsets[b * L:(b + 1) * L + 1] - lo, -1.0)
    for x, y in zip(batched, seq):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
    # and the definition itself: dense[l].view(-1)[idx] += alpha * values, update after update
    manual = _clone(dense)
    for s in range(B * L):
        lo, hi = int(offsets[s]), int(offsets[s + 1])
        manual[s % L].view(-1)[indices[lo:hi].long()] += -1.0 * values[lo:hi]
    for x, y in zip(batched, manual):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_undoes_a_pruned_update(op_device, seed):
    gen = torch.Generator().manual_seed(seed)
    before = _dense(torch.float32, op_device, gen)
    after = [b + torch.randn(b.shape, generator=gen).to(op_device) for b in before]
    values, indices, offsets = ops.layerwise_topk(after, 1.0, subtract=before)
    restored = _clone(after)
    ops.sparse_accumulate_(restored, values, indices, offsets, -1.0)
    for r, b in zip(restored, before):
        torch.testing.assert_close(r, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_bitwise(op_device, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    dense = _dense(dtype, op_device, gen)
    values, indices, offsets = _updates(dense, 4, gen, torch.float32, repeats=True)
    was = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
        runs = []
        for t in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(t)
            out = _clone(dense)
            ops.sparse_accumulate_(out, values, indices, offsets, 0.7)
            runs.append(out)
    finally:
        torch.use_deterministic_algorithms(was)
        torch.set_num_threads(threads)
    for other in runs[1:]:
        _assert_equal(runs[0], other)


def test_empty_update_and_empty_segments(op_device):
    dense = [torch.randn(4, device=op_device), torch.zeros(0, device=op_device)]
    out = _clone(dense)
    ops.sparse_accumulate_(out, torch.zeros(0, device=op_device), torch.zeros(0, dtype=torch.int32, device=op_device),
                           torch.zeros(5, dtype=torch.int64, device=op_device), 1.0)
    _assert_equal(out, dense)
    ops.sparse_accumulate_(out, torch.zeros(0, device=op_device), torch.zeros(0, dtype=torch.int32, device=op_device),
                           torch.zeros(1, dtype=torch.int64, device=op_device), 1.0)
    _assert_equal(out, dense)


def test_mixed_layer_dtypes(op_device):
    dense = [torch.zeros(3, device=op_device), torch.zeros(2, dtype=torch.bfloat16, device=op_device)]
    ops.sparse_accumulate_(dense, torch.tensor([1.0, 2.0, 3.0], device=op_device),
                           torch.tensor([2, 0, 1], dtype=torch.int32, device=op_device),
                           torch.tensor([0, 1, 3], device=op_device), 2.0)
    assert dense[0].tolist() == [0.0, 0.0, 2.0] and dense[1].tolist() == [4.0, 6.0]


# ---- bad input: ValueError naming the argument, nothing written --------------------------------------

def _good(device="cpu"):
    dense = [torch.randn(5, device=device), torch.randn(2, 3, device=device)]
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    indices = torch.tensor([0, 4, 1, 5], dtype=torch.int32, device=device)
    offsets = torch.tensor([0, 2, 4], dtype=torch.int64, device=device)
    return dense, values, indices, offsets


def _raises_untouched(match, dense, values, indices, offsets, alpha=1.0, raw=False):
    snapshot = _clone(dense)
    fn = torch.ops.unlearn_ext.sparse_accumulate_ if raw else ops.sparse_accumulate_
    with pytest.raises(ValueError, match=match):
        fn(dense, values, indices, offsets, alpha)
    _assert_equal(dense, snapshot)


BAD_DATA = {
    "index_too_big": (lambda d, v, i, o: (d, v, torch.tensor([0, 5, 1, 5], dtype=torch.int32), o), "out of range"),
    "index_negative": (lambda d, v, i, o: (d, v, torch.tensor([0, 4, 1, -1], dtype=torch.int32), o),
                       "out of range"),
    "index_past_second_update": (lambda d, v, i, o: (d, torch.ones(6), torch.tensor([0, 1, 2, 3, 0, 6],
                                                                                     dtype=torch.int32),
                                                     torch.tensor([0, 2, 4, 4, 6])), "out of range"),
    "segments_not_multiple_of_L": (lambda d, v, i, o: (d, v, i, torch.tensor([0, 1, 2, 4])), "multiple"),
    "offsets_not_ending_at_len": (lambda d, v, i, o: (d, v, i, torch.tensor([0, 2, 3])), "offsets"),
    "offsets_not_starting_at_0": (lambda d, v, i, o: (d, v, i, torch.tensor([1, 2, 4])), "offsets"),
    "offsets_decreasing": (lambda d, v, i, o: (d, v, i, torch.tensor([0, 3, 2, 1, 4])), "offsets"),
    "offsets_empty": (lambda d, v, i, o: (d, v, i, torch.zeros(0, dtype=torch.int64)), "offsets"),
    "length_mismatch": (lambda d, v, i, o: (d, torch.ones(3), i, o), "values.*indices|indices.*values"),
}

BAD_META = {
    "indices_int64": (lambda d, v, i, o: (d, v, i.long(), o), "indices"),
    "offsets_int32": (lambda d, v, i, o: (d, v, i, o.int()), "offsets"),
    "values_float64": (lambda d, v, i, o: (d, v.double(), i, o), "values"),
    "values_2d": (lambda d, v, i, o: (d, v.view(2, 2), i, o), "values"),
    "dense_int": (lambda d, v, i, o: ([d[0], torch.zeros(2, 3, dtype=torch.int32)], v, i, o), r"dense\[1\]"),
    "dense_float64": (lambda d, v, i, o: ([d[0].double(), d[1]], v, i, o), r"dense\[0\]"),
    "dense_non_contiguous": (lambda d, v, i, o: ([d[0], torch.randn(3, 2).t()], v, i, o),
                             r"dense\[1\].*contiguous"),
    "dense_empty_list": (lambda d, v, i, o: ([], v, i, o), "dense"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
@pytest.mark.parametrize("raw", (False, True))
def test_bad_data_raises_and_writes_nothing(request, case, raw):
    if raw:
        request.getfixturevalue("compiled_backend")
    make, match = BAD_DATA[case]
    _raises_untouched(match, *make(*_good()), raw=raw)


@pytest.mark.parametrize("case", sorted(BAD_META))
@pytest.mark.parametrize("raw", (False, True))
def test_bad_metadata_raises_and_writes_nothing(request, case, raw):
    if raw:
        request.getfixturevalue("compiled_backend")
        if case == "dense_empty_list":
            pytest.skip("an empty Tensor[] has no device to dispatch on")
    make, match = BAD_META[case]
    _raises_untouched(match, *make(*_good()), raw=raw)


def test_bad_alpha():
    for alpha in (float("nan"), float("inf")):
        _raises_untouched("alpha", *_good(), alpha=alpha)


def test_not_tensors():
    dense, values, indices, offsets = _good()
    _raises_untouched("values", dense, values.tolist(), indices, offsets)
    _raises_untouched("dense", dense[0], values, indices, offsets)


@pytest.mark.parametrize("raw", (False, True))
def test_mixed_devices(request, raw):
    """Raw calls with a tensor on meta dispatch to the fake kernel, which returned without a word."""
    if raw:
        request.getfixturevalue("compiled_backend")
    dense, values, indices, offsets = _good()
    _raises_untouched("values is on meta but dense\\[0\\] is on cpu", dense, values.to("meta"), indices, offsets,
                      raw=raw)
    _raises_untouched("offsets is on meta", dense, values, indices, offsets.to("meta"), raw=raw)
    _raises_untouched(r"dense\[1\] is on meta", [dense[0], dense[1].to("meta")], values, indices, offsets, raw=raw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixed_cpu_cuda():
    dense, values, indices, offsets = _good()
    _raises_untouched("values", dense, values.cuda(), indices, offsets)
    snapshot = _clone(dense)
    with pytest.raises((ValueError, RuntimeError)):
        torch.ops.unlearn_ext.sparse_accumulate_(dense, values.cuda(), indices, offsets, 1.0)
    _assert_equal(dense, snapshot)


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(compiled_backend, op_device, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    dense = [torch.randn(s, generator=gen).to(dtype).to(op_device) for s in ((7, 3), (1,), (0,), (130,))]
    values, indices, offsets = _updates(dense, 2, gen, dtype)
    torch.library.opcheck(torch.ops.unlearn_ext.sparse_accumulate_.default,
                          (dense, values, indices, offsets, 0.5))

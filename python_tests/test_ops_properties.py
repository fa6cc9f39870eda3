"""Property tests (hypothesis): random layer counts, sizes including 0 and 1, the three dtypes, ratios,
heavy ties and extreme magnitudes (subnormals, +-max, signed zeros). Each op must agree with the
reference and keep its invariants. A fixed small example budget keeps the run short."""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from unlearn_ext import ops  # noqa: E402
from unlearn_ext.ops import reference  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _specials(dtype):
    fi = torch.finfo(dtype)
    return [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4 if dtype != torch.bfloat16 else fi.tiny / 2,
            fi.max, -fi.max, 1.0, -1.0, fi.eps, 2.0]


@st.composite
def layer_lists(draw, max_layers=6, max_size=300):
    dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    n_layers = draw(st.integers(0, max_layers))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(n_layers):
        n = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(0, max_size)))
        kind = draw(st.sampled_from(["normal", "ties", "extreme", "constant"]))
        if kind == "normal":
            x = torch.randn(n, generator=gen)
        elif kind == "ties":
            x = torch.randint(-2, 3, (n,), generator=gen).float()
        elif kind == "constant":
            x = torch.full((n,), draw(st.sampled_from([0.0, -0.0, 1.5])))
        else:
            specials = torch.tensor(_specials(dtype), dtype=torch.float64)
            x = specials[torch.randint(len(specials), (n,), generator=gen)]
        layers.append(x.to(dtype))
    return layers


ratios = st.one_of(st.sampled_from([1e-9, 0.01, 0.1, 0.5, 1.0]), st.floats(1e-6, 1.0, exclude_min=False))


@SETTINGS
@given(xs=layer_lists(), ratio=ratios, largest=st.booleans())
def test_topk_properties(xs, ratio, largest):
    values, indices, offsets = ops.layerwise_topk(xs, ratio, largest)
    ref = reference.layerwise_topk(xs, ratio, largest)
    assert torch.equal(values, ref[0]) and torch.equal(indices, ref[1]) and torch.equal(offsets, ref[2])
    masks = ops.layerwise_topk_mask(xs, ratio, largest)
    for l, x in enumerate(xs):
        lo, hi = int(offsets[l]), int(offsets[l + 1])
        k = ops.keep_count(x.numel(), ratio)
        assert hi - lo == k and int(masks[l].sum()) == k
        idx = indices[lo:hi].long()
        assert bool((idx[1:] > idx[:-1]).all())
        assert torch.equal(masks[l].view(-1).nonzero().view(-1), idx)
        assert torch.equal(values[lo:hi], x.view(-1)[idx])
        if 0 < k < x.numel():  # every kept |x| is at least (at most) every dropped |x|
            a = x.float().abs().view(-1)
            kept, dropped = a[idx], a[~masks[l].view(-1)]
            if largest:
                assert float(kept.min()) >= float(dropped.max())
            else:
                assert float(kept.max()) <= float(dropped.min())


@SETTINGS
@given(xs=layer_lists(max_layers=4), ratio=ratios, seed=st.integers(0, 2**31 - 1))
def test_topk_subtract_properties(xs, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    before = [(x.float() * torch.rand(x.shape, generator=gen)).to(x.dtype) for x in xs]
    diff = [x - b for x, b in zip(xs, before)]
    if not all(bool(torch.isfinite(d).all()) for d in diff):
        with pytest.raises(ValueError, match="NaN or Inf"):
            ops.layerwise_topk(xs, ratio, subtract=before)
        return
    got = ops.layerwise_topk(xs, ratio, subtract=before)
    for a, b in zip(got, ops.layerwise_topk(diff, ratio)):
        assert torch.equal(a, b)


@SETTINGS
@given(xs=layer_lists(max_layers=4, max_size=200), ratio=ratios, B=st.integers(1, 3),
       alpha=st.sampled_from([-1.0, 1.0, 0.5, -3.25]))
def test_accumulate_properties(xs, ratio, B, alpha):
    if not xs:
        return
    dense = [x.float().clamp(-1e30, 1e30) for x in xs]
    updates = [ops.layerwise_topk([x.float().clamp(-1e30, 1e30) for x in xs], ratio) for _ in range(B)]
    L = len(xs)
    values = torch.cat([u[0] for u in updates])
    indices = torch.cat([u[1] for u in updates])
    offs = [0]
    for u in updates:
        offs += (u[2][1:] + offs[-1]).tolist()
    offsets = torch.tensor(offs)
    got, want = [d.clone() for d in dense], [d.clone() for d in dense]
    ops.sparse_accumulate_(got, values, indices, offsets, alpha)
    reference.sparse_accumulate_(want, values, indices, offsets, alpha)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert len(offsets) - 1 == B * L


@SETTINGS
@given(xs=layer_lists(max_layers=4, max_size=200), ratio=ratios, momentum=st.sampled_from([0.0, 0.9]),
       off_scale=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2**31 - 1))
def test_masked_sgd_properties(xs, ratio, momentum, off_scale, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [x for x in xs]
    params = [torch.randn(x.shape, generator=gen).to(x.dtype) for x in xs]
    bufs = [torch.randn(x.shape, generator=gen).to(x.dtype) for x in xs] if momentum else []
    p1, b1 = [p.clone() for p in params], [b.clone() for b in bufs]
    p2, b2 = [p.clone() for p in params], [b.clone() for b in bufs]
    ops.masked_sgd_(p1, grads, b1, None, ratio, lr=1e-3, momentum=momentum, weight_decay=0.01,
                    off_scale=off_scale)
    reference.masked_sgd_(p2, grads, b2, None, ratio, 1e-3, momentum, 0.0, 0.01, False, False, off_scale)
    masks = ops.layerwise_topk_mask(grads, ratio)
    for a, b, m, p0 in zip(p1, p2, masks, params):
        if off_scale == 0.0:
            assert torch.equal(a[~m], p0[~m])
        both_finite = torch.isfinite(a) & torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b))
        torch.testing.assert_close(a[both_finite], b[both_finite], rtol=2e-2, atol=1e-5)
    for a, m, b0 in zip(b1, masks, bufs):
        if off_scale == 0.0:
            assert torch.equal(a[~m], b0[~m])

"""masked_sgd_ / masked_adam_ (docs/algorithms.md#masked_sgd_-and-masked_adam_): against the reference on random
inputs, against torch.optim.SGD and torch.optim.AdamW on the selected coordinates, the frozen-coordinate
invariant (param AND state bitwise unchanged where unselected, over 100 steps with weight decay + momentum +
nesterov), off_scale > 0, and every bad input raising a ValueError that names it while writing nothing."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import DTYPES, assert_step_close
from unlearn_ext import ops
from unlearn_ext.ops import reference

SHAPES = [(0,), (1,), (), (7,), (5, 3), (17, 3, 3), (129,), (300, 3), (70001,)]

SGD_HP = [dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
          dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False),
          dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=True),
          dict(lr=0.01, momentum=0.5, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=False)]
ADAM_HP = [dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, maximize=False),
           dict(lr=3e-3, beta1=0.5, beta2=0.9, eps=1e-6, weight_decay=0.0, maximize=True),
           dict(lr=1e-3, beta1=0.0, beta2=0.99, eps=1e-8, weight_decay=0.1, maximize=False)]


def _tensors(dtype, device, gen, scale=1.0, shapes=SHAPES):
    return [(scale * torch.randn(s, generator=gen)).to(dtype).to(device) for s in shapes]


def _clone(ts):
    return [t.clone() for t in ts]


def _masks(params, gen, p=0.3):
    return [(torch.rand(x.shape, generator=gen) < p).to(x.device) for x in params]


def _equal(a, b):
    return all(x.device == y.device and (x.device.type == "meta" or torch.equal(x, y)) for x, y in zip(a, b))


# ---- against the reference -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", range(len(SGD_HP)))
@pytest.mark.parametrize("off_scale", (0.0, 0.1, 1.0))
@pytest.mark.parametrize("given_masks", (False, True))
def test_sgd_matches_reference(op_device, seed, dtype, hp, off_scale, given_masks):
    gen = torch.Generator().manual_seed(seed)
    hp = SGD_HP[hp]
    params, grads = _tensors(dtype, op_device, gen), _tensors(dtype, op_device, gen)
    bufs = _tensors(dtype, op_device, gen, 0.1) if hp["momentum"] else []
    masks = _masks(params, gen) if given_masks else None
    p1, b1, p2, b2 = _clone(params), _clone(bufs), _clone(params), _clone(bufs)
    ops.masked_sgd_(p1, grads, b1, masks, 0.1, off_scale=off_scale, **hp)
    reference.masked_sgd_(p2, grads, b2, masks, 0.1, hp["lr"], hp["momentum"], hp["dampening"],
                          hp["weight_decay"], hp["nesterov"], hp["maximize"], off_scale)
    for a, b in zip(p1 + b1, p2 + b2):
        assert_step_close(a, b)
    if off_scale == 0.0:  # the frozen coordinates are bitwise untouched
        sel = masks if given_masks else ops.layerwise_topk_mask(grads, 0.1)
        for new, old, m in zip(p1, params, sel):
            assert torch.equal(new[~m], old[~m])
        for new, old, m in zip(b1, bufs, sel):
            assert torch.equal(new[~m], old[~m])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hp", range(len(ADAM_HP)))
@pytest.mark.parametrize("off_scale", (0.0, 0.1, 1.0))
@pytest.mark.parametrize("given_masks", (False, True))
def test_adam_matches_reference(op_device, seed, dtype, hp, off_scale, given_masks):
    gen = torch.Generator().manual_seed(seed)
    hp = ADAM_HP[hp]
    params, grads = _tensors(dtype, op_device, gen), _tensors(dtype, op_device, gen)
    m1 = _tensors(dtype, op_device, gen, 0.1)
    m2 = [t.abs() for t in _tensors(dtype, op_device, gen, 0.01)]
    masks = _masks(params, gen) if given_masks else None
    step = int(torch.randint(1, 50, (1,), generator=gen))
    s1, s2 = _clone(params + m1 + m2), _clone(params + m1 + m2)
    L = len(params)
    ops.masked_adam_(s1[:L], grads, s1[L:2 * L], s1[2 * L:], masks, 0.25, step=step, off_scale=off_scale, **hp)
    reference.masked_adam_(s2[:L], grads, s2[L:2 * L], s2[2 * L:], masks, 0.25, hp["lr"], hp["beta1"],
                           hp["beta2"], hp["eps"], hp["weight_decay"], step, hp["maximize"], off_scale)
    for a, b in zip(s1, s2):
        assert_step_close(a, b)
    if off_scale == 0.0:
        sel = masks if given_masks else ops.layerwise_topk_mask(grads, 0.25)
        for new, old, m in zip(s1, params + m1 + m2, sel * 3):
            assert torch.equal(new[~m], old[~m])


def test_ratio_selection_equals_given_topk_masks(seed):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _tensors(torch.float32, "cpu", gen), _tensors(torch.float32, "cpu", gen)
    bufs = _tensors(torch.float32, "cpu", gen)
    a, ab, b, bb = _clone(params), _clone(bufs), _clone(params), _clone(bufs)
    ops.masked_sgd_(a, grads, ab, None, 0.2, lr=0.1, momentum=0.9, weight_decay=0.1)
    ops.masked_sgd_(b, grads, bb, ops.layerwise_topk_mask(grads, 0.2), 0.2, lr=0.1, momentum=0.9,
                    weight_decay=0.1)
    assert _equal(a, b) and _equal(ab, bb)


# ---- against torch.optim ---------------------------------------------------------------------------

def test_sgd_frozen_invariant_100_steps(seed):
    """100 steps, weight decay + momentum + nesterov, a fixed mask: unselected params and momentum buffers
    never move (bitwise), selected ones follow torch.optim.SGD run on the same gradients."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (13, 5), (3, 3, 3, 2), (1000,)]
    params = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    masks = _masks(params, gen, 0.4)
    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.05, nesterov=True)
    ours = _clone(params)
    bufs = [torch.zeros_like(p) for p in params]  # zero buffers + dampening 0 = torch's first step buf = d
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(theirs, **hp)
    for _ in range(100):
        grads = _tensors(torch.float32, "cpu", gen, shapes=shapes)
        ops.masked_sgd_(ours, grads, bufs, masks, 1.0, **hp)
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        for p, p0, b, m in zip(ours, params, bufs, masks):
            assert torch.equal(p[~m], p0[~m])
            assert bool((b[~m] == 0).all()) and not bool(torch.signbit(b[~m]).any())
    for p, t, b, m in zip(ours, theirs, bufs, masks):
        torch.testing.assert_close(p[m], t.detach()[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b[m], opt.state[t]["momentum_buffer"][m], rtol=1e-5, atol=1e-6)


def test_sgd_frozen_invariant_with_moving_topk_selection(seed):
    """The mask recomputed each step from |grad| (ratio form): whatever is not selected this step keeps
    its param and buffer bits."""
    gen = torch.Generator().manual_seed(seed)
    shapes = SHAPES[:-1]
    params = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    bufs = _tensors(torch.float32, "cpu", gen, 0.1, shapes=shapes)
    for _ in range(10):
        grads = _tensors(torch.float32, "cpu", gen, shapes=shapes)
        before_p, before_b = _clone(params), _clone(bufs)
        ops.masked_sgd_(params, grads, bufs, None, 0.05, lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True)
        for p, p0, b, b0, m in zip(params, before_p, bufs, before_b, ops.layerwise_topk_mask(grads, 0.05)):
            assert torch.equal(p[~m], p0[~m]) and torch.equal(b[~m], b0[~m])
            assert p.numel() == 0 or not torch.equal(p[m], p0[m])


@pytest.mark.parametrize("hp", SGD_HP)
def test_sgd_full_mask_equals_torch_sgd(seed, hp):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (13, 5), (1000,)]
    params = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    ours, bufs = _clone(params), [torch.zeros_like(p) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(theirs, **hp)
    for step in range(10):
        grads = _tensors(torch.float32, "cpu", gen, shapes=shapes)
        # torch's first step sets buf = d (no dampening): zero buffers with dampening 0 give exactly that
        damp = 0.0 if step == 0 else hp["dampening"]
        ops.masked_sgd_(ours, grads, bufs if hp["momentum"] else [], None, 1.0,
                        **{**hp, "dampening": damp})
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
    for p, t in zip(ours, theirs):
        torch.testing.assert_close(p, t.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hp", ADAM_HP)
def test_adam_matches_torch_adamw_on_selected(seed, hp):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1,), (7,), (13, 5), (500,)]
    params = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    masks = _masks(params, gen, 0.5)
    ours = _clone(params)
    m1, m2 = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(theirs, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], maximize=hp["maximize"])
    for step in range(1, 31):
        grads = _tensors(torch.float32, "cpu", gen, shapes=shapes)
        ops.masked_adam_(ours, grads, m1, m2, masks, 1.0, step=step, **hp)
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        for p, p0, a, b, m in zip(ours, params, m1, m2, masks):
            assert torch.equal(p[~m], p0[~m])
            assert bool((a[~m] == 0).all()) and bool((b[~m] == 0).all())
    for p, t, a, b, m in zip(ours, theirs, m1, m2, masks):
        st = opt.state[t]
        torch.testing.assert_close(p[m], t.detach()[m], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[m], st["exp_avg"][m], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b[m], st["exp_avg_sq"][m], rtol=1e-5, atol=1e-9)


def test_off_scale_positive_is_sgd_on_scaled_gradient(seed):
    """off_scale > 0: unselected coordinates take an ordinary SGD step (weight decay and momentum
    included) on off_scale * grad; selected ones on grad."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7,), (40, 3)]
    params = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    masks = _masks(params, gen, 0.3)
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False)
    ours, bufs = _clone(params), [torch.zeros_like(p) for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(theirs, **hp)
    for _ in range(5):
        grads = _tensors(torch.float32, "cpu", gen, shapes=shapes)
        ops.masked_sgd_(ours, grads, bufs, masks, 1.0, off_scale=0.1, **hp)
        for t, g, m in zip(theirs, grads, masks):
            t.grad = torch.where(m, g, g * 0.1)
        opt.step()
    for p, p0, t in zip(ours, params, theirs):
        torch.testing.assert_close(p, t.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(p, p0)


def test_off_scale_one_ignores_mask(seed):
    gen = torch.Generator().manual_seed(seed)
    params, grads = _tensors(torch.float32, "cpu", gen), _tensors(torch.float32, "cpu", gen)
    a, b = _clone(params), _clone(params)
    ops.masked_sgd_(a, grads, [], _masks(params, gen), 1.0, lr=0.1, off_scale=1.0)
    ops.masked_sgd_(b, grads, [], None, 1.0, lr=0.1)
    assert _equal(a, b)


# ---- bad input: ValueError naming the argument, nothing written --------------------------------------

def _sgd_args(gen=None):
    gen = gen or torch.Generator().manual_seed(0)
    shapes = [(5,), (2, 3)]
    params = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    grads = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    bufs = _tensors(torch.float32, "cpu", gen, shapes=shapes)
    return params, grads, bufs


def _sgd_untouched(match, params, grads, bufs, masks=None, ratio=0.5, raw=False, **kw):
    hp = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False, maximize=False,
              off_scale=0.0)
    hp.update(kw)
    snap = _clone(params), _clone(bufs)
    with pytest.raises(ValueError, match=match):
        if raw:
            torch.ops.unlearn_ext.masked_sgd_(params, grads, bufs, masks, ratio, hp["lr"], hp["momentum"],
                                              hp["dampening"], hp["weight_decay"], hp["nesterov"],
                                              hp["maximize"], hp["off_scale"])
        else:
            ops.masked_sgd_(params, grads, bufs, masks, ratio, **hp)
    assert _equal(params, snap[0]) and _equal(bufs, snap[1])


BAD_SGD = {
    "grads_length": (lambda p, g, b: (p, g[:1], b, None, {}), "grads"),
    "grads_shape": (lambda p, g, b: (p, [g[0], torch.randn(3, 2)], b, None, {}), r"grads\[1\]"),
    "grads_dtype": (lambda p, g, b: (p, [g[0], g[1].half()], b, None, {}), r"grads\[1\]"),
    "buffers_missing": (lambda p, g, b: (p, g, [], None, {}), "momentum_buffers"),
    "buffers_shape": (lambda p, g, b: (p, g, [b[0], torch.randn(6)], None, {}), r"momentum_buffers\[1\]"),
    "buffers_dtype": (lambda p, g, b: (p, g, [b[0].bfloat16(), b[1]], None, {}), r"momentum_buffers\[0\]"),
    "params_float64": (lambda p, g, b: ([p[0].double(), p[1]], [g[0].double(), g[1]], b, None, {}),
                       r"params\[0\]"),
    "params_int": (lambda p, g, b: ([p[0].int(), p[1]], g, b, None, {}), r"params\[0\]"),
    "masks_dtype": (lambda p, g, b: (p, g, b, [torch.ones(5), torch.ones(2, 3)], {}), r"masks\[0\]"),
    "masks_shape": (lambda p, g, b: (p, g, b, [torch.ones(5, dtype=torch.bool), torch.ones(6, dtype=torch.bool)],
                                     {}), r"masks\[1\]"),
    "masks_length": (lambda p, g, b: (p, g, b, [torch.ones(5, dtype=torch.bool)], {}), "masks"),
    "grads_nan": (lambda p, g, b: (p, [g[0], torch.tensor([[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])], b,
                                   None, {}), r"grads\[1\]"),
    "grads_inf": (lambda p, g, b: (p, [torch.tensor([1.0, 2.0, -float("inf"), 0.0, 0.0]), g[1]], b, None, {}),
                  r"grads\[0\]"),
    "ratio_zero": (lambda p, g, b: (p, g, b, None, {"ratio": 0.0}), "ratio"),
    "ratio_above_one": (lambda p, g, b: (p, g, b, None, {"ratio": 1.5}), "ratio"),
    "params_non_contiguous": (lambda p, g, b: ([p[0], torch.randn(3, 2).t()], g, b, None, {}),
                              r"params\[1\].*contiguous"),
    "buffers_non_contiguous": (lambda p, g, b: (p, g, [b[0], torch.randn(3, 2).t()], None, {}),
                               r"momentum_buffers\[1\].*contiguous"),
    "lr_negative": (lambda p, g, b: (p, g, b, None, {"lr": -0.1}), "lr"),
    "lr_nan": (lambda p, g, b: (p, g, b, None, {"lr": float("nan")}), "lr"),
    "nesterov_with_dampening": (lambda p, g, b: (p, g, b, None, {"nesterov": True, "dampening": 0.5}),
                                "nesterov"),
    "ratio_nan": (lambda p, g, b: (p, g, b, None, {"ratio": float("nan")}), "ratio"),
    "params_device": (lambda p, g, b: ([p[0], p[1].to("meta")], g, b, None, {}), r"params\[1\]"),
    "grads_device": (lambda p, g, b: (p, [g[0], g[1].to("meta")], b, None, {}), r"grads\[1\]"),
}


def _run_bad_sgd(table, case, raw):
    make, match = table[case]
    p, g, b, masks, kw = make(*_sgd_args())
    _sgd_untouched(match, p, g, b, masks, raw=raw, **kw)


@pytest.mark.parametrize("case", sorted(BAD_SGD))
@pytest.mark.parametrize("raw", (False, True))
def test_sgd_bad_input(request, case, raw):
    if raw:
        request.getfixturevalue("compiled_backend")
    _run_bad_sgd(BAD_SGD, case, raw)


def test_sgd_momentum_buffers_none():
    """Issue 14: momentum_buffers=None raised a TypeError; with momentum 0 it means no buffers."""
    p, g, _ = _sgd_args()
    a, c = _clone(p), _clone(p)
    ops.masked_sgd_(a, g, None, None, 0.5, lr=0.1)
    ops.masked_sgd_(c, g, [], None, 0.5, lr=0.1)
    assert _equal(a, c) and not _equal(a, p)
    before = _clone(p)
    with pytest.raises(ValueError, match="momentum_buffers is None but momentum = 0.9"):
        ops.masked_sgd_(p, g, None, None, 0.5, lr=0.1, momentum=0.9)
    assert _equal(p, before)


@pytest.mark.parametrize("lr", (np.float32(0.1), np.float64(0.1), Fraction(1, 10)))
def test_hyper_parameters_may_be_any_real_number(lr):
    p, g, b = _sgd_args()
    a, ab, c, cb = _clone(p), _clone(b), _clone(p), _clone(b)
    ops.masked_sgd_(a, g, ab, None, np.float32(0.5), lr=lr, momentum=np.float64(0.9))
    ops.masked_sgd_(c, g, cb, None, 0.5, lr=float(lr), momentum=0.9)
    assert _equal(a, c) and _equal(ab, cb)


@pytest.mark.parametrize("name", ("lr", "momentum", "weight_decay", "off_scale"))
@pytest.mark.parametrize("bad", (True, "0.1", None))
def test_hyper_parameters_that_are_no_real_numbers_are_refused(name, bad):
    p, g, b = _sgd_args()
    _sgd_untouched(f"{name} must be a real number", p, g, b, **{name: bad})


def test_sgd_non_contiguous_raw(compiled_backend):
    """The raw op refuses a non-contiguous tensor it writes and copies one it only reads."""
    p, g, b = _sgd_args()
    _sgd_untouched(r"params\[1\].*contiguous", [p[0], torch.randn(3, 2).t()], g, b, raw=True)
    _sgd_untouched(r"momentum_buffers\[1\].*contiguous", p, g, [b[0], torch.randn(3, 2).t()], raw=True)
    hyper = (0.5, 0.1, 0.9, 0.0, 0.0, False, False, 0.0)
    a, ab, c, cb = _clone(p), _clone(b), _clone(p), _clone(b)
    torch.ops.unlearn_ext.masked_sgd_(a, [g[0], g[1].t().contiguous().t()], ab, None, *hyper)
    torch.ops.unlearn_ext.masked_sgd_(c, g, cb, None, *hyper)
    assert _equal(a, c) and _equal(ab, cb)


def test_sgd_non_contiguous_grads_are_copied(seed):
    gen = torch.Generator().manual_seed(seed)
    p, g, b = _sgd_args(gen)
    a, ab = _clone(p), _clone(b)
    ops.masked_sgd_(a, [g[0], g[1].t().contiguous().t()], ab, None, 0.5, lr=0.1, momentum=0.9)
    c, cb = _clone(p), _clone(b)
    ops.masked_sgd_(c, g, cb, None, 0.5, lr=0.1, momentum=0.9)
    assert _equal(a, c) and _equal(ab, cb)


def _adam_untouched(match, params, grads, m1, m2, masks=None, ratio=0.5, step=1, beta1=0.9, raw=False):
    snap = _clone(params), _clone(m1), _clone(m2)
    with pytest.raises(ValueError, match=match):
        if raw:
            torch.ops.unlearn_ext.masked_adam_(params, grads, m1, m2, masks, ratio, 1e-3, beta1, 0.999, 1e-8, 0.01,
                                               step, False, 0.0)
        else:
            ops.masked_adam_(params, grads, m1, m2, masks, ratio, step=step, beta1=beta1)
    assert _equal(params, snap[0]) and _equal(m1, snap[1]) and _equal(m2, snap[2])


@pytest.mark.parametrize("raw", (False, True))
def test_adam_bad_input(request, raw):
    if raw:
        request.getfixturevalue("compiled_backend")
    p, g, m1 = _sgd_args()
    m2 = [t.abs() for t in m1]
    _adam_untouched("exp_avgs", p, g, m1[:1], m2, raw=raw)
    _adam_untouched(r"exp_avg_sqs\[1\]", p, g, m1, [m2[0], torch.ones(6)], raw=raw)
    _adam_untouched(r"exp_avgs\[0\]", p, g, [m1[0].half(), m1[1]], m2, raw=raw)
    _adam_untouched(r"grads\[0\]", p, [torch.full((5,), float("nan")), g[1]], m1, m2, raw=raw)
    _adam_untouched(r"masks\[1\]", p, g, m1, m2, masks=[torch.ones(5, dtype=torch.bool), torch.ones(2, 3)],
                    raw=raw)
    _adam_untouched("ratio", p, g, m1, m2, ratio=-1.0, raw=raw)
    _adam_untouched("step", p, g, m1, m2, step=0, raw=raw)
    _adam_untouched(r"exp_avgs\[1\].*contiguous", p, g, [m1[0], torch.randn(3, 2).t()], m2, raw=raw)
    _adam_untouched("beta1", p, g, m1, m2, beta1=1.0, raw=raw)
    if not raw:
        _adam_untouched("step must be an integer", p, g, m1, m2, step=1.5)


def test_empty_param_list_is_a_no_op():
    """No layers: nothing to step and nothing raised — but the arguments are still checked first."""
    assert ops.masked_sgd_([], [], [], None, 0.5, lr=0.1) is None
    assert ops.masked_adam_([], [], [], [], None, 0.5) is None
    with pytest.raises(ValueError, match=r"masked_sgd_: ratio must be in \(0, 1\], got -1.0"):
        ops.masked_sgd_([], [], [], None, -1.0, lr=0.1)
    with pytest.raises(ValueError, match="masked_sgd_: grads has 1 tensors but params has 0"):
        ops.masked_sgd_([], [torch.zeros(2)], [], None, 0.5, lr=0.1)
    with pytest.raises(ValueError, match=r"masked_adam_: beta1 must be in \[0, 1\), got 1.0"):
        ops.masked_adam_([], [], [], [], None, 0.5, beta1=1.0)


# ---- opcheck ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(compiled_backend, op_device, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (1,), (0,), (130,)]
    params, grads = _tensors(dtype, op_device, gen, shapes=shapes), _tensors(dtype, op_device, gen, shapes=shapes)
    bufs = _tensors(dtype, op_device, gen, shapes=shapes)
    m2 = [t.abs() for t in _tensors(dtype, op_device, gen, shapes=shapes)]
    masks = _masks(params, gen)
    torch.library.opcheck(torch.ops.unlearn_ext.masked_sgd_.default,
                          (params, grads, bufs, None, 0.3, 0.1, 0.9, 0.0, 0.01, True, False, 0.0))
    torch.library.opcheck(torch.ops.unlearn_ext.masked_sgd_.default,
                          (params, grads, [], masks, 1.0, 0.1, 0.0, 0.0, 0.0, False, True, 0.1))
    torch.library.opcheck(torch.ops.unlearn_ext.masked_adam_.default,
                          (params, grads, bufs, m2, None, 0.3, 1e-3, 0.9, 0.999, 1e-8, 0.01, 3, False, 0.0))
    torch.library.opcheck(torch.ops.unlearn_ext.masked_adam_.default,
                          (params, grads, bufs, m2, masks, 1.0, 1e-3, 0.9, 0.999, 1e-8, 0.0, 1, True, 0.5))

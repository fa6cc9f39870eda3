"""PartialSGD / PartialAdamW: torch parity at keep_ratio 1, the partial-update contract, state round trips."""
import copy

import pytest
import torch
from torch import nn

from unlearn_ext import ops
from unlearn_ext.optim import PartialAdamW, PartialSGD

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def _batches(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 5, (8,), generator=g)) for _ in range(n)]


def _step(model, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


SGD_CASES = [dict(lr=0.1), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.3),
             dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.05, momentum=0.5, weight_decay=0.01),
             dict(lr=0.05, momentum=0.9, weight_decay=0.01, maximize=True)]
ADAMW_CASES = [dict(), dict(lr=0.01, weight_decay=0.1), dict(lr=0.01, betas=(0.5, 0.9), eps=1e-6),
               dict(lr=0.003, maximize=True, weight_decay=0.0)]


def _parity(ours_cls, torch_cls, kw):
    a, b = _model(), _model()
    oa, ob = ours_cls(a.parameters(), **kw), torch_cls(b.parameters(), **kw)
    for t, (x, y) in enumerate(_batches(50)):
        _step(a, oa, x, y)
        _step(b, ob, x, y)
        # Last-bit rounding differences (torch's vectorised kernels fuse multiply-adds, the compiled ones
        # round each operation) compound along a training trajectory: tight for 20 steps, then looser.
        tol = dict(rtol=1e-5, atol=1e-7) if t < 20 else dict(rtol=1e-4, atol=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, **tol)
    return oa, ob


@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_matches_torch_at_full_ratio(kw):
    oa, ob = _parity(PartialSGD, torch.optim.SGD, kw)
    if kw.get("momentum"):
        for p, q in zip(oa.param_groups[0]["params"], ob.param_groups[0]["params"]):
            torch.testing.assert_close(oa.state[p]["momentum_buffer"], ob.state[q]["momentum_buffer"],
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kw", ADAMW_CASES)
def test_adamw_matches_torch_at_full_ratio(kw):
    _parity(PartialAdamW, torch.optim.AdamW, kw)


@pytest.mark.parametrize("cls,tcls,kw", [(PartialSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
                                         (PartialAdamW, torch.optim.AdamW, dict(lr=0.01))])
def test_param_without_grad_at_first_step_matches_torch(cls, tcls, kw):
    """A tensor that first gets a gradient at step 2 starts its state then, as in torch (separate call)."""
    a, b = _model(), _model()
    oa, ob = cls(a.parameters(), **kw), tcls(b.parameters(), **kw)
    for i, (x, y) in enumerate(_batches(6)):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            if i == 0:
                m[2].bias.grad = None
            o.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def _changes_at_most_k(cls, kw, ratio):
    model = _model()
    opt = cls(model.parameters(), keep_ratio=ratio, **kw)
    state_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq")
    for x, y in _batches(8):
        before = [p.detach().clone() for p in model.parameters()]
        states = [{k: opt.state[p][k].clone() for k in state_keys if k in opt.state[p]} for p in model.parameters()]
        _step(model, opt, x, y)
        for p, b, st in zip(model.parameters(), before, states):
            changed = p.detach() != b
            assert int(changed.sum()) <= ops.keep_count(p.numel(), ratio)
            frozen = ~changed
            for k, old in st.items():  # optimizer state of a frozen coordinate is untouched too
                new = opt.state[p][k]
                sel = frozen & (new != old)
                assert not sel.any(), f"{k} moved on a frozen coordinate"
            if "momentum_buffer" in opt.state[p]:  # a coordinate whose buffer moved must be one that moved
                assert int((opt.state[p]["momentum_buffer"] != st.get("momentum_buffer", 0)).sum()) <= \
                    ops.keep_count(p.numel(), ratio)


@pytest.mark.parametrize("selection", ["magnitude", "random", "round_robin"])
@pytest.mark.parametrize("ratio", [0.05, 0.3])
def test_sgd_partial_changes_at_most_k_and_freezes_the_rest(selection, ratio):
    _changes_at_most_k(PartialSGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05, selection=selection), ratio)


@pytest.mark.parametrize("selection", ["magnitude", "random", "round_robin"])
def test_adamw_partial_changes_at_most_k_and_freezes_the_rest(selection):
    _changes_at_most_k(PartialAdamW, dict(lr=0.01, weight_decay=0.1, selection=selection), 0.1)


def test_magnitude_selection_updates_largest_gradients():
    model = _model()
    opt = PartialSGD(model.parameters(), lr=0.1, keep_ratio=0.1)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, x, y)
    for p, b in zip(model.parameters(), before):
        expected = ops.layerwise_topk_mask([p.grad], 0.1)[0]
        assert torch.equal(p.detach() != b, expected & (p.grad != 0))


def test_round_robin_cycles_through_fixed_blocks_and_random_varies():
    lin = nn.Linear(10, 1, bias=False)  # 10 weights, r = 0.3 -> blocks [0,3) [3,6) [6,9) [9,10)
    opt = PartialSGD(lin.parameters(), lr=0.1, keep_ratio=0.3, selection="round_robin")
    touched = []
    for _ in range(5):
        before = lin.weight.detach().clone()
        opt.zero_grad()
        lin.weight.grad = torch.ones_like(lin.weight)
        opt.step()
        touched.append((lin.weight.detach() != before).view(-1).nonzero().view(-1).tolist())
    assert touched == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [0, 1, 2]]

    lin = nn.Linear(50, 1, bias=False)
    opt = PartialSGD(lin.parameters(), lr=0.1, keep_ratio=0.2, selection="random", seed=3)
    sets = []
    for _ in range(3):
        before = lin.weight.detach().clone()
        lin.weight.grad = torch.ones_like(lin.weight)
        opt.step()
        changed = (lin.weight.detach() != before).view(-1)
        assert int(changed.sum()) == 10
        sets.append(changed)
    assert not torch.equal(sets[0], sets[1]) and not torch.equal(sets[1], sets[2])


@pytest.mark.parametrize("cls,kw", [
    (PartialSGD, dict(lr=0.05, momentum=0.9, keep_ratio=0.2)),
    (PartialSGD, dict(lr=0.05, momentum=0.9, dampening=0.1, keep_ratio=0.2, selection="random")),
    (PartialSGD, dict(lr=0.05, keep_ratio=0.2, selection="round_robin")),
    (PartialAdamW, dict(lr=0.01, keep_ratio=0.3, selection="random")),
    (PartialAdamW, dict(lr=0.01)),
])
def test_state_dict_round_trip_continues_identically(cls, kw):
    batches = _batches(10)
    a = _model()
    oa = cls(a.parameters(), **kw)
    for x, y in batches[:5]:
        _step(a, oa, x, y)
    b = copy.deepcopy(a)
    ob = cls(b.parameters(), **kw)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for x, y in batches[5:]:
        _step(a, oa, x, y)
        _step(b, ob, x, y)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def _continue_from_torch_state(a, b, cls, tcls, kw, batches, warmup):
    """Train twin models ``a`` and ``b`` with torch's ``tcls`` for ``warmup`` batches, hand ``b``'s optimizer
    state to our ``cls`` with ``load_state_dict``, and check after every later step that the two agree."""
    oa, ob = tcls(a.parameters(), **kw), tcls(b.parameters(), **kw)
    for x, y in batches[:warmup]:
        _step(a, oa, x, y)
        _step(b, ob, x, y)
    ours = cls(b.parameters(), **kw)
    ours.load_state_dict(ob.state_dict())
    for x, y in batches[warmup:]:
        _step(a, oa, x, y)
        _step(b, ours, x, y)
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cls,tcls,kw", [(PartialSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                         (PartialAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.05))])
def test_loads_a_torch_optimizer_state_dict(cls, tcls, kw):
    _continue_from_torch_state(_model(), _model(), cls, tcls, kw, _batches(8), warmup=4)


@pytest.mark.parametrize("cls,tcls,kw", [
    (PartialSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
    (PartialSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    (PartialSGD, torch.optim.SGD, dict(lr=0.05)),
    (PartialAdamW, torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
])
def test_off_scale_is_the_torch_step_on_the_damped_gradient(cls, tcls, kw):
    """off_scale > 0 (MSG's damped update): unselected coordinates take an ordinary step on off_scale * grad
    (weight decay and momentum included), so the whole step is torch's on the masked-and-damped gradient."""
    a, b = _model(), _model()
    oa = cls(a.parameters(), keep_ratio=0.2, off_scale=0.1, **kw)
    ob = tcls(b.parameters(), **kw)
    for x, y in _batches(15):
        _step(a, oa, x, y)
        ob.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        grads = [p.grad for p in b.parameters()]
        for p, m in zip(b.parameters(), ops.layerwise_topk_mask(grads, 0.2)):
            p.grad = torch.where(m, p.grad, p.grad * 0.1)
        ob.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_frozen_coordinates_stay_bitwise_with_explicit_masks():
    """Explicit masks (what random / round robin build): weight decay and momentum never move a frozen
    coordinate, even after it was selected earlier and has a non-zero momentum buffer."""
    lin = nn.Linear(6, 4)
    opt = PartialSGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, keep_ratio=0.25,
                     selection="round_robin")
    for t in range(6):
        before = [p.detach().clone() for p in lin.parameters()]
        bufs = [opt.state[p]["momentum_buffer"].clone() if p in opt.state else None for p in lin.parameters()]
        lin.weight.grad = torch.randn_like(lin.weight)
        lin.bias.grad = torch.randn_like(lin.bias)
        opt.step()
        for p, b0, buf0 in zip(lin.parameters(), before, bufs):
            n, k = p.numel(), ops.keep_count(p.numel(), 0.25)
            block = t % -(-n // k)
            expected = torch.zeros(n, dtype=torch.bool)
            expected[block * k:(block + 1) * k] = True
            assert torch.equal((p.detach() != b0).view(-1), expected)
            if buf0 is not None:
                assert torch.equal(opt.state[p]["momentum_buffer"].view(-1)[~expected], buf0.view(-1)[~expected])


@pytest.mark.parametrize("cls,tcls,kw", [(PartialSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
                                         (PartialAdamW, torch.optim.AdamW, dict(lr=0.01))])
def test_channels_last_parameters(cls, tcls, kw):
    """Non-contiguous parameters (channels_last conv weights) step like torch's and keep their layout,
    also after loading torch's state (whose buffers follow the parameter's layout)."""
    def conv():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).to(
            memory_format=torch.channels_last)

    a, b = conv(), conv()
    assert not a[0].weight.is_contiguous()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 3, 8, 8, generator=g).to(memory_format=torch.channels_last),
                torch.randint(0, 5, (8,), generator=g)) for _ in range(8)]
    _continue_from_torch_state(a, b, cls, tcls, kw, batches, warmup=3)
    assert b[0].weight.is_contiguous(memory_format=torch.channels_last)
    fresh = conv()
    opt = cls(fresh.parameters(), keep_ratio=0.1, **kw)
    before = fresh[0].weight.detach().clone()
    _step(fresh, opt, *batches[0])
    assert int((fresh[0].weight != before).sum()) <= ops.keep_count(before.numel(), 0.1)


def test_per_group_keep_ratio_and_bad_arguments():
    model = _model()
    opt = PartialSGD([{"params": model[0].parameters(), "keep_ratio": 0.1},
                      {"params": model[2].parameters()}], lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, *_batches(1)[0])
    w0, w2 = model[0].weight, model[2].weight
    assert int((w0.detach() != before[0]).sum()) <= ops.keep_count(w0.numel(), 0.1)
    assert int((w2.detach() != before[2]).sum()) > ops.keep_count(w2.numel(), 0.5)
    params = list(_model().parameters())
    for bad in (dict(keep_ratio=0.0), dict(keep_ratio=1.5), dict(selection="topk"), dict(off_scale=-1.0),
                dict(lr=-1.0), dict(nesterov=True), dict(differentiable=True)):
        with pytest.raises(ValueError):
            PartialSGD(params, **bad)
    for bad in (dict(amsgrad=True), dict(betas=(1.0, 0.9)), dict(capturable=True)):
        with pytest.raises(ValueError):
            PartialAdamW(params, **bad)


def test_fixed_masks_are_the_torch_step_on_the_masked_and_damped_gradient():
    """masks= (MSG's damped update, SalUn's and SFR-on's saliency masks): the same masks every step; selected
    entries take SGD's step on the gradient, the others SGD's step on off_scale·gradient (momentum and weight
    decay included) — torch.optim.SGD on the rescaled gradient; with off_scale=0 they stay bitwise."""
    torch.manual_seed(1)
    a, b = _model(), _model()
    masks = [torch.rand_like(p) < 0.3 for p in a.parameters()]
    oa = PartialSGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, masks=masks, off_scale=0.1)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    assert oa.param_groups[0]["selection"] == "fixed"
    for x, y in _batches(5):
        _step(a, oa, x, y)
        ob.zero_grad()
        nn.functional.cross_entropy(b(x), y).backward()
        for p, m in zip(b.parameters(), masks):
            p.grad = torch.where(m, p.grad, 0.1 * p.grad)
        ob.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
    frozen = _model()
    opt = PartialSGD(frozen.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, masks=masks)
    before = [p.detach().clone() for p in frozen.parameters()]
    for x, y in _batches(3):
        _step(frozen, opt, x, y)
    for p, p0, m in zip(frozen.parameters(), before, masks):
        assert torch.equal(p[~m], p0[~m]) and not torch.equal(p[m], p0[m])
        assert not opt.state[p]["momentum_buffer"][~m].any()


def test_fixed_masks_travel_with_the_state_dict_and_can_be_replaced():
    model = _model()
    masks = [torch.rand_like(p) < 0.5 for p in model.parameters()]
    opt = PartialSGD(model.parameters(), lr=0.1, momentum=0.9, masks=masks)
    _step(model, opt, *_batches(1)[0])
    twin = copy.deepcopy(model)
    opt2 = PartialSGD(twin.parameters(), lr=0.1, momentum=0.9, masks=[torch.ones_like(m) for m in masks])
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # (torch's state_dict shares the buffers)
    assert all(torch.equal(m, m2) for m, m2 in zip(masks, opt2.param_groups[0]["masks"]))
    x, y = _batches(2)[1]
    _step(model, opt, x, y)
    _step(twin, opt2, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    # replaced between steps (SFR-on alternates its mask with an all-true one): the next step follows it
    everything = [torch.ones_like(m) for m in masks]
    opt.param_groups[0]["masks"] = everything
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt, x, y)
    assert all(bool((p != p0).all()) for p, p0 in zip(model.parameters(), before) if p.dim() > 1)


def test_fixed_masks_bad_arguments():
    params = list(_model().parameters())
    good = [torch.ones_like(p, dtype=torch.bool) for p in params]
    for bad, match in ((good[:-1], "one mask per parameter"),
                       ([m.float() for m in good], r"masks\[0\] must be a bool tensor"),
                       ([good[1]] + good[1:], r"masks\[0\] must be a bool tensor of the parameter's shape")):
        with pytest.raises(ValueError, match=match):
            PartialSGD(params, masks=bad)
    with pytest.raises(ValueError, match="cannot be combined"):
        PartialSGD(params, masks=good, selection="random")
    with pytest.raises(ValueError, match="needs masks"):
        PartialSGD(params, selection="fixed")
    opt = PartialSGD(params, masks=good)
    opt.param_groups[0]["masks"] = good[:1]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="needs masks"):
        opt.step()

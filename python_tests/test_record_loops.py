"""The recorder in real training loops (issue 18): gradient accumulation, a GradScaler's skipped steps under
autocast, torch.compile'd models, channels_last parameters and an LR scheduler. FSDP2 is in
test_record_fsdp.py, the storage planner in test_record_plan.py."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from stored_updates import dense_updates  # noqa: E402
from unlearn_ext import ops  # noqa: E402
from unlearn_ext.record import DiskStore, UpdateRecorder, model_fingerprint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 4, (n,), generator=g)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# -- gradient accumulation ------------------------------------------------------------------------------

def test_four_accumulated_micro_batches_record_what_one_batch_of_the_four_records():
    x, y = _data()
    order = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    accumulated, whole = _mlp(), _mlp()
    rec_a, rec_w = UpdateRecorder(accumulated), UpdateRecorder(whole)
    opt_a = torch.optim.SGD(accumulated.parameters(), lr=0.1, momentum=0.9)
    opt_w = torch.optim.SGD(whole.parameters(), lr=0.1, momentum=0.9)
    for ids in order.split(16):
        opt_a.zero_grad()
        for micro in ids.split(4):
            (F.cross_entropy(accumulated(x[micro]), y[micro]) / 4).backward()
            rec_a.add_ids(micro)
        with rec_a.step():
            opt_a.step()
        opt_w.zero_grad()
        F.cross_entropy(whole(x[ids]), y[ids]).backward()
        with rec_w.step(ids):
            opt_w.step()
    a, w = rec_a.store, rec_w.store
    assert a.steps() == w.steps() == [0, 1, 2, 3] and rec_a.step_count == 4
    for s, (ids, da, dw) in enumerate(zip(order.split(16), dense_updates(a), dense_updates(w))):
        assert torch.equal(a.sample_ids(s), ids) and torch.equal(w.sample_ids(s), ids)
        for p, q in zip(da, dw):  # equal up to the rounding of summing four quarter-losses
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert a.steps_containing(order[:1]) == [0] and a.steps_containing(order[-4:]) == [3]


def test_ids_given_to_step_follow_the_added_micro_batches_and_a_failed_step_keeps_them():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = UpdateRecorder(model, keep_ratio=0.5)
    x, y = _data(8)
    F.cross_entropy(model(x), y).backward()
    rec.add_ids([1, 2])
    rec.add_ids(torch.tensor([3]))
    with pytest.raises(RuntimeError, match="boom"):
        with rec.step([4, 5]):
            raise RuntimeError("boom")
    assert len(rec.store) == 0 and rec.step_count == 0
    with rec.step([6]):  # the retried step holds the ids of the failed one: its gradients are still there
        opt.step()
    assert rec.store.sample_ids(0).tolist() == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="sample_ids.*add_ids"):  # nothing pending, nothing given
        with rec.step():
            opt.step()
    with pytest.raises(ValueError, match="sample_ids must have an integer dtype"):
        rec.add_ids([0.5])
    with rec.step(7):  # the refused calls left nothing pending
        opt.step()
    assert rec.store.sample_ids(1).tolist() == [7] and rec.step_count == 2


# -- mixed precision ------------------------------------------------------------------------------------

@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_a_step_the_grad_scaler_skips_records_nothing_and_its_ids_go_nowhere(amp_dtype):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu")
    rec = UpdateRecorder(model, optimizer=opt)
    blind = UpdateRecorder(model)  # without optimizer= the skip is not seen: an empty update is recorded
    x, y = _data(32)
    x[8:16] = float("inf")  # the second batch's gradients are not finite: the scaler skips its step
    expected, scales = [], []
    for b in range(4):
        micro = torch.arange(8 * b, 8 * b + 8)
        before = _params(model)
        opt.zero_grad()
        for half in micro.split(4):
            with torch.autocast("cpu", dtype=amp_dtype):
                loss = F.cross_entropy(model(x[half]), y[half])
            assert loss.dtype == torch.float32 and model[0].weight.dtype == torch.float32
            scaler.scale(loss / 2).backward()
            rec.add_ids(half)
        with rec.step(), blind.step(micro):
            scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        expected.append([p.detach() - q for p, q in zip(model.parameters(), before)])
    assert scales[1] < scales[0] == 65536.0  # the second step was skipped (the scale backed off)
    assert all(torch.equal(d, torch.zeros_like(d)) for d in expected[1])
    assert rec.skipped_steps == 1 and rec.step_count == 3 and rec.store.steps() == [0, 1, 2]
    assert rec.store.steps_containing(torch.arange(8, 16)) == []  # not attributed to the next step
    assert rec.store.ids_not_recorded(torch.arange(32)).tolist() == list(range(8, 16))
    for s, b in enumerate([0, 2, 3]):
        assert rec.store.sample_ids(s).tolist() == list(range(8 * b, 8 * b + 8))
        # the fp32 weights' update, exactly (autocast computes in amp_dtype, the weights stay fp32)
        for got, want in zip(dense_updates(rec.store, [s])[0], expected[b]):
            assert torch.equal(got, want)
    assert set(rec.manifest.dtypes) == {"float32"}
    assert blind.store.steps() == [0, 1, 2, 3] and sum(c for c in
                                                          next(blind.store.records([1])).offsets.diff()) == 0


def test_optimizer_argument_is_checked():
    model = _mlp()
    with pytest.raises(ValueError, match="optimizer must be a torch.optim.Optimizer"):
        UpdateRecorder(model, optimizer=torch.amp.GradScaler("cpu"))
    partial_opt = torch.optim.SGD(model[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer does not update the trainable parameter '2.weight'"):
        UpdateRecorder(model, optimizer=partial_opt)


# -- compiled and reshaped models, LR schedules ---------------------------------------------------------

def _train_steps(model, rec, steps=3, lr=0.1, batch=8):
    x, y = _data(batch * steps)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for s in range(steps):
        ids = torch.arange(batch * s, batch * s + batch)
        opt.zero_grad()
        F.cross_entropy(model(x[ids]), y[ids]).backward()
        with rec.step(ids):
            opt.step()


@pytest.mark.parametrize("keep_ratio", [None, 0.3])
def test_a_store_recorded_on_a_compiled_model_applies_to_the_plain_model_and_back(keep_ratio, tmp_path):
    plain = _mlp()
    compiled = torch.compile(copy.deepcopy(plain), backend="eager")
    assert next(iter(compiled.named_parameters()))[0] == "_orig_mod.0.weight"
    assert model_fingerprint(compiled) == model_fingerprint(plain)
    rec_c = UpdateRecorder(compiled, keep_ratio=keep_ratio, store=DiskStore(tmp_path / "compiled.ulx"))
    rec_p = UpdateRecorder(plain, keep_ratio=keep_ratio)
    assert rec_c.manifest == rec_p.manifest and rec_c.manifest.names[0] == "0.weight"
    _train_steps(compiled, rec_c)
    _train_steps(plain, rec_p)
    rec_c.store.close()
    from_compiled = DiskStore(tmp_path / "compiled.ulx", model=plain)  # the plain model is accepted
    for dc, dp in zip(dense_updates(from_compiled), dense_updates(rec_p.store)):
        for p, q in zip(dc, dp):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
    # the compiled model's store removes steps from a plain copy, and the plain one's from a compiled copy
    plain_target = copy.deepcopy(plain)
    compiled_target = torch.compile(copy.deepcopy(plain), backend="eager")
    from_compiled.apply(plain_target, [0, 2])
    rec_p.store.apply(compiled_target, [0, 2])
    for p, q in zip(plain_target.parameters(), compiled_target.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert not torch.equal(plain_target[0].weight, plain[0].weight)


def test_a_submodule_compiled_in_place_keeps_the_plain_names():
    model = _mlp()
    fingerprint = model_fingerprint(model)
    model[2] = torch.compile(model[2], backend="eager")
    assert "2._orig_mod.weight" in dict(model.named_parameters())
    rec = UpdateRecorder(model, keep_ratio=0.5)
    assert rec.manifest.names == ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias")
    assert rec.manifest.fingerprint == fingerprint
    _train_steps(model, rec, steps=2)
    before = _params(model)
    rec.store.apply(model, [1])
    assert not torch.equal(model[2]._orig_mod.weight, before[2])


@pytest.mark.parametrize("keep_ratio", [None, 0.3])
def test_channels_last_parameters_are_recorded_in_logical_order(keep_ratio):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(64, 2))
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    rec = UpdateRecorder(model, keep_ratio=keep_ratio)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, generator=g).to(memory_format=torch.channels_last)
        before = _params(model)
        opt.zero_grad()
        F.cross_entropy(model(x), torch.randint(0, 2, (4,), generator=g)).backward()
        with rec.step([step]):
            opt.step()
        delta = [p.detach() - q for p, q in zip(model.parameters(), before)]
        if keep_ratio is None:
            for got, want in zip(dense_updates(rec.store, [step])[0], delta):
                assert torch.equal(got, want)
        else:
            (got,) = rec.store.records([step])
            v, i, o = ops.layerwise_topk([d.contiguous() for d in delta], keep_ratio)
            assert torch.equal(got.indices, i) and torch.equal(got.offsets, o) and torch.equal(got.values, v)


def test_each_step_records_the_update_the_lr_schedule_gave_it():
    model = _mlp()
    initial = _params(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6, cycle_momentum=False)
    rec = UpdateRecorder(model, optimizer=opt)
    x, y = _data(48)
    lrs, grads = [], []
    for s in range(6):
        ids = torch.arange(8 * s, 8 * s + 8)
        opt.zero_grad()
        F.cross_entropy(model(x[ids]), y[ids]).backward()
        lrs.append(opt.param_groups[0]["lr"])
        grads.append([p.grad.clone() for p in model.parameters()])
        with rec.step(ids):
            opt.step()
        sched.step()
    assert len(set(lrs)) == 6  # the schedule moved the rate every step
    for s in range(6):  # plain SGD: the update is -lr·grad at that step's rate (up to θ's last bit)
        for got, g in zip(dense_updates(rec.store, [s])[0], grads[s]):
            torch.testing.assert_close(got, -lrs[s] * g, rtol=1e-5, atol=1e-7)
    rec.store.apply(model)
    for p, q in zip(model.parameters(), initial):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)

"""Updates the recorder used to miss without a word (issue 30): a step that raises after the optimizer
stepped, a layer unfrozen (or a param group added) after the recorder was built, optimizer steps taken
outside ``rec.step()``; and recordings that could never be used: parameters in a dtype the ops cannot
apply updates to, layers of 2**31 elements or more."""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext.record import DiskStore, Manifest, UpdateRecorder, plan_storage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed=0):
    """Weights in [1, 2] and small SGD steps: no weight crosses zero or halves, so every recorded
    Δ = θ_after − θ_before is exact and subtracting the steps in reverse gives θ_init bit for bit."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(1.0, 2.0)
    return model


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _backward(model, x, y, ids):
    model.zero_grad()
    F.cross_entropy(model(x[ids]), y[ids]).backward()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_removing_every_step_restores(store, model, initial):
    """Subtract the stored steps one at a time, last first (each subtraction exact, see _mlp): the model must
    be ``initial`` bit for bit."""
    for step in reversed(store.steps()):
        store.apply(model, [step], alpha=-1.0)
    for p, q in zip(model.parameters(), initial):
        assert torch.equal(p, q)


class _AfterStep(Exception):
    """A line after opt.step() inside rec.step() that fails (a logging call, a NaN guard)."""


# -- a step that raises --------------------------------------------------------------------------------

@pytest.mark.parametrize("watch_optimizer", [False, True])
def test_a_step_that_raises_after_the_optimizer_stepped_is_recorded_with_its_ids(watch_optimizer):
    model = _mlp()
    initial = _params(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt if watch_optimizer else None)
    x, y = _data()
    for s in range(5):
        ids = torch.arange(8 * s, 8 * s + 8)
        _backward(model, x, y, ids)
        if s == 2:
            with pytest.raises(_AfterStep):
                with rec.step(ids):
                    opt.step()
                    raise _AfterStep("the logging line failed")
        else:
            with rec.step(ids):
                opt.step()
    # the update of step 2 happened, so it is recorded, with its own batch and not the next one's
    assert rec.store.steps() == [0, 1, 2, 3, 4] and rec.step_count == 5
    for s in range(5):
        assert rec.store.sample_ids(s).tolist() == list(range(8 * s, 8 * s + 8))
    _assert_removing_every_step_restores(rec.store, model, initial)


def test_a_nan_guard_after_a_nan_update_raises_that_the_update_cannot_be_stored():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt)
    x, y = _data()
    _backward(model, x, y, torch.arange(8))
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="values hold NaN or infinity: such an update cannot be removed") as e:
        with rec.step(torch.arange(8)):
            opt.step()
            if not torch.isfinite(model[0].weight).all():
                raise _AfterStep("NaN in the weights")
    assert isinstance(e.value.__context__, _AfterStep) and len(rec.store) == 0


@pytest.mark.parametrize("watch_optimizer", [False, True])
def test_a_step_that_raises_before_the_optimizer_stepped_records_nothing_and_keeps_its_ids(watch_optimizer):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, keep_ratio=0.5, optimizer=opt if watch_optimizer else None)
    x, y = _data()
    _backward(model, x, y, torch.arange(8))
    with pytest.raises(_AfterStep):
        with rec.step(torch.arange(4)):
            raise _AfterStep("before the step")
    assert len(rec.store) == 0 and rec.step_count == 0
    with rec.step(torch.arange(4, 8)):  # the retried step holds the ids of the failed one
        opt.step()
    assert rec.store.steps() == [0] and rec.store.sample_ids(0).tolist() == list(range(8))


def test_an_optimizer_that_raises_part_way_through_its_update_records_what_moved():
    """The step hook never ran (the optimizer raised), but the first parameters moved: recorded."""
    model = _mlp()
    initial = _params(model)

    class HalfwaySGD(torch.optim.SGD):
        def step(self, closure=None):
            with torch.no_grad():
                first = self.param_groups[0]["params"][0]
                first.add_(first.grad, alpha=-1e-3)
            raise _AfterStep("the optimizer failed after updating one parameter")

    opt = HalfwaySGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt)
    x, y = _data()
    _backward(model, x, y, torch.arange(8))
    with pytest.raises(_AfterStep):
        with rec.step(torch.arange(8)):
            opt.step()
    assert rec.store.steps() == [0] and rec.store.sample_ids(0).tolist() == list(range(8))
    assert not torch.equal(model[0].weight, initial[0])
    _assert_removing_every_step_restores(rec.store, model, initial)


# -- parameters trained but not recorded ---------------------------------------------------------------

@pytest.mark.parametrize("watch_optimizer", [False, True])
def test_a_layer_unfrozen_after_the_recorder_was_built_raises_at_the_next_step(watch_optimizer, tmp_path):
    """Stage-2 fine-tuning: the first layer, frozen while the recorder was built, is unfrozen (and, with
    an optimizer over the trainable parameters only, added with add_param_group)."""
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters() if watch_optimizer else model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, store=DiskStore(tmp_path / "stage1.ulx"),
                         optimizer=opt if watch_optimizer else None)
    x, y = _data()
    _backward(model, x, y, torch.arange(8))
    with rec.step(torch.arange(8)):
        opt.step()
    model[0].requires_grad_(True)
    if watch_optimizer:
        opt.add_param_group({"params": list(model[0].parameters())})
    _backward(model, x, y, torch.arange(8, 16))
    before = _params(model)
    with pytest.raises(ValueError, match=r"'0\.weight' is trained now but the recorder does not record it "
                                         r"\(2 such\).*new UpdateRecorder"):
        with rec.step(torch.arange(8, 16)):
            opt.step()
    for p, q in zip(model.parameters(), before):  # refused before the optimizer stepped
        assert torch.equal(p, q)
    rec.close()  # stage 2 gets its own recording
    with pytest.raises(ValueError, match="step\\(\\) on a closed UpdateRecorder"):
        with rec.step(torch.arange(8, 16)):
            opt.step()
    assert DiskStore(tmp_path / "stage1.ulx", model=model).steps() == [0]
    stage2 = UpdateRecorder(model, optimizer=opt if watch_optimizer else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the closed stage-1 recorder no longer watches the optimizer
        with stage2.step(torch.arange(8, 16)):
            opt.step()
    assert stage2.manifest.names[0] == "0.weight" and stage2.store.steps() == [0]


def test_an_unfrozen_layer_the_watched_optimizer_does_not_update_is_no_error():
    model = _mlp()
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[2].parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt)
    model[0].requires_grad_(True)  # it gets gradients, but the optimizer never moves it
    x, y = _data()
    _backward(model, x, y, torch.arange(8))
    with rec.step(torch.arange(8)):
        opt.step()
    assert rec.store.steps() == [0]


def test_a_param_group_of_new_parameters_raises_at_the_next_step():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt)
    model.add_module("head", nn.Linear(3, 2))
    opt.add_param_group({"params": [model.head.weight]})
    outside = nn.Parameter(torch.ones(5))
    opt.add_param_group({"params": [outside]})
    with pytest.raises(ValueError, match=r"'head\.weight' is trained now .*\(2 such\)"):
        with rec.step([0]):
            opt.step()
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match=r"a parameter of shape \(5,\) in param_groups\[2\] is trained now"):
        with rec.step([0]):
            opt.step()


@pytest.mark.parametrize("keep_ratio", [None, 0.5])
def test_a_recorded_layer_frozen_later_simply_records_no_change(keep_ratio):
    model = _mlp()
    initial = _params(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, keep_ratio=keep_ratio, optimizer=opt)
    x, y = _data()
    for s in range(4):
        if s == 2:
            model[0].requires_grad_(False)
        ids = torch.arange(8 * s, 8 * s + 8)
        _backward(model, x, y, ids)
        with rec.step(ids):
            opt.step()
    assert rec.store.steps() == [0, 1, 2, 3]
    for rec_s in rec.store.records([2, 3]):
        assert rec_s.offsets.diff()[:2].tolist() == [0, 0]  # the frozen layer's segments are empty
    if keep_ratio is None:
        _assert_removing_every_step_restores(rec.store, model, initial)


# -- optimizer steps outside rec.step() ----------------------------------------------------------------

def test_each_optimizer_step_outside_rec_step_warns_with_the_count_and_keeps_the_numbering():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt)
    x, y = _data()
    _backward(model, x, y, torch.arange(8))
    with rec.step(torch.arange(8)):
        opt.step()
    for n in (1, 2):
        with pytest.warns(RuntimeWarning, match=rf"outside rec\.step\(\) \({n} such step") as caught:
            opt.step()
        assert caught[0].filename == __file__  # it points at the unrecorded opt.step() line
    assert rec.unrecorded_steps == 2
    with rec.step(torch.arange(8, 16)):
        opt.step()
    # steps are numbered by optimizer step: the two unrecorded ones count
    assert rec.store.steps() == [0, 3] and rec.step_count == 4 and rec.unrecorded_steps == 2


def test_a_dropped_recorder_stops_watching_its_optimizer():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt)
    del rec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


# -- recordings that could never be used ---------------------------------------------------------------

@pytest.mark.parametrize("keep_ratio", [None, 0.5])
def test_a_float64_model_is_refused_before_anything_is_written(keep_ratio, tmp_path):
    model = _mlp().double()
    message = (r"parameter '0\.weight' has dtype torch\.float64.*torch\.float32, torch\.float16, "
               r"torch\.bfloat16")
    with pytest.raises(ValueError, match=message):
        UpdateRecorder(model, keep_ratio=keep_ratio, store=DiskStore(tmp_path / "run.ulx"))
    assert not os.path.exists(tmp_path / "run.ulx")
    with pytest.raises(ValueError, match=message):
        plan_storage(model, steps=10, batch_size=4, keep_ratio=keep_ratio)
    model[0].requires_grad_(False)  # a frozen float64 layer is not recorded: no objection
    model[2].float()
    assert UpdateRecorder(model, keep_ratio=keep_ratio).manifest.names == ("2.weight", "2.bias")


class _Huge(nn.Module):
    def __init__(self, numel):
        super().__init__()
        self.small = nn.Linear(2, 2, device="meta")
        self.huge = nn.Parameter(torch.empty(numel, device="meta"))  # costs nothing: shapes only


def test_a_layer_of_2_31_elements_is_refused_before_anything_is_written(tmp_path):
    largest = Manifest.from_model(_Huge(2**31 - 1))
    assert dict(zip(largest.names, largest.numels))["huge"] == 2**31 - 1
    model = _Huge(2**31)
    message = r"parameter 'huge' has 2147483648 elements; at most 2\*\*31 - 1 are supported"
    with pytest.raises(ValueError, match=message):
        UpdateRecorder(model, store=DiskStore(tmp_path / "run.ulx"))
    assert not os.path.exists(tmp_path / "run.ulx")
    with pytest.raises(ValueError, match=message):
        plan_storage(model, steps=10, batch_size=4)


def test_nested_steps_are_refused():
    """The hostile probe: a step() inside another recorded the inner update twice (the outer step's update
    included it), and undoing every step missed θ_init by 0.37."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    rec = UpdateRecorder(model, optimizer=opt)
    x, y = _data()
    _backward(model, x, y, torch.arange(8))
    with rec.step(torch.arange(8)):
        with pytest.raises(ValueError, match="steps do not nest"):
            with rec.step(torch.arange(8, 16)):
                pass
        opt.step()
    assert rec.store.steps() == [0] and rec.store.sample_ids(0).tolist() == list(range(8))

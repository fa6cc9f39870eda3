"""An apply is all or nothing, and a store handle reads only the file it opened (issue 24, item 0).

Each test first shows the failure it guards against can happen (a damaged record met late, an interrupt
between two groups, a duplicated step, another run's file at the path) and then that the model is exactly
as it was, or that the handle applied its own records."""
import os
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext import ops  # noqa: E402
from unlearn_ext.record import DiskStore, MemoryStore, UpdateRecorder  # noqa: E402
from unlearn_ext.record import store as store_module  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS = 8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _train(store, keep_ratio=None, step_offset=0):
    """Eight SGD steps of ``_model()`` recorded into ``store`` (steps shifted by ``step_offset``: the same bytes
    but for each record's step). Returns the trained model."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = UpdateRecorder(model, keep_ratio=keep_ratio, store=store)
    rec.step_count += step_offset
    g = torch.Generator().manual_seed(1)
    for step in range(N_STEPS):
        x, y = torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with rec.step(torch.arange(5 * step, 5 * step + 5)):
            opt.step()
    return model


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(model, params):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


@pytest.fixture
def recorded(tmp_path):
    path = tmp_path / "run.ulx"
    with DiskStore(path) as store:
        model = _train(store)
    return path, model


def test_a_step_given_twice_is_refused_and_nothing_applied(recorded):
    path, model = recorded
    store = DiskStore(path, model=model)
    before = _params(model)
    with pytest.raises(ValueError, match="step 3 is given more than once"):
        store.apply(model, [1, 3, 3])
    assert _same(model, before)


@pytest.mark.parametrize("bound", [1 << 24, 40], ids=["one group", "a group per record"])
def test_a_record_damaged_after_opening_leaves_the_model_unchanged(bound, recorded):
    path, model = recorded
    store = DiskStore(path, model=model)
    before = _params(model)
    offset, size = store._where[-1]
    with open(path, "r+b") as f:  # the last record's body, damaged in place (same file, same inode)
        f.seek(offset + size - 3)
        byte = f.read(1)
        f.seek(offset + size - 3)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="fails its checksum"):
        store.apply(model, store.steps(), max_batch_entries=bound)
    assert _same(model, before)


def test_an_interrupt_between_groups_restores_the_model_and_a_retry_equals_one_apply(recorded, monkeypatch):
    path, model = recorded
    store = DiskStore(path, model=model)
    before = _params(model)
    expected = _model()
    expected.load_state_dict(model.state_dict())
    DiskStore(path).apply(expected, store.steps())

    calls = []
    real = ops.sparse_accumulate_

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(store_module.ops, "sparse_accumulate_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.apply(model, store.steps(), max_batch_entries=40)
    assert len(calls) == 3  # two groups had been applied when the interrupt came
    assert _same(model, before)
    monkeypatch.setattr(store_module.ops, "sparse_accumulate_", real)
    store.apply(model, store.steps(), max_batch_entries=40)
    assert _same(model, _params(expected))


def test_the_handle_keeps_reading_its_own_file_when_the_path_is_replaced(tmp_path, recorded):
    path, model = recorded
    handle = DiskStore(path, model=model)
    other = tmp_path / "other.ulx"
    with DiskStore(other) as store:  # another run's recording of the same model: other updates
        torch.manual_seed(5)
        _train(store, keep_ratio=0.5)
    os.replace(other, path)

    mine, theirs = _model(), _model()
    reference = MemoryStore()
    _train(reference)
    reference.apply(mine, [2, 5])
    with pytest.warns(RuntimeWarning, match="now holds another file"):
        handle.apply(theirs, [2, 5])
    assert _same(theirs, _params(mine))
    with pytest.raises(RuntimeError, match="now holds another file"):
        handle.append(99, [0], torch.zeros(sum(handle.manifest.numels)), None,
                      torch.tensor([0] + handle.manifest.numels).cumsum(0))


def test_a_file_rewritten_in_place_with_records_of_other_steps_is_refused(tmp_path, recorded):
    path, model = recorded
    handle = DiskStore(path, model=model)
    shifted = tmp_path / "shifted.ulx"
    with DiskStore(shifted) as store:  # byte for byte the same records but for their step numbers
        _train(store, step_offset=100)
    assert os.path.getsize(shifted) == os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(shifted.read_bytes())
    before = _params(model)
    with pytest.raises(ValueError, match="holds step 102 where this handle indexed step 2"):
        handle.apply(model, [2])
    assert _same(model, before)


def test_apply_to_a_state_dict_equals_apply_to_the_model(recorded):
    path, model = recorded
    store = DiskStore(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = _params(model)
    store.apply_to(state, [0, 4, 7])
    store.apply(model, [0, 4, 7])
    assert not _same(model, before)  # the undo changed the model: equal by doing something
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("2.bias"), "recorded layer '2.bias', which the given tensors lack"),
    (lambda s: s.__setitem__("0.weight", torch.zeros(12, 7)), r"float32 of shape \(12, 6\); the given tensor is "
                                                              r"float32 of shape \(12, 7\)"),
    (lambda s: s.__setitem__("0.bias", torch.zeros(12, dtype=torch.float64)), "the given tensor is float64"),
])
def test_a_state_dict_that_does_not_fit_the_manifest_is_refused_naming_the_layer(change, message, recorded):
    path, model = recorded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    change(state)
    kept = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match=message):
        DiskStore(path).apply_to(state, [1])
    assert all(torch.equal(kept[k], v) for k, v in state.items())


def test_a_step_the_record_format_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    store = DiskStore(tmp_path / "s.ulx")
    _train(store)
    store.flush()
    size = (tmp_path / "s.ulx").stat().st_size
    numels = store.manifest.numels
    with pytest.raises(ValueError, match=r"step must be an integer in \[0, 2\*\*63\)"):
        store.append(2**63, [1], torch.zeros(sum(numels)), None, torch.tensor([0] + numels).cumsum(0))
    store.flush()
    assert len(store) == N_STEPS and (tmp_path / "s.ulx").stat().st_size == size


def test_layers_whose_tensors_share_memory_are_refused(recorded):
    """The hostile probe: a strided tensor and another view of the same buffer were applied through the
    contiguous copy, and writing it back overwrote the other layer."""
    path, model = recorded
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = torch.zeros(64)
    base[0::2][:12] = state["0.bias"]
    state["0.bias"] = base[0::2][:12]
    state["2.bias"] = base[:3]
    kept = base.clone()
    with pytest.raises(ValueError, match="layers '0.bias' and '2.bias' share memory"):
        DiskStore(path).apply_to(state, [1])
    assert torch.equal(base, kept)

"""The request log's guarantees (issue 24, items 1-3): each step undone at most once across requests, a retry
redoes bitwise, a served request asked again changes nothing, stale states and reused ids are refused, the
guard refuses past its limit — every refusal writing nothing — and a torn or damaged log is read as promised."""
import os
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext.deletion import RegimeExceeded, RequestLog, RequestRefused, state_digest  # noqa: E402
from unlearn_ext.deletion.receipt import ALREADY_SERVED, REDONE, SERVED  # noqa: E402
from unlearn_ext.record import DiskStore, UpdateRecorder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

N, BATCH, EPOCHS = 12, 4, 3  # 9 steps; each sample is in one step per epoch


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _record(path, keep_ratio=None):
    """SGD on 12 samples, 3 epochs of shuffled batches of 4, recorded into a DiskStore at ``path``. Returns the
    trained model's state_dict."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)
    with DiskStore(path) as store:
        rec = UpdateRecorder(model, keep_ratio=keep_ratio, store=store)
        for _ in range(EPOCHS):
            for b in torch.randperm(N, generator=g).split(BATCH):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                with rec.step(b):
                    opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _copy(state):
    return {k: v.clone() for k, v in state.items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def run(tmp_path):
    state = _record(tmp_path / "run.ulx")
    store = DiskStore(tmp_path / "run.ulx")
    RequestLog.create(tmp_path / "run.ulx.requests", store, state)
    return store, state, tmp_path / "run.ulx.requests"


def _shared_pair(store):
    """Two ids whose steps overlap but differ."""
    for a in range(N):
        for b in range(N):
            sa, sb = set(store.steps_containing([a])), set(store.steps_containing([b]))
            if a != b and sa & sb and sa != sb:
                return a, b
    raise AssertionError("no pair of samples shares a step")


def test_overlapping_requests_undo_each_shared_step_once(run):
    store, state, path = run
    a, b = _shared_pair(store)
    log = RequestLog(path, store)
    served = _copy(state)
    ra = log.forget(served, "A", [a], max_undone=1.0)
    rb = log.forget(served, "B", [b], max_undone=1.0)
    shared = sorted(set(ra.steps_new) & set(store.steps_containing([b])))
    assert shared and rb.steps_skipped == shared and not set(rb.steps_new) & set(ra.steps_new)
    assert sorted(ra.steps_new + rb.steps_new) == store.steps_containing([a, b]) == log.undone_steps()

    sequential = _copy(state)  # the same steps in the same order, by hand: bitwise
    store.apply_to(sequential, ra.steps_new)
    store.apply_to(sequential, rb.steps_new)
    assert _equal(served, sequential)
    at_once = _copy(state)  # both ids at once: the same steps, summed in another order
    store.apply_to(at_once, store.steps_containing([a, b]))
    assert all(torch.allclose(served[k], at_once[k], atol=1e-6, rtol=0) for k in state)
    twice = _copy(state)  # what the stateless call did: the shared step subtracted twice
    store.apply_to(twice, store.steps_containing([a]))
    store.apply_to(twice, store.steps_containing([b]))
    assert max(float((twice[k] - served[k]).abs().max()) for k in state) > 1e-3
    assert rb.sha256_before == ra.sha256_after and rb.undone_steps == len(log.undone_steps())


def test_a_served_request_on_its_output_changes_nothing_and_is_logged_once(run):
    store, state, path = run
    log = RequestLog(path, store)
    s = _copy(state)
    first = log.forget(s, "A", [0, 5], max_undone=1.0)
    out = _copy(s)
    again = log.forget(s, "A", [5, 0], max_undone=1.0)
    assert (first.status, again.status) == (SERVED, ALREADY_SERVED)
    assert _equal(s, out) and again == first and len(log.receipts()) == 1


def test_a_retry_on_the_input_redoes_the_request_bitwise(run):
    store, state, path = run
    log = RequestLog(path, store)
    first = _copy(state)
    r1 = log.forget(first, "A", [2, 7], max_undone=1.0)
    retry = _copy(state)
    r2 = log.forget(retry, "A", [2, 7], max_undone=1.0)
    assert r2.status == REDONE and state_digest(retry) == r1.sha256_after and _equal(retry, first)
    assert len(log.receipts()) == 1


def test_ids_an_earlier_request_forgot_undo_nothing(run):
    store, state, path = run
    log = RequestLog(path, store)
    s = _copy(state)
    log.forget(s, "A", [3, 4], max_undone=1.0)
    kept = _copy(s)
    r = log.forget(s, "B", [4], max_undone=1.0)
    assert r.steps_new == [] and r.steps_skipped == store.steps_containing([4])
    assert _equal(s, kept) and r.sha256_before == r.sha256_after
    assert "nothing left to undo" in r.summary()


def _refused_writes_nothing(path, state, call, error, match):
    before_bytes = path.read_bytes() if path.exists() else None
    kept = _copy(state)
    with pytest.raises(error, match=match):
        call()
    assert (path.read_bytes() if path.exists() else None) == before_bytes
    assert _equal(state, kept)


def test_a_new_request_on_a_stale_state_is_refused_naming_both_digests(run):
    store, state, path = run
    log = RequestLog(path, store)
    latest = _copy(state)
    r = log.forget(latest, "A", [1], max_undone=1.0)
    stale = _copy(state)
    _refused_writes_nothing(path, stale, lambda: log.forget(stale, "B", [2], max_undone=1.0), RequestRefused,
                            f"{r.sha256_before[:16]}.*not the latest model.*{r.sha256_after[:16]}")


@pytest.mark.parametrize("ids, rid, match", [
    ([1, 2], "A", "request id 'A' was served with 1 other id"),
    ([10_000], "B", "in no recorded training step, e.g. \\[10000\\]"),
    ([], "B", "the request holds no id"),
    ([1.5], "B", "sample_ids"),
    ([3], "", "request_id must be a printable string"),
    ([3], "a\nb", "request_id must be a printable string"),
])
def test_bad_requests_are_refused_and_write_nothing(ids, rid, match, run):
    store, state, path = run
    log = RequestLog(path, store)
    s = _copy(state)
    log.forget(s, "A", [1], max_undone=1.0)
    _refused_writes_nothing(path, s, lambda: log.forget(s, rid, ids, max_undone=1.0), RequestRefused, match)


def test_the_guard_refuses_past_its_limit_and_writes_nothing(run):
    store, state, path = run
    log = RequestLog(path, store)
    s = _copy(state)
    one = len(store.steps_containing([0]))
    log.forget(s, "A", [0], max_undone=one / len(store))  # exactly at the limit: served
    with pytest.raises(RegimeExceeded) as info:
        log.forget(_copy(s), "B", [1, 2], max_undone=one / len(store))
    assert info.value.fraction > info.value.limit == one / len(store)
    assert "retrain" in str(info.value) and f"{100 * info.value.limit:.2f} %" in str(info.value)
    _refused_writes_nothing(path, s, lambda: log.forget(s, "B", [1, 2], max_undone=0.01), RegimeExceeded,
                            "past the limit of 1.00 % \\(--max-undone\\)")


def test_the_default_limit_of_a_dense_recording_refuses_every_undo(run):
    """Naive amnesiac without fine-tune left 2 TA points already at the smallest measured fraction."""
    store, state, path = run
    log = RequestLog(path, store)
    s = _copy(state)
    _refused_writes_nothing(path, s, lambda: log.forget(s, "A", [0]), RegimeExceeded,
                            "limit of 0.00 % \\(benchmarks/results/amnesiac_regime.md, amnesiac without fine-tune\\)")


def test_a_torn_last_entry_is_dropped_and_the_request_is_served_again(run):
    store, state, path = run
    log = RequestLog(path, store)
    s = _copy(state)
    log.forget(s, "A", [0], max_undone=1.0)
    after_a = path.stat().st_size
    s1 = _copy(s)
    r2 = log.forget(s, "B", [1], max_undone=1.0)
    full = path.read_bytes()
    cut = len(full) - 17
    path.write_bytes(full[:cut])
    reopened = RequestLog(path, store)
    assert [r.request_id for r in reopened.receipts()] == ["A"] and reopened.dropped == (after_a, cut - after_a)
    again = reopened.forget(s1, "B", [1], max_undone=1.0)
    assert again.status == SERVED and again.sha256_after == r2.sha256_after and _equal(s1, s)
    fresh = RequestLog(path, store)
    assert [r.request_id for r in fresh.receipts()] == ["A", "B"] and fresh.dropped is None  # torn end cut off


def test_a_damaged_entry_followed_by_intact_ones_refuses_the_log(run):
    store, state, path = run
    log = RequestLog(path, store)
    s = _copy(state)
    log.forget(s, "A", [0], max_undone=1.0)
    log.forget(s, "B", [1], max_undone=1.0)
    data = bytearray(path.read_bytes())
    first_entry = data.index(b"ULXQ")
    data[first_entry + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"entry at byte {first_entry} is damaged.*intact one follows"):
        RequestLog(path, store).forget(s, "C", [2], max_undone=1.0)


def test_a_log_of_another_recording_is_refused(run, tmp_path):
    store, state, path = run
    RequestLog(path, store).forget(_copy(state), "A", [0], max_undone=1.0)
    other_path = tmp_path / "other.ulx"
    _record(other_path, keep_ratio=0.5)
    with pytest.raises(ValueError, match="request log of another recording"):
        RequestLog(path, DiskStore(other_path))


def test_a_model_and_its_state_dict_are_served_alike(run):
    store, state, path = run
    model = _model()
    model.load_state_dict(state)
    r = RequestLog(path, store).forget(model, "A", [6], max_undone=1.0)
    by_state = _copy(state)
    store.apply_to(by_state, r.steps_new)
    assert _equal(model.state_dict(), by_state) and r.sha256_after == state_digest(by_state)


def test_forget_checkpoint_writes_the_output_and_refuses_what_does_not_fit(run, tmp_path):
    store, state, path = run
    torch.save(state, tmp_path / "in.pt")
    log = RequestLog(path, store)
    r = log.forget_checkpoint(tmp_path / "in.pt", tmp_path / "out.pt", "A", [0], max_undone=1.0)
    assert state_digest(torch.load(tmp_path / "out.pt")) == r.sha256_after
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []
    with pytest.raises(RequestRefused, match="--out must differ from --checkpoint"):
        log.forget_checkpoint(tmp_path / "out.pt", tmp_path / "out.pt", "B", [1], max_undone=1.0)
    bad = _copy(state)
    bad["0.weight"] = torch.zeros(8, 6)
    torch.save(bad, tmp_path / "bad.pt")
    _refused_writes_nothing(path, state, lambda: log.forget_checkpoint(
        tmp_path / "bad.pt", tmp_path / "o2.pt", "B", [1], max_undone=1.0), RequestRefused,
        "--checkpoint does not fit the store.*'0.weight'.*shape \\(8, 6\\)")
    assert not (tmp_path / "o2.pt").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RequestRefused, match="--checkpoint: .*junk.pt is not a torch.save file"):
        log.forget_checkpoint(tmp_path / "junk.pt", tmp_path / "o3.pt", "B", [1], max_undone=1.0)


def test_a_whole_last_entry_that_fails_its_checksum_refuses_the_log(run):
    """A kill writes a prefix of an entry, never wrong bytes: a whole entry that fails its checksum may be an
    acknowledged request, so it is not dropped like a torn one."""
    store, state, path = run
    log = RequestLog(path, store)
    log.forget(_copy(state), "A", [0], max_undone=1.0)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="whole but fails its checksum"):
        RequestLog(path, store)


def test_a_store_that_lost_records_since_the_log_was_made_is_named_as_damaged(run):
    store, state, path = run
    cut = store._where[-1][0] + 30  # the last record torn
    with open(store.path, "r+b") as f:
        f.truncate(cut)
    with pytest.warns(RuntimeWarning), pytest.raises(ValueError, match="lost records since .* was made"):
        RequestLog(path, DiskStore(store.path))


def test_no_log_is_created_implicitly(tmp_path):
    state = _record(tmp_path / "run.ulx")
    with pytest.raises(FileNotFoundError, match="no request log there"):
        RequestLog(tmp_path / "typo.requests", DiskStore(tmp_path / "run.ulx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ulx"]
    RequestLog.create(tmp_path / "run.ulx.requests", DiskStore(tmp_path / "run.ulx"), state)
    with pytest.raises(FileExistsError, match="never replaced"):
        RequestLog.create(tmp_path / "run.ulx.requests", DiskStore(tmp_path / "run.ulx"), state)

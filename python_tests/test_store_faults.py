"""DiskStore under faults (issue 8): a recording process killed at random points, bytes corrupted, a full
disk, and calls that must refuse without writing. The trials come from fault_injection.py (which
benchmarks/store_fault_injection.py runs 200+ times); here a dozen of each kind, plus targeted cases."""
import errno
import os
import random
import threading
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

import fault_injection as fi  # noqa: E402
from unlearn_ext import ops  # noqa: E402
from unlearn_ext.record import DiskStore, MemoryStore, UpdateRecorder  # noqa: E402
from unlearn_ext.record import disk_store  # noqa: E402
from unlearn_ext.record.disk_format import trailer  # noqa: E402
from unlearn_ext.record.validation import check_update  # noqa: E402

pytestmark = [pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork"), pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    fi.warm_up(str(d))
    return str(d)


@pytest.fixture(scope="module")
def goldens(workdir):
    return {c: fi.make_golden(workdir, c) for c in fi.CONFIGS}


# -- kills ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["byte", "time"])
def test_killed_recording_keeps_every_written_record(mode, workdir, goldens):
    """7 + 7 kills at random moments / random bytes: the reopened store is a byte prefix of the golden
    run, holds every flushed step, drops at most a torn tail, loses at most the record being written
    (when flushing every step) and takes the next record."""
    rng = random.Random(f"kill-{mode}")
    outcomes = [fi.kill_trial(workdir, goldens[c], rng, mode) for c in list(fi.CONFIGS) * 2][:7]
    if mode == "byte":  # every byte budget inside the records kills the writer part-way
        assert all(o["killed"] for o in outcomes)
        assert sum(o["torn"] for o in outcomes) >= 1


def test_torn_tail_at_every_point_of_a_record(workdir, goldens):
    """Cut the file at many points of its last record (and inside its 36 bytes of header and fixed
    body) or of its trailer: always the records before it, a torn tail reported and a warning that
    says only that the file was not closed cleanly."""
    g = goldens["r1-fp32"]
    lo, hi = g.record_range(fi.N_STEPS - 1)
    path = os.path.join(workdir, "torn.ulx")
    cuts = list(range(lo + 1, lo + 37)) + list(range(lo + 37, hi, 97)) + [hi - 1]
    cuts += list(range(g.records_end + 1, len(g.data)))  # inside the trailer
    for cut in cuts:
        with open(path, "wb") as f:
            f.write(g.data[:cut])
        store = fi.open_quietly(path)
        kept = fi.N_STEPS - (cut < g.records_end)
        assert len(store) == kept and store.dropped.unclean and store.dropped.expected is None
        (region,) = store.dropped.regions
        start = lo if cut < g.records_end else g.records_end
        assert (region.offset, region.nbytes, region.reason, region.tail) == (start, cut - start, "torn tail", True)
        assert region.after_step == kept - 1 and region.before_step is None


@pytest.mark.parametrize("into_trailer", [0, 7])
def test_a_kill_while_closing_keeps_every_record_and_reports_no_clean_close(into_trailer, workdir, goldens):
    """Killed as close() writes the trailer (before its first byte, or 7 bytes into it): every record is
    kept, the file opens as not closed cleanly (a torn trailer as a torn tail), and no damage is claimed."""
    g = goldens["r1-fp32"]
    path = os.path.join(workdir, "closing.ulx")
    if os.path.exists(path):
        os.unlink(path)
    budget = g.records_end - g.header_end + into_trailer
    res = fi.run_child(lambda fd: fi.record_run(path, g.config, flush_every=False, kill_after=budget, report_fd=fd))
    assert res.killed and not res.steps(b"C")
    store = fi.open_quietly(path)
    assert store.steps() == list(range(fi.N_STEPS)) and store.dropped.unclean and not store.dropped.damaged
    torn = [(r.offset, r.nbytes, r.reason) for r in store.dropped.regions]
    assert torn == ([(g.records_end, into_trailer, "torn tail")] if into_trailer else [])
    assert Path(path).read_bytes() == g.data[:g.records_end + into_trailer]


# -- corruption -------------------------------------------------------------------------------------------

def test_random_corruption_keeps_every_intact_record(workdir, goldens):
    rng = random.Random("corrupt")
    kinds = ["flip", "flip-many", "zero-block", "garbage-block", "truncate", "flip-last"]
    for i in range(24):
        fi.corruption_trial(workdir, goldens[list(fi.CONFIGS)[i % 4]], rng, kinds[i % len(kinds)])


@pytest.mark.parametrize("where", ["body", "header"])
def test_a_damaged_record_in_the_middle_is_dropped_and_reported(where, workdir, goldens, tmp_path):
    g = goldens["r10-fp16"]
    lo, hi = g.record_range(5)
    data = bytearray(g.data)
    data[lo + 6 if where == "header" else (lo + hi) // 2] ^= 0x10
    path = tmp_path / "mid.ulx"
    path.write_bytes(data)
    with pytest.warns(RuntimeWarning, match="can no longer be removed"):
        store = DiskStore(path, model=fi.make_model())
    assert store.steps() == [s for s in range(fi.N_STEPS) if s != 5]
    (region,) = store.dropped.regions
    assert (region.offset, region.nbytes, region.after_step, region.before_step, region.tail) == (lo, hi - lo, 4, 6,
                                                                                                   False)
    assert region.reason == ("damaged record header" if where == "header" else "checksum mismatch")
    assert store.dropped.damaged == [region] and not store.dropped.torn_tail
    with pytest.raises(ValueError, match="damaged"):
        DiskStore(path, strict=True)
    # the survivors still unlearn: applying them equals applying the golden records without step 5
    kept = store.steps()
    model_a, model_b = fi.make_model(), fi.make_model()
    store.apply(model_a, kept)
    g.store.apply(model_b, kept)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    # appending after the damage works; the damage stays in the file and is reported again
    (nxt,) = g.store.records([fi.N_STEPS - 1])
    with pytest.warns(RuntimeWarning), DiskStore(path) as again:
        again.append(fi.N_STEPS, nxt.sample_ids, nxt.values, nxt.indices, nxt.offsets)
    with pytest.warns(RuntimeWarning):
        reopened = DiskStore(path)
    assert reopened.steps() == kept + [fi.N_STEPS] and reopened.dropped.regions == [region]


def test_a_damaged_manifest_raises(goldens, tmp_path):
    g = goldens["r1-fp32"]
    data = bytearray(g.data)
    data[30] ^= 1
    path = tmp_path / "m.ulx"
    path.write_bytes(data)
    with pytest.raises(ValueError, match="manifest is damaged"):
        DiskStore(path)
    path.write_bytes(b"not a store at all, just some bytes")
    with pytest.raises(ValueError, match="not an update store"):
        DiskStore(path)


# -- full disk ---------------------------------------------------------------------------------------------

def test_file_size_limit_gives_a_clear_error_and_keeps_earlier_records(workdir, goldens):
    rng = random.Random("full")
    names = list(fi.CONFIGS)
    outcomes = [fi.disk_full_trial(workdir, goldens[names[i]], rng, "rlimit") for i in range(3)]
    kept = [o for o in outcomes if o["kept"]]
    assert len(kept) == len(outcomes), outcomes  # the seeded limits all fall past the manifest
    assert all("failed" in o["message"] and "File too large" in o["message"] for o in kept)
    # a limit below the manifest: the store cannot even be created, and says so
    tiny = fi.disk_full_trial(workdir, goldens["r1-fp32"], rng, "rlimit", limit=40)
    assert tiny["phase"] == "manifest" and "File too large" in tiny["message"]


def test_full_tmpfs_gives_a_clear_error_and_keeps_earlier_records(workdir, goldens):
    if not fi.tmpfs_available(workdir):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    rng = random.Random("tmpfs")
    out = fi.disk_full_trial(workdir, goldens["r50-bf16"], rng, "tmpfs", limit=4096 * 64)
    assert out["kept"] > 0 and "No space left on device" in out["message"]


class _FailingFile:
    """Raises ENOSPC once ``budget`` bytes are written (writing what fits first, as a real disk does)."""

    def __init__(self, f, budget):
        self._f, self.left = f, budget

    def write(self, data):
        view = memoryview(data).cast("B")
        if len(view) <= self.left:
            self.left -= len(view)
            return self._f.write(view)
        if self.left:
            n = self._f.write(view[:self.left])
            self.left -= n
            return n
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)


class _FullDiskStore(DiskStore):
    budget = 0

    def _open_writer(self):
        return _FailingFile(super()._open_writer(), self.budget)


def _fill(store, golden, steps):
    for rec in golden.store.records(steps):
        store.append(rec.step, rec.sample_ids, rec.values, rec.indices, rec.offsets)


def test_write_error_is_raised_not_swallowed(goldens, tmp_path):
    g = goldens["r10-fp16"]
    path = tmp_path / "enospc.ulx"
    store = _FullDiskStore(path, max_pending=2)
    store.bind(g.store.manifest)
    store.budget = g.record_range(6)[1] - g.header_end + 100  # 7 records fit, the 8th is cut
    _fill(store, g, range(7))
    store.flush()  # nothing lost so far
    with pytest.raises(OSError, match="step 7 failed") as info:
        _fill(store, g, range(7, 9))  # raises here or at the flush, whichever comes after the failure
        store.flush()
    assert info.value.errno == errno.ENOSPC and "the 7 record(s) before it are on disk" in str(info.value)
    assert len(store) == 7 and store.steps() == list(range(7))  # the store no longer claims lost records
    with pytest.raises(OSError, match="step 7 failed"):  # and keeps refusing
        _fill(store, g, [9])
    store.close()  # already reported: close does not raise it again
    reopened = fi.open_quietly(path)
    assert reopened.steps() == list(range(7)) and not reopened.dropped.regions  # the cut record was removed
    assert reopened.dropped.unclean  # and the trailer was not written
    assert os.path.getsize(path) == g.record_range(6)[1]
    # a later run resumes after the last good record
    with fi.open_quietly(path) as again:
        _fill(again, g, range(7, fi.N_STEPS))
    assert Path(path).read_bytes() == g.data


def test_unreported_write_error_surfaces_at_close_and_at_exit(goldens, tmp_path, capsys):
    g = goldens["r1-fp32"]
    for closing in ("close", "exit"):
        store = _FullDiskStore(tmp_path / f"{closing}.ulx")
        store.bind(g.store.manifest)
        store.budget = 10
        _fill(store, g, [0])
        if closing == "close":
            with pytest.raises(OSError, match="step 0 failed"):
                store.close()
        else:
            disk_store._close_at_exit(weakref.ref(store))
            assert "step 0 failed" in capsys.readouterr().err


def test_append_blocks_when_the_queue_is_full(goldens, tmp_path):
    """Back-pressure: with max_pending=1, one record being written and one queued, the next append waits."""
    g = goldens["r1-fp32"]
    release = threading.Event()

    class Slow(DiskStore):
        def _open_writer(self):
            f = super()._open_writer()
            orig = f.write

            class W:
                def write(self, data):
                    release.wait()
                    return orig(data)

                def __getattr__(self, name):
                    return getattr(f, name)
            return W()

    store = Slow(tmp_path / "slow.ulx", max_pending=1)
    store.bind(g.store.manifest)
    _fill(store, g, [0, 1])  # 0 is being written (blocked), 1 waits in the queue
    third = threading.Thread(target=_fill, args=(store, g, [2]))
    third.start()
    third.join(0.3)
    blocked = third.is_alive()
    release.set()
    third.join()
    store.close()
    assert blocked, "append did not wait for the full queue"
    assert DiskStore(tmp_path / "slow.ulx").steps() == [0, 1, 2]


# -- refusals write nothing ----------------------------------------------------------------------------------

def _bad_calls(m, v, i, o):
    nan = v.clone()
    nan[3] = float("nan")
    unsorted = i.clone()
    unsorted[[0, 1]] = unsorted[[1, 0]]
    out_of_range = i.clone()
    out_of_range[int(o[1]) - 1] = m.numels[0]
    return {
        "float ids": (5, torch.tensor([1.5, 2.0]), v, i, o),
        "bool ids": (5, torch.tensor([True, False]), v, i, o),
        "float ids list": (5, [1.0, 2.5], v, i, o),
        "negative step": (-1, [1], v, i, o),
        "float step": (5.5, [1], v, i, o),
        "repeated step": (2, [1], v, i, o),
        "too few offsets": (5, [1], v, i, o[:-1]),
        "offsets not from 0": (5, [1], v, i, o + 1),
        "values/indices length": (5, [1], v[:-1], i, o),
        "int values": (5, [1], v.to(torch.int32), i, o),
        "2-D values": (5, [1], v.view(1, -1), i, o),
        "float indices": (5, [1], v, i.float(), o),
        "unsorted indices": (5, [1], v, unsorted, o),
        "index out of range": (5, [1], v, out_of_range, o),
        "NaN value": (5, [1], nan, i, o),
        "dense with wrong sizes": (5, [1], v, None, o),
        "fp16 overflow": (5, [1], v * 1e12, i, o),
    }


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_refused_calls_write_nothing(kind, goldens, tmp_path):
    g = goldens["r10-fp16"]
    path = tmp_path / "refuse.ulx"
    store = DiskStore(path) if kind == "disk" else MemoryStore()
    store.bind(g.store.manifest)
    _fill(store, g, range(3))
    store.flush()
    size, nbytes = (os.path.getsize(path) if kind == "disk" else None), store.nbytes()
    (rec,) = g.store.records([3])
    values = rec.values.float()
    for name, args in _bad_calls(g.store.manifest, values, rec.indices, rec.offsets).items():
        with pytest.raises(ValueError):
            store.append(*args)
        store.flush()
        assert len(store) == 3 and store.nbytes() == nbytes, name
        if kind == "disk":
            assert os.path.getsize(path) == size, name
    store.append(3, rec.sample_ids, values, rec.indices, rec.offsets)  # a good call still works
    store.close()
    if kind == "disk":
        closed = g.data[:g.record_range(3)[1]] + trailer(4)
        assert Path(path).read_bytes() == closed
        store = DiskStore(path)
        with pytest.raises(ValueError, match="closed"):  # a closed store refuses too
            store.close() or store.append(4, rec.sample_ids, values, rec.indices, rec.offsets)
        assert Path(path).read_bytes() == closed


def test_a_store_of_another_model_raises_naming_it(goldens, tmp_path):
    g = goldens["r1-fp32"]
    path = tmp_path / "other.ulx"
    path.write_bytes(g.data)
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(48, 192), nn.ReLU(), nn.Linear(192, 100), nn.ReLU(), nn.Linear(100, 10))
    fp = g.store.manifest.fingerprint
    with pytest.raises(ValueError, match=rf"other\.ulx.*another model.*{fp}.*layer '2\.weight' is \(192, 192\)"):
        DiskStore(path, model=other)
    store = DiskStore(path)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(ValueError, match="another model"):
        store.apply(other)
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), before))
    with pytest.raises(ValueError, match=r"another model.*layer '2\.weight'"):
        UpdateRecorder(other, keep_ratio=0.01, store=store)
    with pytest.raises(ValueError, match="keep_ratio"):  # the same model recorded with other settings
        UpdateRecorder(fi.make_model(), keep_ratio=0.5, store=store)
    assert path.read_bytes() == g.data  # nothing written by any refusal


def test_a_failing_optimizer_step_records_nothing(tmp_path):
    model = fi.make_model()
    with DiskStore(tmp_path / "s.ulx") as store:
        rec = UpdateRecorder(model, keep_ratio=0.1, store=store)
        with pytest.raises(RuntimeError, match="boom"):
            with rec.step([1, 2]):
                raise RuntimeError("boom")
        assert len(store) == 0 and rec.step_count == 0
    with pytest.raises(ValueError, match="integer dtype"):
        with rec.step(torch.tensor([0.5])):
            pass
    assert len(DiskStore(tmp_path / "s.ulx")) == 0


def test_layerwise_topk_output_is_accepted_as_is():
    """The validation accepts exactly what the recorder produces (int32 ascending indices)."""
    layers = [torch.randn(30, 7), torch.randn(5), torch.randn(1)]
    v, i, o = ops.layerwise_topk(layers, 0.3)
    check_update([t.numel() for t in layers], v, i, o)

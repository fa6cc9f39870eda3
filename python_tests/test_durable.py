"""Folder locks and atomic writes (issue 24 item 0, issue 30 item 6): a live run's folder is never taken by
another run — another process, or a second run in this process — while the experiment a run starts shares
its lock; a lock file removed by its holder is never locked by a late opener; a temporary store of a live
library run (Experiment) is never deleted by another run."""
import multiprocessing
import os

import pytest

from unlearn_ext.durable import LOCK_NAME, FolderInUse, FolderLock, atomic_write
from unlearn_ext.experiment import Experiment, ExperimentConfig


def _hold(folder, ready, done):
    with FolderLock(folder, "store_dir"):
        ready.set()
        done.wait(60)


@pytest.fixture
def held_elsewhere(tmp_path):
    """A folder locked by another live process for the duration of the test."""
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(tmp_path / "stores"), ready, done))
    proc.start()
    assert ready.wait(30)
    yield tmp_path / "stores", proc.pid
    done.set()
    proc.join(30)


def test_another_process_is_refused_naming_the_holder(held_elsewhere):
    folder, pid = held_elsewhere
    with pytest.raises(FolderInUse, match=f"store_dir: {folder} is in use by a live run \\(pid {pid}\\)"):
        FolderLock(folder, "store_dir", join=True).acquire()


def test_a_second_hold_in_this_process_is_refused_unless_it_joins(tmp_path):
    first = FolderLock(tmp_path / "f", "--out").acquire()
    with pytest.raises(FolderInUse, match=f"pid {os.getpid()}, this process"):
        FolderLock(tmp_path / "f", "--out").acquire()
    joined = FolderLock(tmp_path / "f", "store_dir", join=True).acquire()
    first.release()
    with pytest.raises(FolderInUse):  # still held by the joined holder
        FolderLock(tmp_path / "f").acquire()
    joined.release(remove_empty_folder=True)
    assert not (tmp_path / "f").exists()
    FolderLock(tmp_path / "f").acquire().release()


def test_a_lock_file_removed_by_its_holder_is_not_locked_by_a_late_opener(tmp_path, monkeypatch):
    """The holder removes its lock file (leaving an empty folder) while another process had opened it: the
    late opener must lock the new file at the path, not the removed one."""
    folder = tmp_path / "f"
    holder = FolderLock(folder).acquire()
    stale = os.open(folder / LOCK_NAME, os.O_RDWR)  # opened before the holder removes it
    real_open = os.open
    opened = []

    def open_stale_first(path, *args, **kw):
        if str(path).endswith(LOCK_NAME) and not opened:
            opened.append(path)
            return os.dup(stale)
        return real_open(path, *args, **kw)

    os.unlink(folder / LOCK_NAME)
    holder.release()
    monkeypatch.setattr(os, "open", open_stale_first)
    late = FolderLock(folder).acquire()
    monkeypatch.undo()
    assert opened and os.path.exists(folder / LOCK_NAME)
    with pytest.raises(FolderInUse):  # the lock at the path is really held
        ctx = multiprocessing.get_context("fork")
        result = ctx.Queue()
        p = ctx.Process(target=lambda: result.put(_try_lock(str(folder))))
        p.start()
        p.join(30)
        raise result.get(timeout=5)
    late.release()
    os.close(stale)


def _try_lock(folder):
    try:
        FolderLock(folder).acquire()
        return AssertionError("the lock was free")
    except FolderInUse as e:
        return e


def test_a_live_experiments_temporary_stores_are_never_deleted_by_another(held_elsewhere):
    folder, pid = held_elsewhere
    live = folder / "amnesiac-dense-seed0.ulx"
    live.write_bytes(b"a live run's records")
    cfg = ExperimentConfig(dataset="digits", model="mlp", methods=["amnesiac"], epochs=1, train_size=100,
                           test_size=60, forget_ratio=0.1, store_dir=str(folder), keep_stores=False)
    exp = Experiment(cfg)
    with pytest.raises(FolderInUse, match=f"pid {pid}"):
        exp.train(progress=False)
    exp.close()
    assert live.read_bytes() == b"a live run's records"


def test_atomic_write_keeps_the_old_file_on_failure_and_removes_dead_writers_temporaries(tmp_path):
    path = tmp_path / "results.json"
    atomic_write(path, b"old")

    def fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["results.json"]
    dead = tmp_path / ".results.json.tmp999999999.0"  # a writer killed before its rename (no such pid)
    dead.write_bytes(b"torn")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["results.json"]

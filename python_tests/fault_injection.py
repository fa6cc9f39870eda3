"""Fault injection for DiskStore (issue 8), test infrastructure: kill the recording process at random
points, corrupt bytes, fill the disk — and check what reopening the store keeps and reports. The test
suite (test_store_faults.py) runs a few dozen trials; benchmarks/store_fault_injection.py runs hundreds
and writes a report.

Every trial records a small MLP's training run (``UpdateRecorder`` into a ``DiskStore``) in a forked
child process. The same run without faults gives the *golden* file of each configuration (dense fp32,
partial r=10% fp16, r=50% bf16, r=1% fp32; the child runs one thread, so it is deterministic). Faults:

* **kill (time)** — the parent SIGKILLs the child at a uniformly random moment of its run (up to 0.9× the
  golden run's duration, which includes starting and closing);
* **kill (byte)** — the child's writer SIGKILLs its own process after a uniformly random number of
  record bytes has reached the file (so a tear lands anywhere: in a header, a body, on a boundary);
* **corruption** — a copy of a golden file gets random bytes flipped, a block zeroed or overwritten
  with garbage, or is truncated; reopening must keep exactly the records whose bytes are unchanged;
* **disk full** — the child records under ``RLIMIT_FSIZE`` (``EFBIG``) or into a tiny tmpfs
  (``ENOSPC``, when this machine lets us mount one) until the write fails.

After a kill the reopened store must: open without error, hold steps 0..n-1 whose bytes are a prefix of
the golden file, hold every step the child had seen ``flush()`` return for, report at most a torn tail
and — unless the kill came after the closing trailer was written — that the file was not closed
cleanly (with a warning that says only that), lose at most the one record being written (child
flushing every step) or at most the queue plus one (no flush), and accept the next record (appending
after the dropped tail and closing gives the golden bytes with a trailer counting the records).
"""
from __future__ import annotations

import errno
import os
import random
import resource
import select
import shutil
import signal
import struct
import subprocess
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unlearn_ext.record import DiskStore, UpdateRecorder
from unlearn_ext.record.disk_format import TRAILER, trailer

CONFIGS = {
    "dense-fp32": (None, torch.float32),
    "r10-fp16": (0.1, torch.float16),
    "r50-bf16": (0.5, torch.bfloat16),
    "r1-fp32": (0.01, torch.float32),
}
N_STEPS = 24
_EVENT = struct.Struct("<ci")


# -- the recording run (executed in a forked child) ----------------------------------------------------

def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 192), nn.ReLU(), nn.Linear(192, 192), nn.ReLU(), nn.Linear(192, 10))


def batches(n_steps: int = N_STEPS, batch: int = 16):
    g = torch.Generator().manual_seed(1)
    n = n_steps * batch
    x, y = torch.randn(n, 48, generator=g), torch.randint(0, 10, (n,), generator=g)
    ids = torch.randperm(n, generator=g)
    for s in range(n_steps):
        b = ids[s * batch:(s + 1) * batch]
        yield x[b], y[b], b


class _KillingFile:
    """A file whose owner process is SIGKILLed once ``budget`` more bytes would have been written."""

    def __init__(self, f, budget: int):
        self._f, self.left = f, budget

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) <= self.left:
            n = self._f.write(view)
            self.left -= n
            return n
        if self.left:
            self._f.write(view[:self.left])
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # never reached
        raise AssertionError("SIGKILL did not kill")

    def __getattr__(self, name):
        return getattr(self._f, name)


class KillingDiskStore(DiskStore):
    """DiskStore whose writer kills the process after ``kill_after`` record bytes (test harness only)."""

    kill_after: Optional[int] = None

    def _open_writer(self):
        f = super()._open_writer()
        return f if self.kill_after is None else _KillingFile(f, self.kill_after)


def _emit(fd: Optional[int], tag: bytes, value: int = 0) -> None:
    if fd is not None:
        os.write(fd, _EVENT.pack(tag, value))


def record_run(path: str, config: str, *, max_pending: int = 4, flush_every: bool = True,
               kill_after: Optional[int] = None, report_fd: Optional[int] = None, n_steps: int = N_STEPS) -> None:
    """Train ``make_model()`` for ``n_steps`` SGD steps, recording into ``path``. Events on ``report_fd``:
    ``S`` started, ``A k`` step k about to be appended, ``F k`` flush() returned after step k, ``C`` closed,
    ``E errno`` the store raised OSError."""
    keep_ratio, value_dtype = CONFIGS[config]
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    store = KillingDiskStore(path, max_pending=max_pending)
    store.kill_after = kill_after
    _emit(report_fd, b"S")
    try:
        rec = UpdateRecorder(model, keep_ratio=keep_ratio, store=store, value_dtype=value_dtype)
        for step, (x, y, ids) in enumerate(batches(n_steps)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            _emit(report_fd, b"A", step)
            with rec.step(ids):
                opt.step()
            if flush_every:
                store.flush()
                _emit(report_fd, b"F", step)
        store.close()
        _emit(report_fd, b"C")
    except OSError as e:
        _emit(report_fd, b"E", e.errno or 0)
        if report_fd is not None:
            msg = str(e).encode()[:4000]
            os.write(report_fd, _EVENT.pack(b"M", len(msg)) + msg)
        raise


@dataclass
class ChildResult:
    status: int  # os.waitpid status
    events: List[tuple]
    message: str
    seconds: float

    @property
    def killed(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL

    def steps(self, tag: bytes) -> List[int]:
        return [v for t, v in self.events if t == tag]


def run_child(target, *, kill_delay: Optional[float] = None, fsize_limit: Optional[int] = None,
              timeout: float = 60.0) -> ChildResult:
    """Fork, run ``target(report_fd)`` in the child (one torch thread), optionally SIGKILL it
    ``kill_delay`` seconds after it started; collect its events."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(r)
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
            if fsize_limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target(w)
            code = 0
        except OSError:
            code = 3
        except BaseException:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    os.close(w)
    raw = bytearray()
    started = killed = None
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if started is None and raw:
            started = now
        if kill_delay is not None and started is not None and killed is None and now - started >= kill_delay:
            os.kill(pid, signal.SIGKILL)
            killed = now
        if now > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(r)
            raise AssertionError("the child process hung")
        wait = 0.05
        if kill_delay is not None and started is not None and killed is None:
            wait = max(0.0, min(wait, started + kill_delay - now))
        ready, _, _ = select.select([r], [], [], wait)
        if ready:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            raw += chunk
    _, status = os.waitpid(pid, 0)
    os.close(r)
    events, message, o = [], "", 0
    while o + _EVENT.size <= len(raw):
        tag, value = _EVENT.unpack_from(raw, o)
        o += _EVENT.size
        if tag == b"M":
            message = raw[o:o + value].decode(errors="replace")
            o += value
        else:
            events.append((tag, value))
    return ChildResult(status, events, message, time.perf_counter() - t0)


# -- golden runs ----------------------------------------------------------------------------------------

@dataclass
class Golden:
    config: str
    path: str
    data: bytes
    seconds: float
    store: DiskStore

    @property
    def header_end(self) -> int:
        return self.store._where[0][0]

    @property
    def records_end(self) -> int:
        """Where the closing trailer starts."""
        return len(self.data) - TRAILER.size

    def record_range(self, i: int):
        offset, size = self.store._where[i]
        return offset, offset + size


def warm_up(workdir: str) -> None:
    """One short recording run in this process, so that the lazy imports of the first optimizer step
    (torch._dynamo, about a second) happen once here rather than in every forked child."""
    path = os.path.join(workdir, "warm-up.ulx")
    record_run(path, "r10-fp16", n_steps=2)
    os.unlink(path)


def make_golden(workdir: str, config: str) -> Golden:
    path = os.path.join(workdir, f"golden-{config}.ulx")
    if os.path.exists(path):
        os.unlink(path)
    res = run_child(lambda fd: record_run(path, config, report_fd=fd, flush_every=False))
    if res.status != 0 or res.steps(b"C") != [0]:
        raise RuntimeError(f"golden run {config} failed (status {res.status})")
    with open(path, "rb") as f:
        data = f.read()
    store = DiskStore(path)
    if len(store) != N_STEPS or store.dropped:
        raise RuntimeError(f"golden run {config} is incomplete")
    return Golden(config, path, data, res.seconds, store)


def _sample(items, rng: random.Random, k: int = 3) -> list:
    """The first and last of ``items`` and ``k - 2`` random others (what gets fully decoded)."""
    items = list(items)
    if len(items) <= k:
        return items
    return sorted({items[0], items[-1], *rng.sample(items[1:-1], k - 2)})


def _check_prefix(store: DiskStore, golden: Golden, path: str) -> int:
    """The store's intact records are a byte prefix of the golden file; returns their count."""
    n = len(store)
    assert store.steps() == list(range(n)), f"steps {store.steps()} are not 0..{n - 1}"
    end = store._where[-1][0] + store._where[-1][1] if n else golden.header_end
    assert store._where == golden.store._where[:n], "records are not where the golden file has them"
    with open(path, "rb") as f:
        assert f.read(end) == golden.data[:end], "the intact records differ from the golden run's"
    for i in _sample(range(n), random.Random(n)):  # and they decode to the golden updates
        for a, b in zip(store.load_batch([i]), golden.store.load_batch([i])):
            assert torch.equal(a, b)
    return n


def open_quietly(path: str, **kw) -> DiskStore:
    """Open a store that may not have been closed cleanly; any warning but that one fails."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = DiskStore(path, **kw)
    check_warnings(store, caught)
    return store


def check_warnings(store: DiskStore, caught) -> None:
    """Opening warned once exactly when there was something to report, and (no damage being expected)
    only that the file was not closed cleanly."""
    messages = [str(w.message) for w in caught]
    assert len(messages) == bool(store.dropped), f"warnings {messages} for {store.dropped}"
    assert all("not closed cleanly" in m and "lost" not in m for m in messages), messages


def _check_resume(path: str, golden: Golden, n: int) -> None:
    """Appending the next golden record after a kill and closing gives the golden file's bytes and a
    trailer counting the records."""
    store = open_quietly(path, model=make_model())
    if n == N_STEPS:  # no golden record left to append: a reader's close() leaves the file as it is
        store.close()
        return
    (nxt,) = golden.store.records([n])
    store.append(n, nxt.sample_ids, nxt.values, nxt.indices, nxt.offsets)
    n += 1
    store.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = DiskStore(path)
    assert not again.dropped and len(again) == n, f"after resuming: {again.dropped}, {len(again)} records"
    end = golden.record_range(n - 1)[1]
    with open(path, "rb") as f:
        assert f.read() == golden.data[:end] + trailer(n), "the resumed file differs from the golden file"


# -- trials ---------------------------------------------------------------------------------------------

def kill_trial(workdir: str, golden: Golden, rng: random.Random, mode: str) -> Dict:
    """One kill; returns what happened. Raises AssertionError when the store broke a promise."""
    path = os.path.join(workdir, "kill.ulx")
    for p in (path,):
        if os.path.exists(p):
            os.unlink(p)
    max_pending = rng.choice([1, 2, 4, 16])
    flush_every = rng.random() < 0.5
    if mode == "byte":
        budget = rng.randrange(0, len(golden.data) - golden.header_end + 1)
        res = run_child(lambda fd: record_run(path, golden.config, max_pending=max_pending,
                                              flush_every=flush_every, kill_after=budget, report_fd=fd))
    else:
        delay = rng.uniform(0.0, 0.9 * golden.seconds)  # golden.seconds includes the fork and the close
        res = run_child(lambda fd: record_run(path, golden.config, max_pending=max_pending,
                                              flush_every=flush_every, report_fd=fd), kill_delay=delay)
    if not res.killed:
        assert res.status == 0 and res.steps(b"C") == [0], f"child exited with status {res.status}"
    leftovers = [f for f in os.listdir(workdir) if f.startswith("kill.ulx.tmp")]
    for f in leftovers:  # a kill while the manifest was being created leaves its temporary file
        os.unlink(os.path.join(workdir, f))
    out = {"mode": mode, "config": golden.config, "killed": res.killed, "flush_every": flush_every,
           "max_pending": max_pending}
    flushed = res.steps(b"F")
    appended = res.steps(b"A")
    if not os.path.exists(path):
        assert not flushed and not appended, "records were confirmed but the store file is missing"
        out.update(phase="before manifest", kept=0, lost=0, torn=False)
        return out
    store = open_quietly(path)  # must open
    assert not store.dropped.damaged, f"a kill caused damage other than a torn tail: {store.dropped}"
    assert store.dropped.count <= 1
    n = _check_prefix(store, golden, path)
    closed = not store.dropped.unclean
    assert not store.dropped.count_mismatch, f"the trailer does not count the records: {store.dropped}"
    # a trailer comes from creation (before the first append cuts it off) or from close()
    assert not closed or n in (0, N_STEPS), "a trailer although not every record was written"
    if res.steps(b"C"):
        assert closed and not store.dropped, f"close() returned but the file is {store.dropped}"
    if flushed:
        assert n >= max(flushed) + 1, f"step {max(flushed)} was flushed but only {n} records survived"
    lost = (max(appended) + 1 if appended else 0) - n
    if res.killed:
        bound = 1 if flush_every else max_pending + 2
        assert lost <= bound, f"lost {lost} records (bound {bound})"
    else:
        assert n == N_STEPS
    torn = store.dropped.torn_tail
    if torn:  # a torn record, or a torn trailer after the last record
        region = store.dropped.regions[0]
        at = golden.record_range(n)[0] if n < N_STEPS else golden.records_end
        assert region.offset == at, "the torn tail is misplaced"
    _check_resume(path, golden, n)
    if not res.killed:
        phase = "after the run"
    elif n == N_STEPS and not closed:
        phase = "closing"
    else:
        phase = "mid-record" if torn else "between records"
    out.update(phase=phase, kept=n, lost=max(lost, 0), torn=torn)
    return out


def _merge(ranges):
    out = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [tuple(r) for r in out]


def corruption_trial(workdir: str, golden: Golden, rng: random.Random, kind: Optional[str] = None) -> Dict:
    """Damage a copy of a golden file; reopening must keep exactly the unchanged records, report the
    damaged byte ranges (merged when adjacent; the trailer's counts as one) as dropped, a damaged or
    missing trailer as not closed cleanly, and an intact trailer whose count the lost records contradict."""
    data = bytearray(golden.data)
    start, size = golden.header_end, len(data)
    kind = kind or rng.choice(["flip", "flip-many", "zero-block", "garbage-block", "truncate", "flip-last"])
    if kind == "flip":
        data[rng.randrange(start, size)] ^= 1 << rng.randrange(8)
    elif kind == "flip-many":
        for _ in range(rng.randint(2, 6)):
            data[rng.randrange(start, size)] ^= rng.randrange(1, 256)
    elif kind in ("zero-block", "garbage-block"):
        lo = rng.randrange(start, size)
        hi = min(size, lo + rng.randint(1, 4096))
        data[lo:hi] = bytes(hi - lo) if kind == "zero-block" else rng.randbytes(hi - lo)
    elif kind == "flip-last":
        lo, hi = golden.record_range(N_STEPS - 1)
        data[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(start, size):]
    path = os.path.join(workdir, "corrupt.ulx")
    with open(path, "wb") as f:
        f.write(data)
    ranges = [golden.record_range(i) for i in range(N_STEPS)]
    changed = [i for i, (lo, hi) in enumerate(ranges) if bytes(data[lo:hi]) != golden.data[lo:hi]]
    tail = (golden.records_end, len(golden.data))
    trailer_changed = bytes(data[tail[0]:]) != golden.data[tail[0]:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = DiskStore(path)
    kept = [i for i in range(N_STEPS) if i not in changed]
    assert store.steps() == kept, f"{kind}: kept {store.steps()}, expected {kept}"
    for (lo, hi), i in zip(store._where, kept):
        assert (lo, lo + hi) == ranges[i]
    for i in _sample(kept, rng):  # they decode to the golden updates (their bytes are unchanged by definition)
        for a, b in zip(store.load_batch([i]), golden.store.load_batch([i])):
            assert torch.equal(a, b)
    damaged = [ranges[i] for i in changed] + ([tail] if trailer_changed else [])
    expected = _merge([(lo, min(hi, len(data))) for lo, hi in damaged if lo < len(data)])
    got = [(r.offset, r.offset + r.nbytes) for r in store.dropped.regions]
    assert got == expected, f"{kind}: dropped {got}, expected {expected}"
    d = store.dropped
    assert d.unclean == trailer_changed and d.expected == (None if trailer_changed else N_STEPS), str(d)
    assert d.count_mismatch == (bool(changed) and not trailer_changed), str(d)
    for r in store.dropped.regions:
        before = [i for i in kept if ranges[i][1] <= r.offset]
        after = [i for i in kept if ranges[i][0] >= r.offset + r.nbytes]
        assert r.after_step == (before[-1] if before else None) and r.before_step == (after[0] if after else None)
    assert len(caught) == bool(d), f"{kind}: warnings {[str(w.message) for w in caught]} for {d}"
    if d.damaged or d.count_mismatch:
        with pytest.raises(ValueError):
            DiskStore(path, strict=True)
    return {"kind": kind, "damaged_records": len(changed), "kept": len(kept), "regions": len(got),
            "unclean": d.unclean, "mismatch": d.count_mismatch, "warned": bool(caught)}


def disk_full_trial(workdir: str, golden: Golden, rng: random.Random, how: str = "rlimit",
                    limit: Optional[int] = None) -> Dict:
    """Record until the file system refuses: the child must get OSError (EFBIG/ENOSPC) naming the failed
    step (or the trailer, when only it did not fit), every record before it stays readable, and the
    file opens as not closed cleanly."""
    d = os.path.join(workdir, "full")
    os.makedirs(d, exist_ok=True)
    mounted = False
    if how == "tmpfs":
        limit = limit or 4096 * rng.randint(1, max(1, len(golden.data) // 4096))
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={limit}", "tmpfs", d], check=True,
                       capture_output=True)
        mounted = True
    try:
        path = os.path.join(d, "full.ulx")
        if os.path.exists(path):
            os.unlink(path)
        if how == "rlimit":
            limit = limit if limit is not None else rng.randrange(1, len(golden.data))
        res = run_child(lambda fd: record_run(path, golden.config, max_pending=rng.choice([1, 4]),
                                              flush_every=rng.random() < 0.5, report_fd=fd),
                        fsize_limit=limit if how == "rlimit" else None)
        want = errno.EFBIG if how == "rlimit" else errno.ENOSPC
        assert os.WIFEXITED(res.status), f"the child died: status {res.status}"
        assert [v for t, v in res.events if t == b"E"] == [want], \
            f"expected one OSError errno {want}, got {res.events[-3:]} (exit {os.WEXITSTATUS(res.status)})"
        assert not res.steps(b"C"), "close() succeeded although records were lost"
        leftovers = [f for f in os.listdir(d) if ".tmp" in f]
        assert not leftovers, f"temporary files left behind: {leftovers}"
        if not os.path.exists(path):  # the manifest itself did not fit
            assert "step" not in res.message
            return {"how": how, "limit": limit, "kept": 0, "phase": "manifest", "message": res.message}
        store = open_quietly(path)
        try:
            assert not store.dropped.regions and store.dropped.unclean, f"a full disk left {store.dropped}"
            n = _check_prefix(store, golden, path)
        finally:  # a handle keeps its file open until it is collected, and an open file keeps a tmpfs mounted
            store.close()
            del store
        if n == N_STEPS:
            assert "writing the trailer at close failed" in res.message, res.message
            assert f"all {n} records are on disk and readable" in res.message, res.message
        else:
            assert f"writing the record of step {n} failed" in res.message, res.message
            assert f"the {n} record(s) before it are on disk" in res.message, res.message
        flushed = res.steps(b"F")
        assert not flushed or max(flushed) < n
        return {"how": how, "limit": limit, "kept": n, "phase": "trailer" if n == N_STEPS else "records",
                "message": res.message}
    finally:
        if mounted:  # lazily: a tmpfs left mounted would hold the next trials' files and the work folder
            subprocess.run(["umount", "--lazy", d], check=True, capture_output=True)


def tmpfs_available(workdir: str) -> bool:
    d = os.path.join(workdir, "probe")
    os.makedirs(d, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", d], capture_output=True)
    return ok

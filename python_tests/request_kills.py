"""Kill tests for deletion requests (issue 24, item 4), test infrastructure: `unlearn-ext forget` runs in a
forked child that is SIGKILLed — at a named crash point (``UNLEARN_EXT_CRASH_AT``: the output written aside
but not renamed, the output in place but not logged, the log entry torn after n bytes, the entry logged but
the command not finished) or at a uniformly
random moment within the first 70 % of the shortest uninterrupted run — and then the same command runs again. The promise checked after every trial:

* the second run exits 0;
* its output is bitwise the output of an uninterrupted run (same SHA-256);
* the log holds the requests served so far, each exactly once, with the receipts of an uninterrupted run
  (everything but wall time and time stamp);
* no temporary file is left beside the output (the rerun removes those of the killed process).

The test suite (test_deletion_kills.py) runs every named point and a few random kills;
benchmarks/request_kill_injection.py runs hundreds and writes a report.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import nn

from unlearn_ext.deletion import RequestLog, state_digest
from unlearn_ext.deletion.commands import forget_main, read_receipts
from unlearn_ext.durable import CRASH_ENV
from unlearn_ext.record import DiskStore, UpdateRecorder

#: request id → sample ids; B and C share steps with A (checked by make_scenario), D only repeats ids of A.
REQUESTS = {"A": [0, 1], "B": [2], "C": [3, 9], "D": [1]}
N_SAMPLES, BATCH, EPOCHS = 16, 4, 3
VOLATILE = ("seconds", "started_at")
NAMED_POINTS = ["atomic-write-before-rename", "request-after-commit", "request-after-log", "log-entry:0", "log-entry:1",
                "log-entry:19", "log-entry:20", "log-entry:21", "log-entry:300", "log-entry:-1"]


@dataclass
class Scenario:
    """A trained, recorded model and the uninterrupted run of its requests: ``before[i]`` is the folder as it
    was before request i, ``digests[i]`` its output's SHA-256, ``entries`` the log's receipts (without
    :data:`VOLATILE` fields), ``entry_sizes[i]`` the bytes of request i's log entry, ``seconds`` the shortest
    request's run (from the fork's return to the child's exit)."""

    root: str
    before: List[str]
    digests: List[str]
    entries: List[dict]
    entry_sizes: List[int]
    seconds: float


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _record(folder: str) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(N_SAMPLES, 6, generator=g), torch.randint(0, 3, (N_SAMPLES,), generator=g)
    with DiskStore(os.path.join(folder, "run.ulx")) as store:
        rec = UpdateRecorder(model, keep_ratio=0.5, store=store, value_dtype=torch.float16)
        for _ in range(EPOCHS):
            for b in torch.randperm(N_SAMPLES, generator=g).split(BATCH):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[b]), y[b]).backward()
                with rec.step(b):
                    opt.step()
    torch.save(model.state_dict(), os.path.join(folder, "model.pt"))
    RequestLog.create(os.path.join(folder, "run.ulx.requests"), DiskStore(os.path.join(folder, "run.ulx")), model)
    for rid, ids in REQUESTS.items():
        with open(os.path.join(folder, f"{rid}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))


def argv(folder: str, index: int) -> List[str]:
    """The `unlearn-ext forget` arguments of request ``index`` (its input: the previous request's output)."""
    rid = list(REQUESTS)[index]
    source = "model.pt" if index == 0 else f"out-{list(REQUESTS)[index - 1]}.pt"
    return ["--store", os.path.join(folder, "run.ulx"), "--checkpoint", os.path.join(folder, source),
            "--ids", os.path.join(folder, f"{rid}.txt"), "--out", os.path.join(folder, f"out-{rid}.pt"),
            "--request-id", rid, "--max-undone", "1"]


def run_child(args: List[str], crash: Optional[str]) -> int:
    """Fork a child running `forget` on ``args`` (``crash``: the named crash point); its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            if crash is not None:
                os.environ[CRASH_ENV] = crash
            torch.set_num_threads(1)
            try:
                code = forget_main(args)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        finally:
            os._exit(code)
    return pid


def _run_here(args: List[str]) -> int:
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            return forget_main(args)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1


def _entries(folder: str) -> List[dict]:
    return [{k: v for k, v in r.to_dict().items() if k not in VOLATILE}
            for r in read_receipts(os.path.join(folder, "run.ulx.requests"))[1]]


def make_scenario(root: str) -> Scenario:
    """Record the model under ``root``/start and serve every request without a fault, keeping the folder as
    it was before each request (``root``/before-<i>)."""
    start = os.path.join(root, "start")
    os.makedirs(start)
    _record(start)
    store = DiskStore(os.path.join(start, "run.ulx"))
    steps = {rid: set(store.steps_containing(ids)) for rid, ids in REQUESTS.items()}
    assert steps["A"] & steps["B"] and steps["A"] & steps["C"] and steps["D"] <= steps["A"], steps
    work = os.path.join(root, "golden")
    shutil.copytree(start, work)
    before, digests, sizes = [], [], []
    seconds = float("inf")
    for i, rid in enumerate(REQUESTS):
        snapshot = os.path.join(root, f"before-{i}")
        shutil.copytree(work, snapshot)
        before.append(snapshot)
        log_size = os.path.getsize(os.path.join(work, "run.ulx.requests"))
        pid = run_child(argv(work, i), None)
        t = time.perf_counter()  # from the fork's return, as the kill's delay counts (a fork here takes ~20 ms)
        _, status = os.waitpid(pid, 0)
        seconds = min(seconds, time.perf_counter() - t)
        assert os.waitstatus_to_exitcode(status) == 0, f"request {rid} failed without a fault"
        digests.append(state_digest(torch.load(os.path.join(work, f"out-{rid}.pt"))))
        sizes.append(os.path.getsize(os.path.join(work, "run.ulx.requests")) - log_size)
    return Scenario(root, before, digests, _entries(work), sizes, seconds)


def kill_trial(scenario: Scenario, workdir: str, index: int, point: Optional[str] = None,
               rng: Optional[random.Random] = None) -> Dict[str, object]:
    """Serve request ``index`` in a child killed at ``point`` (a name of :data:`NAMED_POINTS`) or, without one,
    after a random delay drawn by ``rng``; run it again; assert the promises (module docstring). Returns what
    happened: ``killed`` (False when the child finished before the random kill), ``status`` of the rerun."""
    folder = os.path.join(workdir, "trial")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(scenario.before[index], folder)
    args = argv(folder, index)
    pid = run_child(args, point)
    delay = None
    if point is None:
        delay = (rng or random).uniform(0.0, 0.7 * scenario.seconds)
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    if point is not None:
        assert killed and os.WTERMSIG(status) == signal.SIGKILL, f"{point}: the child was not killed ({status})"
    logged_before_rerun = len(_entries(folder)) > index
    code = _run_here(args)
    rid = list(REQUESTS)[index]
    where = f"request {rid}, {point or f'random kill after {delay:.3f} s'}"
    assert code == 0, f"{where}: the rerun exited {code}"
    out = os.path.join(folder, f"out-{rid}.pt")
    assert state_digest(torch.load(out)) == scenario.digests[index], f"{where}: the output differs"
    entries = _entries(folder)
    assert entries == scenario.entries[:index + 1], f"{where}: the log holds {[e['request_id'] for e in entries]}"
    leftovers = [f for f in os.listdir(folder) if ".tmp" in f]
    assert not leftovers, f"{where}: temporary files left: {leftovers}"
    return {"request": rid, "point": point or "random", "delay": delay, "killed": killed,
            "logged_before_rerun": logged_before_rerun}


__all__ = ["NAMED_POINTS", "REQUESTS", "Scenario", "argv", "kill_trial", "make_scenario", "run_child"]

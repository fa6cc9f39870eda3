"""The storage planner (issue 18): its figures are the bytes a real recording writes, `unlearn-ext plan`
prints them, and a DiskStore warns before it outgrows the free disk space."""
import collections
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext import cli  # noqa: E402
from unlearn_ext.data import load_dataset  # noqa: E402
from unlearn_ext.data.core import IndexedTensorDataset  # noqa: E402
from unlearn_ext.models import make_model  # noqa: E402
from unlearn_ext.record import DiskStore, UpdateRecorder, disk_store  # noqa: E402
from unlearn_ext.record.planner import plan_storage  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH = 6, 32


def _digits_mlp():
    torch.manual_seed(0)
    return make_model("mlp", (1, 8, 8), 10)


def _record(tmp_path, data, only_ids):
    """Train the registry's MLP on ``data`` for STEPS steps, recording dense fp32, partial r=0.1 fp16 and
    partial with only_ids into DiskStores; returns their paths and the number of steps only_ids kept."""
    model = _digits_mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    paths = {k: tmp_path / f"{k}.ulx" for k in ("dense", "partial", "only")}
    recs = [UpdateRecorder(model, store=DiskStore(paths["dense"])),
            UpdateRecorder(model, 0.1, DiskStore(paths["partial"]), torch.float16),
            UpdateRecorder(model, 0.1, DiskStore(paths["only"]), torch.float16, only_ids=only_ids)]
    for s in range(STEPS):
        ids = torch.arange(s * BATCH, (s + 1) * BATCH)
        opt.zero_grad()
        F.cross_entropy(model(data.x[ids]), data.y[ids]).backward()
        for r in recs:
            r.add_ids(ids)
        with recs[0].step(), recs[1].step(), recs[2].step():
            opt.step()
    for r in recs:
        r.store.close()
    return paths, len(recs[2].store)


def _gaussian_data():
    g = torch.Generator().manual_seed(0)
    return IndexedTensorDataset(torch.randn(STEPS * BATCH, 1, 8, 8, generator=g),
                                torch.randint(0, 10, (STEPS * BATCH,), generator=g))


def _plan():
    with torch.device("meta"):  # what `unlearn-ext plan` plans on: no weights allocated
        meta_model = _digits_mlp()
    return (plan_storage(meta_model, STEPS, BATCH, keep_ratio=0.1, value_dtype=torch.float16, only_fraction=0.01),
            plan_storage(meta_model, STEPS, BATCH))


def test_the_plan_is_the_bytes_a_real_recording_writes(tmp_path):
    """Gaussian inputs: every entry of every update moves, so the plan is exact for every recording."""
    only_ids = torch.tensor([3, 40, 41, 150])  # in steps 0, 1 and 4 of 6
    paths, kept = _record(tmp_path, _gaussian_data(), only_ids)
    assert kept == 3
    plan, dense32 = _plan()
    assert plan_storage(_digits_mlp(), STEPS, BATCH, 0.1, torch.float16, 0.01) == plan  # meta = real weights
    assert [r.recording for r in plan.rows] == ["dense", "partial r=0.1", "dense, only ids f=0.01",
                                               "partial r=0.1, only ids f=0.01"]
    assert os.path.getsize(paths["dense"]) == dense32.row("dense").total_bytes
    partial = plan.row("partial r=0.1")
    assert os.path.getsize(paths["partial"]) == partial.total_bytes
    # only-ids: each recorded step costs the same; 1 - 0.99^32 of 6 steps are expected to be recorded
    overhead = partial.total_bytes - STEPS * partial.bytes_per_step
    assert os.path.getsize(paths["only"]) == overhead + kept * partial.bytes_per_step
    only = plan.row("partial r=0.1, only ids f=0.01")
    assert only.bytes_per_step == partial.bytes_per_step and only.recorded_steps == round(6 * (1 - 0.99 ** 32)) == 2
    assert only.total_bytes == overhead + 2 * partial.bytes_per_step
    # the dense fp16 plan halves the values, not the ids and headers
    assert dense32.row("dense").bytes_per_step - plan.row("dense").bytes_per_step == 2 * plan.params


def test_the_plan_bounds_a_recording_whose_updates_leave_entries_unchanged(tmp_path):
    """Real digits: pixels that are zero in every image give weights that never move; a dense record drops
    those exact zeros (a bitmask is smaller), so it stays under the plan, while the top-10% still fills."""
    paths, _ = _record(tmp_path, load_dataset("digits", train_size=STEPS * BATCH, test_size=100).train,
                       torch.tensor([3]))
    plan, dense32 = _plan()
    assert os.path.getsize(paths["partial"]) == plan.row("partial r=0.1").total_bytes
    assert os.path.getsize(paths["dense"]) < 0.9 * dense32.row("dense").total_bytes


def test_plan_command_prints_the_plan_and_refuses_bad_arguments(capsys, tmp_path):
    args = ["plan", "--model", "mlp", "--input-shape", "1,8,8", "--steps", str(STEPS), "--batch-size", str(BATCH),
            "--keep-ratio", "0.1", "--value-dtype", "float16", "--only-fraction", "0.01", "--store-dir", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    plan, _ = _plan()
    for row in plan.rows:
        line = next(line for line in out.splitlines() if line.startswith(row.recording + " "))
        assert f"{row.bytes_per_step:,}" in line and f"{row.total_bytes:,}" in line and line.endswith("yes")
    assert f"free space at {tmp_path}" in out
    for bad, message in [(["--steps", "0"], "steps must be an integer >= 1"),
                         (["--keep-ratio", "1.5"], "keep_ratio must be in"),
                         (["--only-fraction", "0"], "only_fraction must be in"),
                         (["--batch-size", "-1"], "batch_size must be an integer >= 1"),
                         (["--input-shape", "8,8"], "input_shape must be"),
                         (["--store-dir", str(tmp_path / "missing")], "--store-dir: cannot read the free space")]:
        with pytest.raises(SystemExit) as e:
            cli.main(args + bad)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_plan_storage_names_its_bad_arguments():
    model = _digits_mlp()
    for kw, message in [({"steps": 2.5}, "steps must be an integer"), ({"batch_size": True}, "batch_size"),
                        ({"keep_ratio": 0}, "keep_ratio"), ({"value_dtype": torch.float64}, "value_dtype")]:
        with pytest.raises(ValueError, match=message):
            plan_storage(model, **{"steps": 3, "batch_size": 4, **kw})


def _free_space(monkeypatch, free):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(disk_store.shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))


def test_a_disk_store_warns_before_it_outgrows_the_free_space(tmp_path, monkeypatch):
    model = _digits_mlp()
    per_step, overhead = (lambda r: (r.bytes_per_step, r.total_bytes - r.bytes_per_step))(
        plan_storage(model, 1, BATCH, 0.1).row("partial r=0.1"))
    _free_space(monkeypatch, 50 * per_step)

    def steps(rec, n):
        for s in range(n):
            with rec.step(torch.arange(BATCH)):
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(1e-3)

    # a planned size beyond the free space: warned when the store is created, before any training
    plan = plan_storage(model, 60, BATCH, 0.1)
    with pytest.warns(RuntimeWarning, match=f"{per_step * 50:,} bytes free, but the store needs "
                                            f"{plan.row('partial r=0.1').total_bytes - overhead:,} more to reach"):
        rec = UpdateRecorder(model, 0.1, DiskStore(tmp_path / "planned.ulx",
                                                   expected_nbytes=plan.row("partial r=0.1").total_bytes))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps(rec, 2)  # warned once per handle
    rec.store.close()
    # without a plan: warned once the disk holds fewer than LOW_SPACE_RECORDS more records like the last
    rec = UpdateRecorder(model, 0.1, DiskStore(tmp_path / "unplanned.ulx"))
    with pytest.warns(RuntimeWarning, match=f"for 100 more records like the last \\({per_step:,} bytes each\\)"):
        steps(rec, 1)
    rec.store.close()
    _free_space(monkeypatch, 100 * per_step + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # room for 100 more records and the plan: no warning
        rec = UpdateRecorder(model, 0.1, DiskStore(tmp_path / "roomy.ulx", expected_nbytes=overhead + 50 * per_step))
        steps(rec, 3)
        rec.store.close()
    assert len(DiskStore(tmp_path / "roomy.ulx")) == 3
    with pytest.raises(ValueError, match="expected_nbytes must be None or an integer >= 0"):
        DiskStore(tmp_path / "bad.ulx", expected_nbytes=-1)


def test_free_space_is_rechecked_when_the_margin_or_time_runs_out(tmp_path, monkeypatch):
    """A check that left a wide margin stands for SPACE_RECHECK_SECONDS (statvfs costs about as much as
    encoding a small update); a narrow margin, or an older check, is checked again."""
    model = _digits_mlp()
    calls, now = [], [0.0]
    usage = collections.namedtuple("usage", "total used free")
    free = [10 ** 12]
    monkeypatch.setattr(disk_store.shutil, "disk_usage", lambda path: calls.append(path) or usage(2 * free[0], free[0],
                                                                                                  free[0]))
    monkeypatch.setattr(disk_store.time, "monotonic", lambda: now[0])
    rec = UpdateRecorder(model, 0.1, DiskStore(tmp_path / "s.ulx"))

    def step():
        with rec.step(torch.arange(BATCH)):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3)

    for _ in range(5):
        step()
    assert len(calls) == 1  # a wide margin, checked within the second
    now[0] += disk_store.SPACE_RECHECK_SECONDS
    step()
    assert len(calls) == 2  # the check is too old
    per_step = rec.store.nbytes() // len(rec.store)
    free[0] = 150 * per_step  # room for 150 more records: no warning, but under twice the 100 needed
    now[0] += disk_store.SPACE_RECHECK_SECONDS
    step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step()
        step()
    assert len(calls) == 5  # a narrow margin is checked after every append
    free[0] = 50 * per_step
    with pytest.warns(RuntimeWarning, match="for 100 more records like the last"):
        step()
    rec.store.close()

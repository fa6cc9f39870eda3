"""`unlearn-ext train` / `forget` / `requests` (issue 24, item 6): the workflow as a user runs it, its exit
codes (0 served, 2 bad input, 3 refused by the guard), one-line refusals that write nothing, and the audit."""
import json
import os
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext.deletion import RequestLog, state_digest  # noqa: E402
from unlearn_ext.deletion.commands import forget_main, requests_main, train_main  # noqa: E402
from unlearn_ext.record import DiskStore  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TRAIN = ["--dataset", "digits", "--model", "mlp", "--train-size", "240", "--epochs", "2", "--batch-size", "16",
         "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trained")
    assert train_main(TRAIN + ["--store", str(folder / "run.ulx"), "--out", str(folder / "model.pt")]) == 0
    return folder


@pytest.fixture
def run(trained, tmp_path):
    for name in ("run.ulx", "model.pt", "run.ulx.requests"):
        (tmp_path / name).write_bytes((trained / name).read_bytes())
    return tmp_path


def _ids(folder, name, ids):
    path = folder / name
    path.write_text("".join(f"{i}\n" for i in ids))
    return str(path)


def _forget(folder, ids_file, checkpoint, out, *extra):
    return forget_main(["--store", str(folder / "run.ulx"), "--checkpoint", str(folder / checkpoint),
                        "--ids", ids_file, "--out", str(folder / out), *extra])


def _refused(capsys, call, code, match):
    """``call()`` exits with ``code`` printing one error line matching ``match`` (after argparse's usage)."""
    try:
        got = call()
    except SystemExit as e:
        got = e.code
    err = capsys.readouterr().err
    assert got == code, err
    lines = [line for line in err.splitlines() if "error:" in line or "refused:" in line]
    assert len(lines) == 1 and __import__("re").search(match, lines[0]), err
    return lines[0]


def test_train_records_a_store_a_checkpoint_and_a_log_with_the_recipe(trained):
    store = DiskStore(trained / "run.ulx")
    state = torch.load(trained / "model.pt")
    log = RequestLog(trained / "run.ulx.requests", store)
    header = log.header()
    assert len(store) == 2 * 15 and store.manifest.keep_ratio == 0.1 and not store.dropped
    assert header["genesis_sha256"] == state_digest(state) and header["recorded_steps"] == len(store)
    assert header["recipe"]["dataset"] == "digits" and header["recipe"]["train_size"] == 240
    assert header["recipe"]["seed"] == 3 and header["recipe"]["deterministic"] is True


def test_train_is_bitwise_reproducible(trained, tmp_path):
    assert train_main(TRAIN + ["--store", str(tmp_path / "again.ulx"), "--out", str(tmp_path / "again.pt")]) == 0
    assert state_digest(torch.load(tmp_path / "again.pt")) == state_digest(torch.load(trained / "model.pt"))
    assert (tmp_path / "again.ulx").read_bytes() == (trained / "run.ulx").read_bytes()


def test_train_forget_forget_requests(run, capsys):
    store = DiskStore(run / "run.ulx")
    a, b = 5, next(i for i in range(240) if set(store.steps_containing([i])) & set(store.steps_containing([5]))
                   and i != 5)
    assert _forget(run, _ids(run, "a.txt", [a]), "model.pt", "model-a.pt", "--request-id", "A",
                   "--max-undone", "0.5") == 0
    assert "request 'A' (1 id(s)): served; undid" in capsys.readouterr().out
    assert _forget(run, _ids(run, "b.txt", [b]), "model-a.pt", "model-b.pt", "--request-id", "B",
                   "--max-undone", "0.5", "--json") == 0
    receipt = json.loads(capsys.readouterr().out)
    assert receipt["status"] == "served" and receipt["steps_skipped"]
    assert receipt["sha256_after"] == state_digest(torch.load(run / "model-b.pt"))
    assert requests_main(["--log", str(run / "run.ulx.requests")]) == 0
    table = capsys.readouterr().out
    assert "| 1 | A | 1 |" in table and "| 2 | B | 1 |" in table
    # the same command again: already served, nothing appended
    before = (run / "run.ulx.requests").read_bytes()
    assert _forget(run, str(run / "b.txt"), "model-a.pt", "model-b.pt", "--request-id", "B",
                   "--max-undone", "0.5") == 0
    assert "'B' (1 id(s)): redone" in capsys.readouterr().out
    assert (run / "run.ulx.requests").read_bytes() == before
    assert requests_main(["--log", str(run / "run.ulx.requests"), "--json"]) == 0
    assert [r["request_id"] for r in json.loads(capsys.readouterr().out)["requests"]] == ["A", "B"]


def test_refusals_are_one_line_exit_2_or_3_and_write_nothing(run, capsys):
    assert _forget(run, _ids(run, "a.txt", [1]), "model.pt", "model-a.pt", "--max-undone", "0.5") == 0
    capsys.readouterr()
    log_bytes = (run / "run.ulx.requests").read_bytes()
    (run / "junk.txt").write_text("3\nseven\n")
    cases = [
        (lambda: _forget(run, _ids(run, "x.txt", [2]), "model.pt", "o.pt", "--max-undone", "0.5"), 2,
         "not the latest model"),
        (lambda: _forget(run, _ids(run, "x.txt", [9999]), "model-a.pt", "o.pt", "--max-undone", "0.5"), 2,
         "in no recorded training step"),
        (lambda: _forget(run, str(run / "junk.txt"), "model-a.pt", "o.pt"), 2, "junk.txt line 2 is not a sample id"),
        (lambda: _forget(run, _ids(run, "x.txt", []), "model-a.pt", "o.pt"), 2, "holds no id"),
        (lambda: _forget(run, _ids(run, "x.txt", [7]), "missing.pt", "o.pt"), 2, "--checkpoint: .*does not exist"),
        (lambda: _forget(run, _ids(run, "x.txt", [7]), "model-a.pt", "o.pt", "--max-undone", "1.5"), 2,
         "--max-undone: expected a fraction"),
        (lambda: _forget(run, _ids(run, "x.txt", list(range(40))), "model-a.pt", "o.pt", "--max-undone", "0.2"), 3,
         r"would undo \d+ more step\(s\), \d+ of 30 recorded \([\d.]+ %\), past the limit of 20.00 %"),
        (lambda: _forget(run, _ids(run, "x.txt", [7]), "model-a.pt", "o.pt"), 3,
         r"past the limit of 1.28 % \(benchmarks/results/amnesiac_regime.md, partial_amnesiac r=0.1\)"),
    ]
    for call, code, match in cases:
        _refused(capsys, call, code, match)
        assert not (run / "o.pt").exists() and (run / "run.ulx.requests").read_bytes() == log_bytes


def test_a_checkpoint_of_another_shape_is_refused(run, capsys):
    state = torch.load(run / "model.pt")
    name = next(iter(state))
    state[name] = torch.zeros(3, 3)
    torch.save(state, run / "other.pt")
    _refused(capsys, lambda: _forget(run, _ids(run, "a.txt", [1]), "other.pt", "o.pt"), 2,
             f"--checkpoint does not fit the store.*'{name}'")


def test_train_refuses_to_overwrite(run, capsys):
    sizes = {p: p.stat().st_size for p in run.iterdir()}
    _refused(capsys, lambda: train_main(TRAIN + ["--store", str(run / "new.ulx"), "--out", str(run / "model.pt")]), 2,
             "--out: .*model.pt exists")
    _refused(capsys, lambda: train_main(TRAIN + ["--store", str(run / "run.ulx"), "--out", str(run / "m2.pt")]), 2,
             "--store: .*run.ulx exists")
    assert {p: p.stat().st_size for p in run.iterdir()} == sizes


def test_the_audit_measures_before_and_after(run, capsys):
    ids = list(range(0, 240, 20))  # 12 ids: enough members for the loss-LR attack
    assert _forget(run, _ids(run, "a.txt", ids), "model.pt", "model-a.pt", "--max-undone", "1", "--json",
                   "--dataset", "digits") == 0
    audit = json.loads(capsys.readouterr().out)["audit"]
    for when in ("before", "after"):
        assert audit[when]["n_forget"] == 12 and audit[when]["n_validation"] > 100
        assert 0.0 <= audit[when]["forget_accuracy"] <= 1.0 and 0.0 <= audit[when]["loss_lr_mia"] <= 1.0
    assert audit["before"]["forget_accuracy"] != audit["after"]["forget_accuracy"] or \
        audit["before"]["validation_accuracy"] != audit["after"]["validation_accuracy"]
    assert os.path.exists(run / "model-a.pt")


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_an_output_that_is_an_input_or_not_a_checkpoint_is_refused_and_nothing_written(run, capsys):
    """The hostile probe: `--out run.ulx` replaced the store with a checkpoint (exit 0); `--out` the log, the
    ids file or any other file was overwritten too."""
    ids = _ids(run, "a.txt", [1])
    (run / "notes.txt").write_text("mine")
    (run / "folder").mkdir()
    before = _snapshot(run)
    for out, match in [("run.ulx", "--out: .*run.ulx is the --store"), ("run.ulx.requests", "is the --log"),
                       ("a.txt", "is the --ids"), ("model.pt", "is the --checkpoint"),
                       ("notes.txt", "exists and is not an output of this kind"), ("folder", "is a folder"),
                       ("missing/o.pt", "its folder .*missing does not exist")]:
        _refused(capsys, lambda: _forget(run, ids, "model.pt", out, "--max-undone", "0.5"), 2, match)
        assert _snapshot(run) == before


def test_a_missing_log_is_never_created_silently(run, capsys):
    """The hostile probe: a typo in --log (or a moved log) started a new log, and the same steps were undone
    again. A log is started only by `train` or by --new-log, which refuses an existing one."""
    ids = _ids(run, "a.txt", [1])
    assert _forget(run, ids, "model.pt", "m1.pt", "--max-undone", "0.5") == 0
    _refused(capsys, lambda: _forget(run, ids, "m1.pt", "m2.pt", "--max-undone", "0.5", "--log",
                                     str(run / "run.ulx.request")), 2, "run.ulx.request does not exist: .*--new-log")
    assert not (run / "m2.pt").exists() and not (run / "run.ulx.request").exists()
    _refused(capsys, lambda: _forget(run, ids, "model.pt", "m2.pt", "--new-log"), 2, "--log: .*exists")
    (run / "run.ulx.requests").rename(run / "old.requests")  # a store recorded without `train`: start a log
    assert _forget(run, ids, "model.pt", "m2.pt", "--max-undone", "0.5", "--new-log") == 0
    assert RequestLog(run / "run.ulx.requests", DiskStore(run / "run.ulx")).receipts()[0].sha256_before == \
        state_digest(torch.load(run / "model.pt"))


def test_forget_checks_the_audit_arguments_before_any_work(run, capsys):
    ids = _ids(run, "a.txt", list(range(12)))
    before = _snapshot(run)
    _refused(capsys, lambda: _forget(run, ids, "model.pt", "o.pt", "--model", "lenet"), 2,
             "--model is for the audit: give --dataset too")
    _refused(capsys, lambda: _forget(run, ids, "model.pt", "o.pt", "--max-undone", "1", "--dataset", "digits",
                                     "--model", "lenet"), 2, "--checkpoint is not a state_dict of lenet for digits")
    assert _snapshot(run) == before


@pytest.mark.parametrize("content, ids", [("3\r\n4\r\n", [3, 4]), ("\ufeff5\n\n 6 \n", [5, 6])])
def test_ids_files_with_crlf_or_a_byte_order_mark_are_read(content, ids, tmp_path):
    from unlearn_ext.deletion.commands import read_ids

    (tmp_path / "ids.txt").write_text(content, encoding="utf-8")
    assert read_ids(str(tmp_path / "ids.txt")) == ids


@pytest.mark.parametrize("line", ["1_2", "\u0661\u0662", "\uff11\uff12", "12\x1c13", "12\u202813", "+3", "-1", "3.0"])
def test_ids_lines_other_than_ascii_digits_are_refused_naming_the_line(line, tmp_path):
    from unlearn_ext.deletion.commands import read_ids

    (tmp_path / "ids.txt").write_text(f"7\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not a sample id"):
        read_ids(str(tmp_path / "ids.txt"))


def test_train_refuses_paths_it_cannot_use_before_training(tmp_path, capsys):
    (tmp_path / "dangling.ulx").symlink_to(tmp_path / "nowhere")
    cases = [(["--store", str(tmp_path / "s.ulx"), "--out", str(tmp_path / "s.ulx.requests")],
              "--store's log and --out name the same file"),
             (["--store", "", "--out", str(tmp_path / "m.pt")], "--store: expected a file path"),
             (["--store", str(tmp_path / "dangling.ulx"), "--out", str(tmp_path / "m.pt")], "dangling.ulx exists"),
             (["--store", str(tmp_path / "s.ulx"), "--out", str(tmp_path / "no" / "m.pt")], "does not exist")]
    for extra, match in cases:
        _refused(capsys, lambda: train_main(TRAIN + extra), 2, match)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.ulx"]


def test_a_training_run_that_fails_leaves_nothing_behind(tmp_path, capsys):
    """The hostile probe: --lr 1e30 diverged and raised a traceback after training, leaving a store that
    blocked the rerun."""
    code = train_main(TRAIN + ["--lr", "1e30", "--store", str(tmp_path / "s.ulx"), "--out", str(tmp_path / "m.pt")])
    err = capsys.readouterr().err
    assert code == 1 and "failed: " in err and "nothing kept" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_requests_into_a_closed_pipe_prints_no_traceback(trained):
    import subprocess
    import sys

    out = subprocess.run(f"{sys.executable} -m unlearn_ext.cli requests --log {trained / 'run.ulx.requests'} --json "
                         "| head -c 10", shell=True, capture_output=True, text=True, timeout=120)
    assert out.stdout == '{\n "header' and "Traceback" not in out.stderr, out.stderr

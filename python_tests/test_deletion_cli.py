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
        (lambda: _forget(run, str(run / "junk.txt"), "model-a.pt", "o.pt"), 2, "junk.txt line 2 is not an integer"),
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

"""The command line refuses bad arguments before any work, with one error line and exit status 2 (no
traceback); Ctrl-C prints one line and writes nothing for the interrupted seed."""
import json

import pytest

from unlearn_ext import cli
from unlearn_ext.experiment import Experiment

SMALL = ["run", "--dataset", "digits", "--model", "mlp", "--methods", "retrain", "--epochs", "1",
         "--no-progress"]


@pytest.fixture
def no_training(monkeypatch):
    """Any training fails the test: every refusal must come before the work starts."""
    def refuse(*a, **k):
        raise AssertionError("training started before the arguments were checked")
    monkeypatch.setattr(Experiment, "train", refuse)


def _refused(capsys, argv, *needles):
    """The call exits with status 2 and an argparse-style error (usage, then "error:" and the message; a
    missing data set's message goes on to list the expected files) naming every needle, with no traceback."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err[err.index("error:"):]
    for needle in needles:
        assert needle in message, (needle, err)
    return message


@pytest.mark.parametrize("argv, needles", [
    (["--dataset", "nope"], ["--dataset", "invalid choice"]),
    (["--model", "resnet1000"], ["--model", "invalid choice"]),
    (["--methods", "retrain,nope"], ["--methods", "nope"]),
    (["--forget-ratio", "0"], ["--forget-ratio", "(0, 1)"]),
    (["--forget-ratio", "1.5"], ["--forget-ratio"]),
    (["--forget-ratio", "nan"], ["--forget-ratio"]),
    (["--keep-ratio", "0"], ["--keep-ratio", "(0, 1]"]),
    (["--keep-ratios", "0.1,2"], ["--keep-ratios"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
    (["--epochs", "-2"], ["--epochs", ">= 1"]),
    (["--epochs", "0"], ["--epochs", ">= 1"]),
    (["--epochs", "1.5"], ["--epochs", "integer"]),
    (["--lr", "-1"], ["--lr", "positive"]),
    (["--train-size", "-5"], ["--train-size"]),
    (["--hparams", "[1,2]"], ["--hparams", "JSON object"]),
    (["--hparams", "{not json"], ["--hparams", "JSON"]),
    (["--value-dtype", "int8"], ["--value-dtype"]),
])
def test_bad_arguments_are_one_line_errors(capsys, no_training, argv, needles):
    _refused(capsys, SMALL + argv, *needles)


def test_values_checked_against_the_data_before_training(capsys, no_training, tmp_path):
    _refused(capsys, SMALL + ["--forget-class", "99"], "forget_class", "[0, 10)")
    _refused(capsys, SMALL + ["--forget-ratio", "0.004"], "5 forget samples", "at least 10", "forget_ratio >=")
    _refused(capsys, SMALL + ["--hparams", '{"partial_optimizaton": {"epochs": 2}}'], "partial_optimizaton",
             "no selected method")
    _refused(capsys, SMALL + ["--hparams", '{"retrain": {"epochz": 2}}'], "retrain", "epochz")
    existing = tmp_path / "results_here"
    existing.write_text("not a folder")
    _refused(capsys, SMALL + ["--out", str(existing)], "--out", "not a folder")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").mkdir()
    _refused(capsys, SMALL + ["--out", str(tmp_path / "out")], "--out", "is a folder")
    _refused(capsys, SMALL + ["--dataset", "mnist", "--root", str(tmp_path)], "mnist", str(tmp_path))


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("--model {", "(default: lenet)", "(default: 0.1)", "(default: 8)", "--methods NAMES"):
        assert default in text, default


def test_ctrl_c_prints_one_line_and_writes_nothing(capsys, monkeypatch, tmp_path):
    def interrupted(self, progress=True):
        raise KeyboardInterrupt
    monkeypatch.setattr(Experiment, "run_once", interrupted)
    assert cli.main(SMALL + ["--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_kept_store_of_an_earlier_run_is_refused_before_training(capsys, tmp_path):
    stores = tmp_path / "stores"
    stores.mkdir()
    (stores / "amnesiac-dense-seed0.ulx").write_bytes(b"an earlier run's records")
    _refused(capsys, ["run", "--dataset", "digits", "--model", "mlp", "--methods", "amnesiac", "--epochs", "1",
                      "--store-dir", str(stores), "--out", str(tmp_path / "out"), "--no-progress"],
             "store_dir:", "amnesiac-dense-seed0.ulx already exists")
    assert (stores / "amnesiac-dense-seed0.ulx").read_bytes() == b"an earlier run's records"


def test_results_record_the_sizes_used_and_say_why(tmp_path, capsys):
    assert cli.main(SMALL + ["--forget-ratio", "0.05", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["train_size"] is None and saved["config"]["test_size"] is None  # all of digits
    assert saved["sizes"]["train"] == 1348 and saved["sizes"]["validation"] + saved["sizes"]["test"] == 449
    assert any("train_size 6000 asked for; digits has 1348" in n for n in saved["notes"])
    assert "note: train_size 6000 asked for" in capsys.readouterr().out

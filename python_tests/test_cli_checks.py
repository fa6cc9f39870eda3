"""``unlearn-ext demo``/``run`` check the seeds, the option combinations and the folders they write into before
any work (one error line, exit 2); a folder a live run holds is refused at once; results.json and chart.png are
replaced atomically; a chart that fails is a warning; Ctrl-C or a failed write ends with one line that says
truthfully what was written."""
import builtins
import copy
import errno
import json
import os

import pytest

from test_cli import SMALL, _refused
from unlearn_ext import cli, results
from unlearn_ext.durable import FolderLock
from unlearn_ext.experiment import Experiment, ExperimentConfig, run_experiment

SWEEP = ["--methods", "retrain,partial_optimization"]


@pytest.fixture
def no_data(monkeypatch):
    """Loading any data fails the test: the refusal must come before it."""
    def refuse(self):
        raise AssertionError("data loaded before the arguments and folders were checked")
    monkeypatch.setattr(Experiment, "_load", refuse)


@pytest.fixture(scope="module")
def small_result():
    """A real run at the largest seed: 2**32 − 1 is the largest scikit-learn's folds take (numpy and torch take
    more)."""
    return run_experiment(ExperimentConfig(dataset="digits", model="mlp", methods=["retrain"], forget_ratio=0.05,
                                           train_size=200, test_size=100, epochs=1, seed=2**32 - 1), progress=False)


@pytest.fixture
def canned(monkeypatch, small_result):
    """Each seed's run returns the small result at once (the data is still loaded); ``canned.interrupt_at``:
    the run of that many-th seed (from 1) raises KeyboardInterrupt instead."""
    class Runs:
        count, interrupt_at = 0, None

    def run_once(self, progress=True):
        Runs.count += 1
        if Runs.count == Runs.interrupt_at:
            raise KeyboardInterrupt
        return dict(copy.deepcopy(small_result), config=dict(small_result["config"], seed=self.cfg.seed))
    monkeypatch.setattr(Experiment, "run_once", run_once)
    return Runs


def _one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


class _FullDisk:
    """A file on a disk that fills up: ``write`` stores a few bytes, then raises ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[:16])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fill_disk(monkeypatch, folder):
    """Every file opened for writing under ``folder`` is on a full disk."""
    real_open, folder = builtins.open, os.path.abspath(folder)

    def full_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        inside = isinstance(file, (str, os.PathLike)) and os.path.abspath(file).startswith(folder + os.sep)
        return _FullDisk(f) if inside and set(mode) & set("wxa") else f
    monkeypatch.setattr(builtins, "open", full_open)


def _read_only(monkeypatch, folder, access_says_writable: bool):
    """``folder`` acts as on a read-only file system: creating anything in it raises EROFS, and ``os.access``
    says so too unless ``access_says_writable`` (it may not know, e.g. over some network file systems)."""
    folder = os.path.abspath(folder)
    real_access, real_mkdir, real_open = os.access, os.mkdir, os.open

    def inside(path):
        return os.path.abspath(os.fspath(path)).startswith(folder)

    def erofs(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    def access(path, mode, *a, **k):
        return False if inside(path) and mode & os.W_OK and not access_says_writable else \
            real_access(path, mode, *a, **k)

    def mkdir(path, *a, **k):
        if inside(path):
            raise erofs(path)
        return real_mkdir(path, *a, **k)

    def open_(path, flags, *a, **k):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise erofs(path)
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


# ------------------------------------------------------------------------------------------ seeds, folders

@pytest.mark.parametrize("seeds, needles", [
    ("-1", ["--seeds", "[0, 2**32)", "'-1'"]),
    (str(2**32), ["--seeds", "[0, 2**32)"]),
    ("99999999999999999999999", ["--seeds", "[0, 2**32)"]),
    ("abc", ["--seeds", "'abc'"]),
    ("1.5", ["--seeds", "'1.5'"]),
    (",", ["--seeds", "at least one"]),
    ("0,0", ["--seeds", "0 given twice"]),
    ("3, 1,3", ["--seeds", "3 given twice"]),
])
def test_seeds_are_distinct_integers_in_the_range_every_generator_accepts(capsys, no_data, seeds, needles):
    _refused(capsys, SMALL + ["--seeds", seeds], *needles)


def test_the_largest_seed_runs_end_to_end(small_result):
    assert small_result["config"]["seed"] == 2**32 - 1 and small_result["rows"]["retrain"]["LR_MIA"] >= 0


@pytest.mark.parametrize("access_says_writable", [False, True])
@pytest.mark.parametrize("option", ["--store-dir", "--out"])
def test_a_folder_on_a_read_only_file_system_is_refused_before_the_data_is_loaded(capsys, monkeypatch, tmp_path,
                                                                                  no_data, option,
                                                                                  access_says_writable):
    (tmp_path / "read-only").mkdir()
    folder = tmp_path / "read-only" / "here"
    other = {"--store-dir": ["--out", str(tmp_path / "out")], "--out": []}[option]
    _read_only(monkeypatch, tmp_path / "read-only", access_says_writable)
    _refused(capsys, SMALL + [option, str(folder)] + other, option, str(folder))
    assert not (tmp_path / "out").exists()  # nothing left behind by the refused run


def test_a_store_dir_that_is_a_file_is_refused(capsys, tmp_path, no_data):
    (tmp_path / "file").write_text("not a folder")
    _refused(capsys, SMALL + ["--store-dir", str(tmp_path / "file"), "--out", str(tmp_path / "out")],
             "--store-dir", "not a folder")


# ------------------------------------------------------------------------ options dropped or recorded wrong

@pytest.mark.parametrize("argv, needles", [
    (["--forget-class", "3", "--forget-ratio", "0.05"], ["--forget-class and --forget-ratio"]),
    (SWEEP + ["--keep-ratio", "0.3", "--keep-ratios", "0.1"], ["--keep-ratio and --keep-ratios"]),
    (["--keep-ratios", "0.1,0.2"], ["--keep-ratios", "no selected method reads r", "partial_optimization"]),
    (["--keep-ratio", "0.2"], ["--keep-ratio:", "no selected method reads r"]),
    (SWEEP + ["--keep-ratios", "0.1,0.1"], ["--keep-ratios", "0.1 given twice"]),
    (SWEEP + ["--keep-ratios", "0.1,0.1000001"], ["keep_ratios", "r=0.1 more than once"]),
    (SWEEP + ["--keep-ratios", ","], ["--keep-ratios", "at least one"]),
    (["--methods", "retrain,retrain"], ["methods", "selected twice"]),
    (SWEEP + ["--hparams", '{"partial_optimization": {"keep_ratio": 0.3}}'], ["keep_ratio of partial_optimization"]),
])
def test_options_that_would_be_dropped_or_recorded_wrong_are_refused(capsys, no_data, argv, needles):
    _refused(capsys, SMALL + argv, *needles)


def test_the_options_alone_are_accepted(capsys, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "_experiments", lambda todo, out, progress, outputs: seen.append(todo[0].cfg) or 0)
    for argv in (["--forget-class", "3"], SWEEP + ["--keep-ratios", "0.1,0.2"], SWEEP + ["--keep-ratio", "0.2"],
                 ["--seeds", str(2**32 - 1)]):
        assert cli.main(SMALL + argv + ["--out", str(tmp_path)]) == 0
    assert (seen[0].forget_class, seen[0].forget_ratio) == (3, None)
    assert (seen[1].keep_ratios, seen[2].keep_ratio, seen[3].seed) == ([0.1, 0.2], 0.2, 2**32 - 1)


# ----------------------------------------------------------------------------------- folders of a live run

def test_a_live_runs_out_folder_is_refused_at_once_and_its_temporary_stores_are_kept(capsys, tmp_path, no_data):
    """A second demo on the folder of a live one would delete the live run's temporary store as a leftover."""
    out = tmp_path / "out"
    (out / "stores").mkdir(parents=True)
    live_store = out / "stores" / "amnesiac-dense-seed0.ulx"
    live_store.write_bytes(b"a live run's records")
    demo = ["demo", "--dataset", "digits", "--model", "mlp", "--methods", "amnesiac", "--epochs", "1",
            "--no-progress"]
    with FolderLock(out, "--out"):
        _refused(capsys, demo + ["--out", str(out)], "--out", str(out), "in use by a live run", f"pid {os.getpid()}")
    with FolderLock(out / "stores", "--store-dir"):  # a `run --store-dir <out>/stores` that is live
        _refused(capsys, demo + ["--out", str(out)], str(out / "stores"), "in use by a live run")
    assert live_store.read_bytes() == b"a live run's records"
    with FolderLock(tmp_path / "kept", "--store-dir"):
        _refused(capsys, SMALL + ["--store-dir", str(tmp_path / "kept"), "--out", str(tmp_path / "other")],
                 "--store-dir", str(tmp_path / "kept"), "in use")
    assert not (tmp_path / "other").exists()


def test_a_dead_runs_temporary_store_is_replaced_and_the_store_folder_removed(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "stores").mkdir(parents=True)
    (out / "stores" / ".unlearn-ext.lock").write_text("pid 1")  # the lock file of a killed run: no lock held
    (out / "stores" / "amnesiac-dense-seed0.ulx").write_bytes(b"a killed run's records")
    with pytest.warns(RuntimeWarning, match="removing .*amnesiac-dense-seed0.ulx"):
        assert cli.main(["demo", "--dataset", "digits", "--model", "mlp", "--methods", "amnesiac", "--epochs", "1",
                         "--train-size", "200", "--test-size", "100", "--forget-ratio", "0.05", "--batch-size", "32",
                         "--no-calibrate", "--no-progress", "--out", str(out)]) == 0
    assert (out / "results.json").exists() and not (out / "stores").exists()


def test_a_refused_run_leaves_no_folder_behind(capsys, tmp_path):
    _refused(capsys, SMALL + ["--forget-class", "99", "--out", str(tmp_path / "a" / "b")], "forget_class")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------- writes, Ctrl-C

def test_a_full_disk_keeps_the_earlier_results_json(tmp_path, small_result):
    path = tmp_path / "results.json"
    results.write_json(small_result, str(path))
    earlier = path.read_bytes()
    with pytest.MonkeyPatch.context() as m:
        _fill_disk(m, tmp_path)
        with pytest.raises(OSError, match="No space left"):
            results.write_json(dict(small_result, dataset="another run"), str(path))
        with pytest.raises(OSError, match="No space left"):
            results.chart(small_result, str(tmp_path / "chart.png"))
    assert path.read_bytes() == earlier and os.listdir(tmp_path) == ["results.json"]  # no torn or temporary file


def test_cli_on_a_full_disk_says_the_earlier_results_are_unchanged(capsys, monkeypatch, tmp_path, canned,
                                                                   small_result):
    (tmp_path / "results.json").write_text('{"an earlier": "run"}')
    _fill_disk(monkeypatch, tmp_path)
    assert cli.main(SMALL + ["--out", str(tmp_path)]) == 1
    _one_line(capsys, "failed while writing", str(tmp_path / "results.json"), "an earlier one there is unchanged",
              "No space left on device", "no results written")
    assert (tmp_path / "results.json").read_text() == '{"an earlier": "run"}'


def test_a_chart_that_fails_is_a_warning_and_the_results_are_kept(capsys, monkeypatch, tmp_path, canned):
    (tmp_path / "chart.png").write_bytes(b"an earlier run's chart")

    def broken(result, path):
        raise RuntimeError("no backend\nfor this")
    monkeypatch.setattr(results, "chart", broken)
    assert cli.main(SMALL + ["--out", str(tmp_path)]) == 0
    _one_line(capsys, "warning:", str(tmp_path / "chart.png"), "not drawn (RuntimeError: no backend for this)")
    assert json.loads((tmp_path / "results.json").read_text())["rows"]["retrain"]
    assert not (tmp_path / "chart.png").exists()  # it belonged to the earlier results.json


def test_ctrl_c_while_loading_the_data_is_one_line(capsys, monkeypatch, tmp_path):
    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(Experiment, "_load", interrupted)
    try:
        assert cli.main(SMALL + ["--out", str(tmp_path / "out")]) == 130
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C while loading the data escaped as a traceback")
    _one_line(capsys, "interrupted while loading the data", "no results written")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_chart_is_drawn_says_results_json_was_written(capsys, monkeypatch, tmp_path, canned):
    def interrupted(result, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(results, "chart", interrupted)
    assert cli.main(SMALL + ["--out", str(tmp_path)]) == 130
    _one_line(capsys, f"interrupted while drawing {tmp_path / 'chart.png'} (not written)",
              f"wrote {tmp_path / 'results.json'}")
    assert (tmp_path / "results.json").exists() and not (tmp_path / "chart.png").exists()


def test_ctrl_c_in_the_second_seed_names_what_the_first_wrote(capsys, tmp_path, canned):
    canned.interrupt_at = 2
    assert cli.main(SMALL + ["--seeds", "4,5", "--out", str(tmp_path)]) == 130
    seed4 = tmp_path / "seed4"
    _one_line(capsys, "interrupted while running seed 5 (nothing written for it)",
              f"wrote {seed4 / 'results.json'}, {seed4 / 'chart.png'}")
    assert sorted(os.listdir(seed4)) == [".unlearn-ext.lock", "chart.png", "results.json"]
    assert not (tmp_path / "seed5").exists()


@pytest.mark.parametrize("option", ["--out", "--store-dir"])
def test_an_empty_folder_option_is_refused(option, capsys, tmp_path):
    """The hostile probe: `--out ''` silently wrote to runs/run, `--store-dir ''` silently kept the stores in
    memory."""
    extra = [] if option == "--out" else ["--out", str(tmp_path / "o")]
    _refused(capsys, SMALL + extra + [option, ""], option, "expected a folder")
    assert not (tmp_path / "o").exists()

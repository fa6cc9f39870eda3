"""The main job end to end on real data (scikit-learn's digits), through the command line."""
import json
import math

import pytest
import torch

from unlearn_ext import cli
from unlearn_ext.experiment import ExperimentConfig, fraction_of_steps_with_forget, run_experiment, validate_config

METHODS = ["retrain", "amnesiac", "partial_amnesiac", "partial_optimization", "msg"]


def _config(**kw):
    base = dict(dataset="digits", model="mlp", methods=METHODS, forget_ratio=0.05, train_size=None,
                test_size=None, epochs=2, batch_size=64, seed=3, deterministic=True)
    return ExperimentConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def result():
    return run_experiment(_config(), progress=False)


def test_rows_columns_and_skips(result):
    rows = result["rows"]
    assert list(rows)[:2] == ["original", "retrain"]
    assert "no nn.Conv2d" in rows["msg"]["skipped"]  # MSG needs conv layers; the MLP has none
    for name in ["original", "retrain", "amnesiac", "partial_amnesiac", "partial_optimization"]:
        row = rows[name]
        for key in ("RA", "FA", "TA", "MIA", "LR_MIA", "indisc", "seconds", "weights_sha256"):
            assert key in row, (name, key)
        assert 0.0 <= row["gap"]["avg_gap"] <= 1.0
    assert rows["original"]["RA"] > 0.85 and rows["retrain"]["TA"] > 0.8
    assert rows["retrain"]["gap"]["avg_gap"] == 0.0
    assert rows["partial_amnesiac"]["storage_bytes"] < rows["amnesiac"]["storage_bytes"]
    assert rows["partial_amnesiac"]["stats"]["store_keep_ratio"] == 0.1
    assert result["sizes"]["forget"] == round(0.05 * result["sizes"]["train"])
    assert result["fraction_of_steps_with_forget"] == pytest.approx(fraction_of_steps_with_forget(0.05, 64), rel=0.02)
    env = result["environment"]
    assert env["torch"] == torch.__version__ and env["build"]["backend"] == "compiled"


def test_deterministic_runs_are_bitwise_identical(result):
    again = run_experiment(_config(), progress=False)
    for name, row in result["rows"].items():
        if "skipped" in row:
            continue
        assert again["rows"][name]["weights_sha256"] == row["weights_sha256"], name
        for key in ("RA", "FA", "TA", "MIA", "LR_MIA"):
            assert again["rows"][name][key] == row[key], (name, key)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


def test_cli_run_writes_results_and_chart(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["run", "--dataset", "digits", "--model", "lenet", "--methods", "retrain,ct",
                     "--epochs", "1", "--train-size", "400", "--test-size", "200", "--forget-ratio", "0.05",
                     "--deterministic", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| retrain |" in text and "| ct |" in text and "digits" in text
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["model"] == "lenet" and saved["config"]["deterministic"] is True
    assert saved["rows"]["ct"]["stats"]["hparams"]  # every hyper-parameter recorded
    assert (out / "chart.png").stat().st_size > 1000


def test_table_puts_steps_undone_beside_amnesiac_rows_and_reports_leakage(result):
    from unlearn_ext import results

    lines = {line.split("|")[1].strip(): line for line in results.table(result).splitlines()[2:]}
    for name in ("amnesiac", "partial_amnesiac"):
        frac = result["rows"][name]["stats"]["fraction_steps_affected"]
        assert 0.0 < frac <= 1.0
        assert lines[name].rstrip(" |").endswith(f"{frac:.1%}"), lines[name]
    assert lines["retrain"].rstrip().endswith("|  |")  # no store, no steps-undone cell
    line = results.leakage(result)
    assert f"{result['rows']['original']['LR_MIA']:.3f} vs Retrain {result['rows']['retrain']['LR_MIA']:.3f}" in line


def test_demo_defaults_and_run_keeps_the_papers_protocol(monkeypatch):
    from unlearn_ext.experiment import DEMO, fraction_of_steps_with_forget

    seen = []
    monkeypatch.setattr(cli, "_experiments", lambda todo, out, progress, outputs: seen.append(todo) or 0)
    monkeypatch.setattr(cli, "_prepare", lambda args, out, outputs: [cli._config(args, args.seeds[0], out)])
    cli.main(["demo"])
    cli.main(["run"])
    demo, run = seen[0][0], seen[1][0]
    assert (demo.epochs, demo.batch_size, demo.train_size, demo.value_dtype) == (40, 8, 3000, "float16")
    assert {k: getattr(demo, k) for k in DEMO} == DEMO
    assert round(demo.forget_ratio * demo.train_size) >= 50  # each attack group has >= 50 members
    assert fraction_of_steps_with_forget(demo.forget_ratio, demo.batch_size) <= 0.15  # the amnesiac regime
    assert (run.epochs, run.batch_size, run.forget_ratio, run.model) == (8, 128, 0.01, "lenet")
    assert demo.store_dir == "runs/demo/stores" and not demo.keep_stores and run.store_dir is None


def test_a_diverged_method_is_reported_not_fatal():
    """Certified unlearning with absurd noise leaves non-finite outputs: the row says so, the run goes on."""
    result = run_experiment(_config(methods=["retrain", "certified", "partial_optimization"], epochs=1,
                                    method_hparams={"certified": {"sigma": 1e38, "depth": 5, "repeats": 1}}),
                            progress=False)
    assert "non-finite outputs" in result["rows"]["certified"]["diverged"]
    assert result["rows"]["certified"]["stats"]["hparams"]["sigma"] == 1e38
    assert "gap" in result["rows"]["partial_optimization"]
    from unlearn_ext import results
    assert "| certified | non-finite outputs" in results.table(result)


@pytest.mark.parametrize("keep", [True, False])
def test_disk_stores_are_kept_or_removed(tmp_path, keep):
    stores = tmp_path / "stores"
    result = run_experiment(_config(methods=["amnesiac", "partial_amnesiac"], epochs=1, store_dir=str(stores),
                                    keep_stores=keep), progress=False)
    assert result["rows"]["partial_amnesiac"]["stats"]["steps_removed"] > 0
    files = sorted(p.name for p in stores.glob("*.ulx")) if stores.exists() else []
    assert files == (["amnesiac-dense-seed3.ulx", "partial_amnesiac-r0.1-seed3.ulx"] if keep else [])
    assert stores.exists() == keep


def test_a_store_left_in_store_dir_is_never_appended_to(tmp_path):
    """A store file of an earlier (killed) run at a path this run would record to: kept stores refuse before
    training; temporary ones (the demo's) are replaced, with a warning, so the records are this run's only."""
    stores = tmp_path / "stores"
    stores.mkdir()
    old = stores / "amnesiac-dense-seed3.ulx"
    cfg = dict(methods=["amnesiac"], epochs=1, store_dir=str(stores))
    run_experiment(_config(**cfg), progress=False)  # leaves the kept store there
    size = old.stat().st_size
    with pytest.raises(FileExistsError, match="store_dir: .*amnesiac-dense-seed3.ulx already exists"):
        run_experiment(_config(**cfg), progress=False)
    assert old.stat().st_size == size  # untouched
    with pytest.warns(RuntimeWarning, match="removing .*amnesiac-dense-seed3.ulx"):
        result = run_experiment(_config(keep_stores=False, **cfg), progress=False)
    stats = result["rows"]["amnesiac"]["stats"]
    assert stats["steps_total"] == math.ceil(result["sizes"]["train"] / 64)  # one epoch: this run's steps only


@pytest.mark.parametrize("kw, message", [
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\), got -1"),
    (dict(seed=2**32), "seed must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed=1.0), "seed must be an integer"),
    (dict(methods=["retrain", "amnesiac", "retrain"]), r"methods: \['retrain'\] selected twice"),
    (dict(keep_ratios=[0.1, 0.1000001]), "keep_ratios: .* name the row and store r=0.1 more than once"),
    (dict(method_hparams={"partial_optimization": {"keep_ratio": 0.3}}), "the keep_ratio of partial_optimization"),
    (dict(threads=0), "threads must be an integer >= 1, got 0"),
    (dict(threads=1.5), "threads must be an integer >= 1, got 1.5"),
])
def test_configurations_that_would_crash_late_or_record_wrong_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        validate_config(_config(**kw))


def test_results_record_the_forget_set_and_keep_ratios_the_rows_used(monkeypatch):
    """results.json never records an r, or a forget ratio, that no row used."""
    from unlearn_ext import metrics

    accuracies_only = metrics.evaluate  # the membership attacks take most of the time and are not read here
    monkeypatch.setattr(metrics, "evaluate", lambda net, **kw: accuracies_only(net, **{**kw, "lr_mia": False,
                                                                                        "svc_features": ()}))
    swept = run_experiment(_config(methods=["retrain", "partial_optimization"], keep_ratio=0.3, keep_ratios=[0.05, 0.2],
                                   epochs=1, train_size=300, test_size=200, calibrate=False,
                                   method_hparams={"partial_optimization": {"epochs": 1}}), progress=False)
    assert (swept["config"]["keep_ratio"], swept["config"]["keep_ratios"]) == (None, [0.05, 0.2])
    assert [swept["rows"][f"partial_optimization r={r}"]["stats"]["hparams"]["keep_ratio"] for r in ("0.05", "0.2")] \
        == [0.05, 0.2]
    whole_class = run_experiment(_config(methods=["retrain"], forget_class=3, epochs=1, train_size=300, test_size=200),
                                 progress=False)
    assert {k: whole_class["config"][k] for k in ("forget_class", "forget_ratio", "keep_ratio", "keep_ratios")} == \
        {"forget_class": 3, "forget_ratio": None, "keep_ratio": None, "keep_ratios": None}

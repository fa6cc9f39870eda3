"""The evaluation protocol (docs/protocol.md), on real data (scikit-learn's digits): what calibration may read, the
forgetting target, each method at its own defaults, the row verdicts, the steps-undone fraction."""
import copy

import pytest
import torch

from unlearn_ext import data, results
from unlearn_ext.experiment import Experiment, ExperimentConfig
from unlearn_ext.methods import get_method
from unlearn_ext.protocol import (LR_GRID, STEP_BUDGET, calibrated_run, forgetting_verdict, method_hparams,
                                  mia_reliable, validation_split)
from unlearn_ext.methods.base import UnlearnResult

CALIBRATED = ["label_flip", "partial_label_flip", "optimization", "partial_optimization"]


def _config(**kw):
    base = dict(dataset="digits", model="mlp", methods=["retrain", "amnesiac", "partial_amnesiac", "srl"] + CALIBRATED,
                forget_ratio=0.05, train_size=None, test_size=None, epochs=6, batch_size=32, seed=1,
                deterministic=True, method_hparams={"srl": {"epochs": 1}})
    return ExperimentConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained():
    exp = Experiment(_config())
    ids = exp.forget_ids()
    exp.train(progress=False)
    return exp, ids


@pytest.fixture(scope="module")
def result(trained):
    exp, ids = trained
    return exp.run(ids, progress=False)


def test_validation_split_is_two_disjoint_seeded_halves():
    test = data.load_digits().test
    val, rep = validation_split(test, seed=4)
    assert len(val) == len(test) // 2 and len(val) + len(rep) == len(test)
    assert not set(val.ids.tolist()) & set(rep.ids.tolist())
    assert sorted(val.ids.tolist() + rep.ids.tolist()) == sorted(test.ids.tolist())
    again, _ = validation_split(test, seed=4)
    other, _ = validation_split(test, seed=5)
    assert torch.equal(again.ids, val.ids) and not torch.equal(other.ids, val.ids)


def test_target_is_the_originals_validation_accuracy_and_calibrated_rows_meet_it(result):
    target = result["forgetting_target"]["value"]
    assert target == result["rows"]["original"]["validation_accuracy"]
    assert "validation half" in result["forgetting_target"]["basis"]
    assert result["sizes"]["validation"] + result["sizes"]["test"] == 449  # digits' test split, halved
    assert result["rows"]["original"]["FA"] > target  # the original has something to forget
    for name in CALIBRATED:
        row = result["rows"][name]
        cal = row["calibration"]
        assert row["verdict"]["met"] and cal["met"], (name, cal)
        assert row["FA"] <= target and row["verdict"]["forgot"] and not row["verdict"]["flag"]
        kept = cal["tries"][cal["chosen"]]
        assert row["stats"]["steps"] == kept["steps"] > 0
        assert row["stats"]["hparams"]["stop_forget_acc"] == target
        assert row["stats"]["hparams"]["lr"] == kept["lr"]
        # every try before the kept one missed, at a rate of the documented grid
        assert [t["lr"] for t in cal["tries"]] == [1e-3 * f for f in LR_GRID[:len(cal["tries"])]]
        assert all(not t["met"] for t in cal["tries"][:-1])
        assert f"met in {kept['steps']} steps" in results.forgetting_cell(row)


def test_calibration_never_reads_the_reported_test_half_or_retrain(trained, result):
    """Scramble the reported test half and drop Retrain: every calibrated row is bitwise the same."""
    exp, ids = trained
    other = copy.copy(exp)
    other.cfg = copy.deepcopy(exp.cfg)
    other.cfg.methods = [m for m in exp.cfg.methods if m != "retrain"]
    test = exp.data.test
    g = torch.Generator().manual_seed(0)
    scrambled = data.IndexedTensorDataset(torch.rand(test.x.shape, generator=g),
                                          torch.randint(0, 10, test.y.shape, generator=g), test.ids)
    other.data = copy.copy(exp.data)
    other.data.test = scrambled
    again = other.run(ids, progress=False)
    assert "retrain" not in again["rows"]
    assert again["rows"]["original"]["TA"] != result["rows"]["original"]["TA"]  # the test half did change
    for name in CALIBRATED:
        assert again["rows"][name]["weights_sha256"] == result["rows"][name]["weights_sha256"], name
        assert again["rows"][name]["calibration"] == result["rows"][name]["calibration"] or \
            _same_tries(again["rows"][name]["calibration"], result["rows"][name]["calibration"]), name


def _same_tries(a, b):  # equal but for the wall-clock seconds
    strip = [{k: v for k, v in t.items() if k != "seconds"} for t in a["tries"]]
    return strip == [{k: v for k, v in t.items() if k != "seconds"} for t in b["tries"]]


def test_each_method_gets_its_own_defaults(result):
    rows = result["rows"]
    srl = get_method("srl").defaults
    assert rows["srl"]["stats"]["hparams"]["lr"] == srl["lr"] != 1e-3  # not the model's learning rate
    assert "calibration" not in rows["srl"] or rows["srl"]["stats"]["hparams"]["epochs"] == 1
    assert rows["retrain"]["stats"]["hparams"]["train_config"]  # the recipe reaches Retrain
    hp = method_hparams(get_method("ng_plus"), {"seed": 3, "num_classes": 10}, 5e-4, 0.2, {})
    assert "lr" not in hp and "keep_ratio" not in hp
    hp = method_hparams(get_method("partial_label_flip"), {"seed": 3}, 5e-4, 0.2, {"epochs": 2})
    assert hp == {"seed": 3, "lr": 5e-4, "keep_ratio": 0.2, "epochs": 2}


def test_steps_undone_equals_the_stores_count(trained, result):
    """Replay the training loader's batches: the amnesiac rows undo exactly the steps that held a forget id."""
    exp, ids = trained
    loader = exp._loader(exp.data.train, 0)
    held = total = 0
    for _ in range(exp.cfg.epochs):
        for _, _, batch_ids in loader:
            total += 1
            held += bool(torch.isin(batch_ids, ids).any())
    for name in ("amnesiac", "partial_amnesiac"):
        stats = result["rows"][name]["stats"]
        assert (stats["steps_removed"], stats["steps_total"]) == (held, total)
        assert stats["fraction_steps_affected"] == held / total
        assert len(exp.stores[(name, None if name == "amnesiac" else 0.1)].steps_containing(ids)) == held


def test_user_fixed_knobs_are_not_calibrated():
    calls = []

    def run(hp):
        calls.append(dict(hp))
        return None, UnlearnResult(None, 0.1, {"forget_acc": 0.9, "steps": 3})

    label_flip = get_method("label_flip")
    _, _, cal = calibrated_run(run, label_flip, {"lr": 1e-3}, {}, target=0.5, forget_batches=4)
    assert [c["lr"] for c in calls] == [1e-3 * f for f in LR_GRID] and not cal.met  # escalates, then misses
    assert calls[0]["epochs"] == STEP_BUDGET // 4 + (STEP_BUDGET % 4 > 0)
    calls.clear()
    _, _, cal = calibrated_run(run, label_flip, {"lr": 0.2, "epochs": 7}, {"lr": 0.2, "epochs": 7},
                               target=0.5, forget_batches=4)
    assert [(c["lr"], c["epochs"]) for c in calls] == [(0.2, 7)] and cal.fixed_by_user == ["epochs", "lr"]
    calls.clear()
    _, _, cal = calibrated_run(run, get_method("ng_plus"), {}, {}, target=0.95, forget_batches=4)
    assert calls[0]["epochs"] == 10 and cal.met and len(calls) == 1  # not a forget-set loop: its own epochs


def test_verdict_flags_rows_that_did_not_forget_or_equal_the_original():
    original = {"FA": 0.9, "weights_sha256": "a"}
    assert forgetting_verdict({"FA": 0.9, "weights_sha256": "b"}, original, 0.8)["flag"] == "no forgetting"
    assert forgetting_verdict({"FA": 0.95, "weights_sha256": "b"}, original, 0.8)["forgot"] is False
    assert forgetting_verdict({"FA": 0.9, "weights_sha256": "a"}, original, 0.8)["flag"] == \
        "weights equal the original's"
    assert "already met" in forgetting_verdict({"FA": 0.9, "weights_sha256": "a"}, original, 0.95)["flag"]
    ok = forgetting_verdict({"FA": 0.7, "weights_sha256": "b"}, original, 0.8)
    assert ok == {"target": 0.8, "met": True, "forgot": True, "equals_original": False, "flag": ""}
    missed = forgetting_verdict({"FA": 0.85, "weights_sha256": "b"}, original, 0.8)
    assert missed["forgot"] and not missed["met"]


def test_small_attack_groups_are_marked_unreliable(result):
    assert not mia_reliable({"n_forget": 49, "n_test": 1000}) and mia_reliable({"n_forget": 50, "n_test": 50})
    assert result["sizes"]["forget"] >= 50 and "†" not in results.table(result)
    small = copy.deepcopy(result)
    for row in small["rows"].values():
        row["n_forget"] = 13  # as a 1 % forget set of digits would have
    text = results.table(small)
    assert "† unreliable" in text and results.UNRELIABLE in text.splitlines()[2]
    assert "unreliable" in results.leakage(small)


def test_chart_names_the_attack_and_the_direction(result, tmp_path):
    labels = [label for label, _ in results.CHART_KEYS]
    assert any("SVC MIA" in label and "member" in label for label in labels)
    path = tmp_path / "chart.png"
    results.chart(result, str(path))
    assert path.stat().st_size > 1000


def test_retrain_is_the_reference_not_judged(result):
    verdict = result["rows"]["retrain"]["verdict"]
    assert verdict["reference"] and verdict["flag"] == ""
    assert results.forgetting_cell(result["rows"]["retrain"]).startswith("the reference: FA")

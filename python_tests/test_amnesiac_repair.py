"""Amnesiac undo followed by a calibrated repair on D_r (``repair=True``, docs/algorithms.md#partial-amnesiac):
the repair keeps the most-repaired state whose forget accuracy is still at most ``repair_target``; off by
default, when every row is what it was before the option existed.

Scenario: scikit-learn's digits, a tiny MLP trained with dense and r = 0.5 recorders; a random forget set of
60 samples at batch 32 sits in most steps, so the undo alone drops forget accuracy far and a repair raises it
again within one epoch.
"""
import copy
import dataclasses
import importlib.util
import json
import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

warnings.filterwarnings("ignore", message="unlearn_ext: compiled kernels not loaded")

from unlearn_ext.data import forget_ids, load_digits, loader, split_forget  # noqa: E402
from unlearn_ext.methods import unlearn  # noqa: E402
from unlearn_ext.methods.common import cross_entropy, finetune, run_epochs  # noqa: E402
from unlearn_ext.methods.paper import NaiveAmnesiac, PartialAmnesiac  # noqa: E402
from unlearn_ext.metrics import accuracy  # noqa: E402
from unlearn_ext.models import make_model  # noqa: E402
from unlearn_ext.protocol import supports_calibration  # noqa: E402
from unlearn_ext.train import TrainConfig, make_optimizer, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH, LR = 32, 1e-3
STORE_RATIO = {"amnesiac": None, "partial_amnesiac": 0.5}


@pytest.fixture(scope="module")
def s():
    torch.manual_seed(0)
    d = load_digits()
    fid = forget_ids(d.train, ratio=60 / len(d.train), seed=0)
    forget_ds, retain_ds = split_forget(d.train, fid)
    model = make_model("mlp", d.input_shape, d.num_classes, hidden=32)
    recorders = {None: NaiveAmnesiac.recorder(model), 0.5: PartialAmnesiac.recorder(model, keep_ratio=0.5)}
    train(model, loader(d.train, BATCH, shuffle=True, seed=0), TrainConfig(epochs=6, batch_size=BATCH, lr=LR),
          recorders=list(recorders.values()))
    return SimpleNamespace(model=model, stores={k: r.store for k, r in recorders.items()},
                           forget=loader(forget_ds, BATCH), retain=lambda: loader(retain_ds, BATCH, shuffle=True, seed=1),
                           ids=fid)


def _undone(s, name):
    """The original with the steps holding a forget sample undone (no fine-tune), as the method does it."""
    store = s.stores[STORE_RATIO[name]]
    model = copy.deepcopy(s.model)
    store.apply(model, store.steps_containing(s.ids), alpha=-1.0)
    return model


def _run(s, name, **hp):
    return unlearn(name, copy.deepcopy(s.model), forget=s.forget, retain=s.retain(),
                   store=s.stores[STORE_RATIO[name]], lr=LR, **hp)


def _replay(s, name, epochs):
    """Every state the repair passes through — after the undo, then after each fine-tune step — with its forget
    accuracy: the same optimizer, loader order and steps the method takes, no stopping."""
    model = _undone(s, name)
    states = []

    def record_then_loss(m, x, y, ids):
        states.append(({k: v.detach().clone() for k, v in m.state_dict().items()}, accuracy(m, s.forget)))
        m.train()
        return cross_entropy(m, x, y, ids)
    cfg = dataclasses.replace(TrainConfig(), epochs=epochs, lr=LR)
    run_epochs(model, s.retain(), make_optimizer(model.parameters(), cfg), epochs, record_then_loss)
    states.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, accuracy(model, s.forget)))
    return states


def _same_weights(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items())


@pytest.mark.parametrize("name", ["amnesiac", "partial_amnesiac"])
def test_repair_stops_at_the_most_repaired_state_within_the_target(s, name):
    states = _replay(s, name, epochs=1)
    undo_fa, full_fa = states[0][1], states[-1][1]
    assert full_fa > undo_fa + 0.2, "the scenario needs a repair that raises forget accuracy"
    target = (undo_fa + full_fa) / 2
    res = _run(s, name, repair=True, repair_target=target)
    kept = max(i for i, (_, fa) in enumerate(states) if fa <= target)
    assert 0 < kept < len(states) - 1  # a state strictly inside the run: the rule, not an end, decided
    assert res.stats["finetune_steps"] == kept and res.stats["steps_run"] == len(states) - 1
    assert _same_weights(res.model.state_dict(), states[kept][0])
    assert res.stats["repaired"] and not res.stats["finetuned"]
    assert res.stats["forget_acc"] == accuracy(res.model, s.forget) <= target == res.stats["target_forget_acc"]


@pytest.mark.parametrize("every_step", [True, False])
@pytest.mark.parametrize("name", ["amnesiac", "partial_amnesiac"])
def test_repair_never_ends_above_the_target_when_the_undo_met_it(s, name, every_step):
    undo_fa = accuracy(_undone(s, name), s.forget)
    for target in (undo_fa, undo_fa + 0.3):  # met exactly at the start; met for a while
        res = _run(s, name, repair=True, repair_target=min(target, 1.0), repair_epochs=2,
                   repair_every_step=every_step)
        assert accuracy(res.model, s.forget) <= min(target, 1.0)


def test_repair_that_cannot_meet_the_target_runs_to_its_end_and_says_so(s):
    undo_fa = accuracy(_undone(s, "amnesiac"), s.forget)
    res = _run(s, "amnesiac", repair=True, repair_target=undo_fa / 2)
    assert res.stats["forget_acc"] > res.stats["target_forget_acc"]
    assert res.stats["finetune_steps"] == len(s.retain())  # every step of its one epoch


@pytest.mark.parametrize("name", ["amnesiac", "partial_amnesiac"])
def test_repair_off_is_bitwise_the_plain_method(s, name):
    """Off (the default, or given with its other knobs) the method is the undo then, for naive amnesiac, the
    plain fine-tune: weights equal to those calls made directly."""
    expected = _undone(s, name)
    if name == "amnesiac":
        torch.manual_seed(0)
        finetune(expected, s.retain(), None, 1, LR)
    for hp in ({}, {"repair": False, "repair_epochs": 3, "repair_every_step": False}):
        torch.manual_seed(0)
        res = _run(s, name, **hp)
        assert _same_weights(res.model.state_dict(), expected.state_dict()), hp
        assert "repaired" not in res.stats and "forget_acc" not in res.stats


def test_the_runner_does_not_calibrate_amnesiac():
    """The target has its own name: a default ``stop_forget_acc`` beside ``epochs`` would make the runner
    calibrate the plain rows (learning-rate grid, step budget)."""
    assert not supports_calibration(NaiveAmnesiac) and not supports_calibration(PartialAmnesiac)
    assert NaiveAmnesiac.defaults["repair"] is False and PartialAmnesiac.defaults["repair"] is False


@pytest.mark.parametrize("hp, named", [
    ({"repair": True}, "repair_target"),
    ({"repair": True, "repair_target": 1.5}, "repair_target"),
    ({"repair": True, "repair_target": -0.1}, "repair_target"),
    ({"repair": True, "repair_target": float("nan")}, "repair_target"),
    ({"repair": True, "repair_target": "0.5"}, "repair_target"),
    ({"repair": True, "repair_target": True}, "repair_target"),
    ({"repair": True, "repair_target": 0.5, "repair_epochs": 0}, "repair_epochs"),
    ({"repair": True, "repair_target": 0.5, "repair_epochs": 1.5}, "repair_epochs"),
    ({"repair": "yes", "repair_target": 0.5}, "repair"),
    ({"repair": True, "repair_target": 0.5, "repair_every_step": 1}, "repair_every_step"),
    ({"repair_target": 0.5}, "repair_target"),
])
def test_bad_repair_values_are_one_line_errors_naming_the_argument(s, hp, named):
    model = copy.deepcopy(s.model)
    with pytest.raises(ValueError) as e:
        unlearn("amnesiac", model, forget=s.forget, retain=s.retain(), store=s.stores[None], **hp)
    assert re.search(rf"\b{named}\b", str(e.value)) and "\n" not in str(e.value)
    assert _same_weights(model.state_dict(), s.model.state_dict())  # refused before anything was undone


def test_repair_without_retain_is_refused(s):
    with pytest.raises(ValueError, match="repair=True needs retain="):
        unlearn("partial_amnesiac", copy.deepcopy(s.model), forget=s.forget, store=s.stores[0.5], repair=True,
                repair_target=0.5)


# ------------------------------------------------------------------ the regime map's rule (benchmarks/amnesiac_regime.py)

def _regime():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "amnesiac_regime.py")
    spec = importlib.util.spec_from_file_location("harness_amnesiac_regime", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _p(dTA=0.0, dFA=0.0, dMIA=0.0, seed=0):
    return {"dTA": dTA, "dFA": dFA, "dMIA": dMIA, "seed": seed}


MARGINS = {"dTA": 0.02, "dFA": 0.05, "dMIA": 0.05}


def test_the_regime_rule_asks_for_forgetting_and_for_ta_either_way():
    regime = _regime()
    leaking = _p(dFA=0.15, dMIA=0.3)  # the original: FA and MIA well above Retrain's
    assert regime._seed_call(_p(dTA=-0.01, dFA=0.02), leaking, MARGINS) == "within"
    assert regime._seed_call(_p(dTA=-0.01, dFA=0.15, dMIA=0.3), leaking, MARGINS) == "outside"  # forgot nothing
    assert regime._seed_call(_p(dTA=-0.03), leaking, MARGINS) == "outside"  # damage
    assert regime._seed_call(_p(dTA=+0.03), leaking, MARGINS) == "outside"  # two-sided
    assert regime._seed_call(_p(dTA=0.0), _p(dFA=0.01), MARGINS) == "unmeasurable"  # the original passes too
    assert regime._seed_call(_p(dTA=-0.05), _p(dFA=0.01), MARGINS) == "outside"


def test_a_cell_whose_interval_straddles_a_boundary_is_inconclusive():
    regime = _regime()
    originals = [_p(dFA=0.2, dMIA=0.3, seed=s) for s in range(3)]
    inside = [_p(dTA=d, seed=s) for s, d in enumerate((-0.004, -0.006, -0.005))]
    straddles = [_p(dTA=d, seed=s) for s, d in enumerate((-0.01, -0.03, -0.02))]  # 2 of 3 seeds past −2 points
    past = [_p(dTA=d, seed=s) for s, d in enumerate((-0.10, -0.11, -0.12))]
    assert regime._cell_call(inside, originals, MARGINS) == "within"
    assert regime._cell_call(straddles, originals, MARGINS) == "inconclusive"
    assert regime._cell_call(past, originals, MARGINS) == "outside"
    assert regime._cell_call(inside, [_p(seed=s) for s in range(3)], MARGINS) == "unmeasurable"


def test_margins_are_two_binomial_standard_errors_of_retrains_figures():
    regime = _regime()
    retrain = [{"n_forget": 100, "FA": 0.8, "MIA": 0.0} for _ in range(3)]
    margins = regime._margins(retrain)
    assert margins["dFA"] == pytest.approx(2 * (0.8 * 0.2 / 100) ** 0.5)
    assert margins["dMIA"] == pytest.approx(2 * (0.09 / 100) ** 0.5)  # floored: not 0 at p = 0
    assert margins["dTA"] == 0.02


@pytest.mark.parametrize("argv, named", [
    (["--report", "/nonexistent/regime.json"], "--report"),
    (["--sizes", "4,x"], "--sizes"),
    (["--sizes", "0,4"], "--sizes"),
    (["--keep-ratios", "0,0.1"], "--keep-ratios"),
    (["--threads", "-1"], "--threads"),
    (["--epochs", "0"], "--epochs"),
    (["--value-dtype", "int8"], "--value-dtype"),
])
def test_regime_harness_bad_arguments_are_refused_naming_them(tmp_path, capsys, argv, named):
    regime = _regime()
    out = tmp_path / "regime"
    with pytest.raises(SystemExit) as e:
        regime.main([*argv, "--out", str(out)])
    message = str(e.value.code) + capsys.readouterr().err
    assert named in message and "Traceback" not in message
    assert not list(tmp_path.iterdir())  # nothing written


def _raw_row(ta, fa, mia, n, seconds=1.0):
    return {"TA": ta, "RA": ta + 0.1, "FA": fa, "MIA": mia, "LR_MIA": None, "n_forget": n, "seconds": seconds,
            "verdict": {"met": fa <= 0.85}}


def test_regime_report_is_made_from_the_json_alone(tmp_path, monkeypatch):
    """``--report`` rewrites the page from the raw rows: the same bytes twice, with the two-sided calls."""
    regime = _regime()
    monkeypatch.setattr(regime, "_plot", lambda points, path: None)  # the page is the point; matplotlib is slow
    raw = []
    for seed in range(3):
        for n in (50, 150):
            e = 0.001 * seed
            raw.append({"model": "lenet", "seed": seed, "size": n, "undone": n / 400, "rows": {
                "original": _raw_row(0.85, 1.0, 0.9, n, seconds=60.0),
                "retrain": _raw_row(0.84 + e, 0.84, 0.5, n, seconds=60.0),
                "amnesiac (no fine-tune)": _raw_row(0.70 + e, 0.70, 0.3, n),
                "partial_amnesiac r=0.1": _raw_row(0.835 + e, 0.845 + e, 0.5 + e, n)}})
    source = tmp_path / "raw.json"
    source.write_text(json.dumps(raw))
    pages = []
    for _ in range(2):
        regime.main(["--report", str(source), "--sizes", "50,150", "--keep-ratios", "0.1", "--out",
                     str(tmp_path / "page")])
        pages.append((tmp_path / "page.md").read_bytes())
    assert pages[0] == pages[1]
    page = pages[0].decode()
    assert "- partial_amnesiac r=0.1: 12.5% within (3/3), 37.5% within (3/3)." in page
    assert "- amnesiac (no fine-tune): 12.5% outside (0/3), 37.5% outside (0/3)." in page

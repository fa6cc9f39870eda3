"""What the experiment runner gives each method is declared on the method's class: every registered method
gets today's learning rate, keep ratio, calibration and step budget, and a new method gets exactly what it
declares."""
from __future__ import annotations

import math

import pytest

from unlearn_ext import metrics
from unlearn_ext.experiment import ExperimentConfig, reads_keep_ratio, run_experiment, validate_config
from unlearn_ext.methods import Method, UnlearnResult, available_methods, get_method, register_method, unregister_method
from unlearn_ext.methods.common import STOP_HPARAMS
from unlearn_ext.protocol import RUN_FACTS, STEP_BUDGET, calibrated_run, method_hparams, supports_calibration

MODEL_LR, RUN_R = 0.123, 0.37
FACTS = {k: f"<{k}>" for k in RUN_FACTS}


def _runner_decisions(name: str) -> dict:
    """What the runner does with method ``name``: the hyper-parameters it passes on top of the defaults, the
    epochs budget calibration gives it (None: not calibrated; one forget batch, so a budget counted in passes
    over D_f is STEP_BUDGET epochs), whether its rows follow the run's keep ratio, and whether a per-method
    keep_ratio is refused as the run's."""
    cls = get_method(name)
    hp = method_hparams(cls, FACTS, MODEL_LR, RUN_R, {})
    budget = None
    if supports_calibration(cls):
        _, _, cal = calibrated_run(lambda trial: (None, UnlearnResult(None, 0.0, {"forget_acc": 0.0})), cls, hp, {},
                                   target=0.5, forget_batches=1)
        budget = cal.budget_epochs
    try:
        validate_config(ExperimentConfig(methods=[name], method_hparams={name: {"keep_ratio": 0.3}}))
        refuses_own_r = False
    except ValueError as e:
        refuses_own_r = "configuration's keep_ratio" in str(e)
    return {"passed": hp, "budget": budget, "reads_r": reads_keep_ratio(name), "refuses_own_r": refuses_own_r}


def _seed(**more):
    return {"seed": "<seed>", **more}


#: What the runner gave every method before the policy moved onto the method classes.
RECORDED = {
    "amnesiac": ({"train_config": "<train_config>", "lr": MODEL_LR}, None, False, False),
    "bad_teacher": (_seed(), 10, False, False),
    "certified": (_seed(), None, False, False),
    "cfk": ({}, 10, False, False),
    "ct": ({}, 3, False, False),
    "euk": (_seed(), 10, False, False),
    "finetune": ({"train_config": "<train_config>", "lr": MODEL_LR}, 2, False, False),
    "fisher": (_seed(), None, False, False),
    "ga": ({}, STEP_BUDGET, False, False),
    "influence": (_seed(), None, False, False),
    "label_flip": (_seed(lr=MODEL_LR), STEP_BUDGET, False, False),
    "msg": (_seed(), 5, False, False),
    "ng_plus": ({}, 10, False, False),
    "optimization": ({"lr": MODEL_LR}, STEP_BUDGET, False, False),
    "partial_amnesiac": ({"train_config": "<train_config>", "lr": MODEL_LR}, None, True, False),
    "partial_label_flip": (_seed(lr=MODEL_LR, keep_ratio=RUN_R), STEP_BUDGET, True, True),
    "partial_optimization": (_seed(lr=MODEL_LR, keep_ratio=RUN_R), STEP_BUDGET, True, True),
    "retrain": (_seed(model_factory="<model_factory>", train_config="<train_config>"), None, False, False),
    "salun": (_seed(), 10, False, False),
    "scrub": ({}, None, False, False),
    "sfron": ({}, None, False, False),
    "srl": (_seed(), 5, False, False),
}


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_every_method_gets_what_it_got_before(name):
    passed, budget, reads_r, refuses_own_r = RECORDED[name]
    assert _runner_decisions(name) == {"passed": passed, "budget": budget, "reads_r": reads_r,
                                       "refuses_own_r": refuses_own_r}


# ------------------------------------------------------------------- a new method gets what it declares

class _Undeclared(Method):
    """Changes nothing; reports the hyper-parameters it was given (``stats["hparams"]``) and a forget accuracy
    that meets any target."""

    name = "policy_undeclared"
    defaults = {"lr": 0.5, "keep_ratio": 0.5, "epochs": 3, "seed": 0}

    def _run(self, model, forget, retain, store, hp):
        return {"forget_acc": 0.0, "steps": 0}


class _ModelLr(_Undeclared):
    name = "policy_model_lr"
    uses_model_lr = True


class _RunKeepRatio(_Undeclared):
    name = "policy_run_keep_ratio"
    takes_run_keep_ratio = True


class _Stops(_Undeclared):
    name = "policy_stops"
    defaults = {**_Undeclared.defaults, **STOP_HPARAMS}


class _ForgetPasses(_Stops):
    name = "policy_forget_passes"
    budget_in_forget_passes = True


NEW_METHODS = [_Undeclared, _ModelLr, _RunKeepRatio, _Stops, _ForgetPasses]


@pytest.fixture
def new_methods():
    """The methods above, registered for one test only."""
    try:
        yield [register_method(cls).name for cls in NEW_METHODS]
    finally:
        for cls in NEW_METHODS:
            if cls.name in available_methods():
                unregister_method(cls.name)


def test_the_runner_honours_each_declaration_of_a_new_method(new_methods, monkeypatch):
    accuracies_only = metrics.evaluate  # the membership attacks are slow and not read here
    monkeypatch.setattr(metrics, "evaluate", lambda net, **kw: accuracies_only(net, **{**kw, "lr_mia": False,
                                                                                        "svc_features": ()}))
    result = run_experiment(ExperimentConfig(dataset="digits", model="mlp", methods=new_methods, forget_ratio=0.05,
                                             train_size=300, test_size=200, epochs=1, batch_size=64, lr=0.02,
                                             keep_ratios=[0.05, 0.2], seed=3), progress=False)
    rows = result["rows"]
    got = {name: row["stats"]["hparams"] for name, row in rows.items() if name != "original"}
    own = _Undeclared.defaults
    assert got["policy_undeclared"]["lr"] == own["lr"] and got["policy_undeclared"]["keep_ratio"] == own["keep_ratio"]
    assert "calibration" not in rows["policy_undeclared"]  # no stopping knob: run once at its defaults
    assert got["policy_model_lr"]["lr"] == 0.02 and got["policy_model_lr"]["keep_ratio"] == own["keep_ratio"]
    assert [got[f"policy_run_keep_ratio r={r}"]["keep_ratio"] for r in ("0.05", "0.2")] == [0.05, 0.2]
    assert got["policy_run_keep_ratio r=0.05"]["lr"] == own["lr"]
    assert "policy_undeclared r=0.05" not in rows  # only a method that takes r gets a row per r
    target = result["forgetting_target"]["value"]
    stops = rows["policy_stops"]["calibration"]
    assert (stops["target"], stops["budget_epochs"]) == (target, own["epochs"])  # its own epochs
    assert got["policy_stops"]["stop_forget_acc"] == target
    forget_batches = math.ceil(result["sizes"]["forget"] / 64)
    passes = rows["policy_forget_passes"]["calibration"]
    assert passes["budget_epochs"] == math.ceil(STEP_BUDGET / forget_batches) > own["epochs"]  # counted in steps


def test_a_new_methods_keep_ratio_is_the_runs_only_if_it_declares_so(new_methods):
    assert [reads_keep_ratio(name) for name in new_methods] == [False, False, True, False, False]
    with pytest.raises(ValueError, match="the keep_ratio of policy_run_keep_ratio is the configuration's"):
        validate_config(ExperimentConfig(methods=["policy_run_keep_ratio"],
                                         method_hparams={"policy_run_keep_ratio": {"keep_ratio": 0.3}}))
    validate_config(ExperimentConfig(methods=["policy_undeclared"],
                                     method_hparams={"policy_undeclared": {"keep_ratio": 0.3}}))


@pytest.mark.parametrize("declaration,hparam", [("uses_model_lr", "lr"), ("takes_run_keep_ratio", "keep_ratio"),
                                                ("budget_in_forget_passes", "epochs")])
def test_a_declaration_without_its_hyper_parameter_is_refused_at_registration(declaration, hparam):
    cls = type("Declares", (Method,), {"name": "policy_declares", "defaults": {}, declaration: True})
    with pytest.raises(ValueError, match=f"Declares declares {declaration} but its defaults lack \\['{hparam}'\\]"):
        register_method(cls)
    assert "policy_declares" not in available_methods()


def test_unregistering_an_unknown_method_names_it():
    with pytest.raises(ValueError, match="unknown method 'policy_nowhere'"):
        unregister_method("policy_nowhere")

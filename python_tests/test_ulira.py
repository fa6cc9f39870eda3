"""U-LiRA (SPEC §5) at a tiny budget on sklearn digits: the report's fields, that an attacker sees through
"unlearning" that does nothing, and the leave-one-split-out bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn_ext.data import load_digits
from unlearn_ext.metrics.ulira import logit_confidence, method_unlearn_fn, recipe_train_fn, ulira
from unlearn_ext.models import make_model
from unlearn_ext.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


BUDGET = dict(n_shadow=4, n_forget=2, forget_fraction=0.5, seed=0)


@pytest.fixture(scope="module")
def pool():
    train_set = load_digits().train
    return train_set.subset(torch.arange(240))


@pytest.fixture(scope="module")
def train_fn():
    # small and overfitted, so that membership leaves a trace in the confidence
    return recipe_train_fn(lambda: make_model("mlp", (1, 8, 8), 10, hidden=64),
                           TrainConfig(epochs=40, batch_size=32, lr=3e-3))


@pytest.fixture(scope="module")
def nothing(pool, train_fn):
    """U-LiRA of an "unlearning" that leaves the model as it is."""
    return ulira(pool, train_fn, lambda model, forget, retain, seed: model, **BUDGET)


def _check_report(res, pool):
    assert 0.0 <= res.auc <= 1.0
    assert 0.0 <= res.tpr_at_1_fpr <= res.tpr_at_5_fpr <= 1.0
    assert res.n_scored == res.n_positive + res.n_negative == len(res.scores) == len(res.labels)
    assert res.n_positive > 0 and res.n_negative > 0
    # observations: per (split, forget set) |F| unlearned and |OUT| never-seen samples
    n_in = len(pool) // 2
    n_f = round(BUDGET["forget_fraction"] * n_in)
    per_run = n_f + (len(pool) - n_in)
    assert res.n_scored + res.n_unscored == BUDGET["n_shadow"] * BUDGET["n_forget"] * per_run
    assert res.config["n_shadow"] == BUDGET["n_shadow"] and res.config["n_forget"] == BUDGET["n_forget"]
    assert set(res.to_dict()) >= {"auc", "tpr_at_1_fpr", "tpr_at_5_fpr", "n_scored", "config"}


def test_ulira_catches_a_method_that_forgets_nothing(pool, nothing):
    _check_report(nothing, pool)
    assert nothing.auc > 0.6  # the "forgotten" samples are still members


def test_ulira_is_near_chance_for_retraining(pool, train_fn, nothing):
    """Exact unlearning (retrain on R through the registered "retrain" method) leaves nothing to find."""
    cfg = TrainConfig(epochs=40, batch_size=32, lr=3e-3)
    retrain = method_unlearn_fn("retrain", batch_size=32, train_config=cfg,
                                model_factory=lambda: make_model("mlp", (1, 8, 8), 10, hidden=64))
    res = ulira(pool, train_fn, retrain, **BUDGET)
    _check_report(res, pool)
    assert 0.35 < res.auc < 0.65
    assert res.auc < nothing.auc - 0.08


def test_ulira_smoke_with_a_registered_method(pool, train_fn):
    calls = []
    inner = method_unlearn_fn("ga", batch_size=32, epochs=1, lr=1e-3)

    def unlearn_fn(model, forget, retain, seed):
        calls.append((len(forget), len(retain), seed))
        return inner(model, forget, retain, seed)
    res = ulira(pool, train_fn, unlearn_fn, **BUDGET)
    _check_report(res, pool)
    assert len(calls) == BUDGET["n_shadow"] * BUDGET["n_forget"]
    assert all(f == 60 and r == 60 for f, r, _ in calls)
    assert len({s for _, _, s in calls}) == len(calls)  # one seed per run


def test_retrained_negatives(pool, train_fn):
    """negatives="retrained": label-0 observations are the forget samples under a model retrained on R."""
    res = ulira(pool, train_fn, lambda model, forget, retain, seed: model, negatives="retrained",
                n_shadow=3, n_forget=1, forget_fraction=0.5, seed=1)
    assert res.n_positive == res.n_negative  # both sides observe the same forget samples
    assert res.auc > 0.6


def test_logit_confidence_is_the_logit_of_the_true_class_probability(pool):
    torch.manual_seed(0)
    model = make_model("mlp", (1, 8, 8), 10, hidden=16)
    phi = logit_confidence(model, pool, batch_size=50)
    with torch.no_grad():
        p = torch.softmax(model(pool.x).double(), 1).gather(1, pool.y[:, None]).squeeze(1)
    np.testing.assert_allclose(phi, torch.log(p / (1 - p)).numpy(), rtol=1e-6, atol=1e-9)


def test_ulira_rejects_budgets_it_cannot_score(pool, train_fn):
    with pytest.raises(ValueError, match="n_shadow >= 2"):
        ulira(pool, train_fn, lambda *a: None, n_shadow=1)
    with pytest.raises(ValueError, match="forget_fraction"):
        ulira(pool, train_fn, lambda *a: None, forget_fraction=1.0)
    with pytest.raises(ValueError, match="negatives"):
        ulira(pool, train_fn, lambda *a: None, negatives="other")

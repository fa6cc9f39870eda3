"""U-LiRA (docs/protocol.md#u-lira) at a tiny budget on sklearn digits: the report's fields, that an attacker sees through
"unlearning" that does nothing, and the leave-one-split-out bookkeeping."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn_ext.data import load_digits
from unlearn_ext.metrics.ulira import logit_confidence, recipe_train_fn, ulira
from unlearn_ext.models import make_model
from unlearn_ext.protocol import method_unlearn_fn
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


# ------------------------------------------------------------------------------------------ Deep Unlearn's protocol

def _original_membership(label, sample, z):
    """munl/lira/consolidate_predictions.py compute_membership_probabilities, per forgotten observation."""
    from scipy.stats import norm

    out = {}
    for ndx in np.unique(sample):
        forgotten = z[(sample == ndx) & (label == 1)]
        never = z[(sample == ndx) & (label == 0)]
        f_mean, f_std, n_mean, n_std = np.mean(forgotten), np.std(forgotten), np.mean(never), np.std(never)
        out[ndx] = [norm.pdf(p, f_mean, f_std) / (norm.pdf(p, f_mean, f_std) + norm.pdf(p, n_mean, n_std))
                    for p in forgotten]
    return out


def test_deep_unlearn_membership_is_the_originals():
    from unlearn_ext.metrics.ulira import deep_unlearn_membership

    rng = np.random.default_rng(0)
    sample = np.repeat(np.arange(6), 12)
    label = np.tile(np.r_[np.ones(5), np.zeros(7)], 6).astype(int)
    z = (rng.random(len(sample)) < 0.7).astype(float)
    z[:12] = np.r_[np.ones(5), rng.random(7) < 0.5]  # sample 0: always right when forgotten, std 0 → NaN
    ours = deep_unlearn_membership(label, sample, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        original = _original_membership(label, sample, z)
    for ndx, probs in original.items():
        np.testing.assert_allclose(ours[(sample == ndx) & (label == 1)], probs, rtol=1e-12, equal_nan=True)
    assert np.isnan(ours[:5]).all() and not np.isnan(ours[12:]).all()


def test_ulira_deep_unlearn_protocol(pool, train_fn):
    """A model that fits its training half (train_fn) is always right on it: every forgotten fit has σ = 0 and
    the original's probabilities are all NaN; a briefly trained one gives numbers."""
    degenerate = ulira(pool, train_fn, lambda model, forget, retain, seed: model, protocol="deep_unlearn", **BUDGET)
    assert np.isnan(degenerate.membership).all() and np.isnan(degenerate.mean_membership)
    brief = recipe_train_fn(lambda: make_model("mlp", (1, 8, 8), 10, hidden=8), TrainConfig(epochs=2, batch_size=32))
    budget = dict(BUDGET, n_shadow=8, n_forget=4)  # 0/1 statistics need more observations per sample
    res = ulira(pool, brief, lambda model, forget, retain, seed: model, protocol="deep_unlearn", **budget)
    n_f = round(budget["forget_fraction"] * (len(pool) // 2))
    assert len(res.membership) == budget["n_shadow"] * budget["n_forget"] * n_f
    scored = ~np.isnan(res.membership)
    assert scored.sum() > 100 and res.mean_membership == pytest.approx(float(res.membership[scored].mean()))
    assert 0.0 <= res.mean_membership <= 1.0 and res.config["protocol"] == "deep_unlearn"
    assert ((0 <= res.scores) & (res.scores <= 1)).all() and 0 <= res.auc <= 1
    with pytest.raises(ValueError, match="protocol must be one of"):
        ulira(pool, train_fn, lambda m, f, r, s: m, protocol="lira", **BUDGET)
    with pytest.raises(ValueError, match="only never-seen negatives"):
        ulira(pool, train_fn, lambda m, f, r, s: m, protocol="deep_unlearn", negatives="retrained", **BUDGET)

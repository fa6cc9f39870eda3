"""Membership-inference metrics (docs/protocol.md#membership-inference). Both attacks read per-sample outputs from
:func:`~unlearn_ext.metrics.outputs.collect_outputs`; U-LiRA lives in :mod:`unlearn_ext.metrics.ulira`.

1. :func:`loss_lr_mia` — the NeurIPS'23 unlearning challenge / Deep Unlearn attack: a logistic regression on
   the per-sample loss separates members (D_f) from non-members (D_t).
2. :func:`svc_mia` — SalUn's shadow attack: an RBF-SVC trained on the target model's outputs for D_r
   (members) vs D_t (non-members), then applied to D_f; reports the fraction of D_f predicted "member".
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .outputs import SampleOutputs, collect_outputs

SVC_FEATURES = ("confidence", "entropy", "loss")


def indiscernibility(attack_accuracy: float) -> float:
    """Deep Unlearn's indiscernibility = 1 − |acc − 0.5| / 0.5: 1 when the attack is at chance (0.5),
    0 when it is always right (or always wrong)."""
    return 1.0 - abs(float(attack_accuracy) - 0.5) / 0.5


class NonFiniteOutputs(ValueError):
    """A model's per-sample outputs hold NaN/Inf (a diverged model): no attack can be scored on them."""


def _finite(name: str, values) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(arr).all():
        raise NonFiniteOutputs(f"{name}: non-finite values (a diverged model?)")
    return arr


def loss_lr_mia_from_losses(member_losses, nonmember_losses, *, n_splits: int = 10,
                            seed: int = 0) -> Dict[str, float]:
    """The loss-threshold logistic-regression MIA on given per-sample losses.

    Definition: draw (seeded) an equal number n = min(|members|, |non-members|) of each group, so the two
    membership classes are balanced and chance accuracy is 0.5; fit scikit-learn's default
    ``LogisticRegression`` on the raw loss (one feature) to predict membership; report its mean accuracy
    over a 10-fold ``StratifiedKFold`` (shuffled with ``seed``). The challenge's kit scores 10
    ``StratifiedShuffleSplit`` splits of the same data instead — the same expectation.

    Returns ``accuracy``, ``accuracy_std`` (over folds), ``indiscernibility`` (:func:`indiscernibility`)
    and ``n_per_group``. Fewer than ``n_splits`` samples per group raises ``ValueError``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    members = _finite("member losses", member_losses)
    nonmembers = _finite("non-member losses", nonmember_losses)
    n = min(len(members), len(nonmembers))
    if n < n_splits:
        raise ValueError(f"loss MIA needs at least {n_splits} samples per group for {n_splits}-fold CV, "
                         f"got {len(members)} members and {len(nonmembers)} non-members")
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.permutation(nonmembers)[:n], rng.permutation(members)[:n]]).reshape(-1, 1)
    y = np.concatenate([np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64)])
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = cross_val_score(LogisticRegression(), x, y, cv=cv, scoring="accuracy")
    acc = float(scores.mean())
    return {"accuracy": acc, "accuracy_std": float(scores.std()), "indiscernibility": indiscernibility(acc),
            "n_per_group": int(n)}


def loss_lr_mia(model: nn.Module, *, forget, test, n_splits: int = 10, seed: int = 0,
                device: Optional[torch.device] = None) -> Dict[str, float]:
    """:func:`loss_lr_mia_from_losses` with members = D_f (``forget``) and non-members = D_t (``test``),
    losses = per-sample cross-entropy of ``model``. After ideal unlearning the accuracy is near the
    retrained model's (≈ 0.5 for a random forget set) and the indiscernibility near 1."""
    return loss_lr_mia_from_losses(collect_outputs(model, forget, device).loss.numpy(),
                                   collect_outputs(model, test, device).loss.numpy(), n_splits=n_splits, seed=seed)


def svc_mia_from_outputs(retain: SampleOutputs, test: SampleOutputs, forget: SampleOutputs,
                         features: Sequence[str] = SVC_FEATURES, max_per_group: Optional[int] = 2000,
                         seed: int = 0) -> Dict[str, float]:
    """SalUn's SVC membership attack on collected outputs, one attack per feature.

    Definition, for each feature f (one scalar per sample, :class:`SampleOutputs`):

    * ``confidence``: p_y, the softmax probability of the true label (SalUn's ``conf``);
    * ``entropy``: −Σ_k p_k log p_k of the softmax (SalUn's ``entr``);
    * ``loss``: −log p_y, the cross-entropy (a monotone transform of confidence; the RBF kernel sees it on a
      different scale, so the attack differs).

    The attack training set is n samples of D_r labelled member and n of D_t labelled non-member, with
    n = min(|D_r|, |D_t|, ``max_per_group``) drawn with ``seed`` (SalUn takes n = |D_t| retain samples; the
    cap keeps the SVC fit to about a second). The attack is ``sklearn.svm.SVC(C=3, gamma="auto",
    kernel="rbf")`` on the raw feature, as in SalUn. The score is the fraction of **all** of D_f that it
    predicts "member", in [0, 1] — lower after unlearning, to be read against the retrained model's value
    (SalUn's "MIA-Efficacy" is 1 minus this).
    """
    from sklearn.svm import SVC

    unknown = sorted(set(features) - set(SVC_FEATURES))
    if unknown:
        raise ValueError(f"unknown SVC MIA feature(s) {unknown}; choose from {SVC_FEATURES}")
    n = min(len(retain), len(test), max_per_group or len(retain))
    rng = np.random.default_rng(seed)
    pick_r, pick_t = rng.permutation(len(retain))[:n], rng.permutation(len(test))[:n]
    y = np.concatenate([np.ones(n), np.zeros(n)])
    result = {}
    for f in features:
        x = np.concatenate([_finite(f, getattr(retain, f))[pick_r], _finite(f, getattr(test, f))[pick_t]])
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x.reshape(-1, 1), y)
        result[f] = float(clf.predict(_finite(f, getattr(forget, f)).reshape(-1, 1)).mean())
    return result


def svc_mia(model: nn.Module, *, retain, test, forget, features: Sequence[str] = SVC_FEATURES,
            max_per_group: Optional[int] = 2000, seed: int = 0,
            device: Optional[torch.device] = None) -> Dict[str, float]:
    """:func:`svc_mia_from_outputs` on ``model``'s outputs for the three loaders: {feature: fraction of D_f
    predicted member}."""
    return svc_mia_from_outputs(collect_outputs(model, retain, device), collect_outputs(model, test, device),
                                collect_outputs(model, forget, device), features, max_per_group, seed)

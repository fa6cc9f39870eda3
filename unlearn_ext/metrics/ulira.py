"""U-LiRA: the per-sample unlearning likelihood-ratio attack of Deep Unlearn (Cadet et al.; after Hayes et
al., "Inexact Unlearning Needs More Careful Evaluations to Avoid a False Sense of Privacy"), at a budget.

Question asked of every (model, sample) pair: was this sample *unlearned* from this model, or was it never
in its training set? An unlearning method that imitates retraining leaves the attacker at chance
(AUC ≈ 0.5); one that leaves traces of the forgotten samples is caught.

Protocol (:func:`ulira`), with a pool D of N samples:

1. For each of ``n_shadow`` splits s: a seeded random half IN_s of D trains a model θ_s
   (``train_fn(IN_s, seed)``); OUT_s = D \\ IN_s is never seen by it.
2. For each of ``n_forget`` forget sets f of split s: F_{s,f} = a random ``forget_fraction`` of IN_s,
   R = IN_s \\ F_{s,f}; the method under test unlearns it from a copy of θ_s
   (``unlearn_fn(model, F_{s,f}, R, seed)``), giving U_{s,f}.
3. Statistic: the logit-scaled confidence of the true label, φ = log p_y − log(1 − p_y), computed stably as
   z_y − logsumexp_{j≠y} z_j from the logits (Carlini et al.'s LiRA statistic). Observations: φ of U_{s,f}
   on every sample of F_{s,f} ("unlearned", label 1) and on every sample of OUT_s ("never seen", label 0).
   With ``negatives="retrained"`` the label-0 observations instead come from a model retrained on R
   (``train_fn(R, seed)``), evaluated on F_{s,f} — the exact-unlearning reference, at n_shadow·n_forget
   extra trainings.
4. Per sample i, Gaussians N(μ_in,i, σ_in) and N(μ_out,i, σ_out) are fitted to its label-1 and label-0
   observations **from the other shadow splits** (leave-one-split-out: an observation is never scored by
   fits that used its own model or a model unlearned from the same θ_s). With ``fix_variance=True``
   (default; Carlini et al.'s choice for small shadow counts) σ_in and σ_out are pooled over all samples,
   otherwise per sample. Score = log N(φ; μ_in, σ_in) − log N(φ; μ_out, σ_out). Observations whose sample
   lacks a label-1 or label-0 observation in the other splits are not scored (reported).
5. Over all scored observations: ROC AUC and TPR at 1% and 5% FPR (the largest TPR whose FPR ≤ the level).

Why this variant: Deep Unlearn's code takes the "forgotten vs never seen" split from its own
LiRA grid (64 splits × 10 forget sets, no extra training), so that is the default here; its statistic
(0/1 correctness, with a Gaussian fitted to Bernoulli outcomes) is replaced by the logit-scaled confidence,
the LiRA statistic its paper describes, because Gaussian fits to 0/1 values degenerate. Deep Unlearn's
budget is 640 unlearning runs; here both counts are arguments — a sample is unlearned in about
n_shadow·n_forget·forget_fraction/2 runs, so small budgets need a large ``forget_fraction`` to score many
samples.

``protocol="deep_unlearn"`` computes what Deep Unlearn's ``munl/lira/consolidate_predictions.py`` does, so
that numbers compare with its: statistic z = 1[argmax = y] (:func:`correctness`); per sample, mean and
(population) standard deviation of z over **all** its forgotten and all its never-seen observations (no
leave-one-split-out); for every observation the membership probability
p = N(z; μ_f, σ_f) / (N(z; μ_f, σ_f) + N(z; μ_n, σ_n)) (scipy's ``norm.pdf``, :func:`deep_unlearn_membership`).
Its output is p per forgotten observation: ``membership`` (NaN where a fit degenerates — a σ of 0, e.g. a
sample the models always classify right — as the original's is), ``mean_membership`` over the non-NaN
ones (0.5: no trace; → 1: the forgotten samples are still recognised). ``auc``/``tpr_*`` then rank all
scored observations, forgotten and never seen, by p (an addition: the original stops at p; NaN when every
fit of one kind degenerates). Only ``negatives="never_seen"`` exists there.

The two callables are usually built with :func:`recipe_train_fn` (a model factory and the training recipe)
and :func:`unlearn_ext.protocol.method_unlearn_fn` (any registered method through
:func:`unlearn_ext.methods.unlearn`, the same fast path the experiments use), e.g.::

    res = ulira(pool, recipe_train_fn(lambda: make_model("mlp", (1, 8, 8), 10), TrainConfig(epochs=20)),
                method_unlearn_fn("salun", epochs=5), n_shadow=8, n_forget=4)
    res.auc, res.tpr_at_1_fpr, res.tpr_at_5_fpr
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

TrainFn = Callable[[Dataset, int], nn.Module]
UnlearnFn = Callable[[nn.Module, Dataset, Dataset, int], Optional[nn.Module]]


PROTOCOLS = ("unlearn_ext", "deep_unlearn")


@dataclass
class ULiRAResult:
    auc: float
    tpr_at_1_fpr: float
    tpr_at_5_fpr: float
    n_scored: int
    n_unscored: int
    n_positive: int
    n_negative: int
    config: Dict[str, object] = field(default_factory=dict)
    scores: np.ndarray = field(default=None, repr=False)
    labels: np.ndarray = field(default=None, repr=False)
    #: protocol="deep_unlearn" only: the original's output, p per forgotten observation (NaN: degenerate fit)
    membership: Optional[np.ndarray] = field(default=None, repr=False)
    mean_membership: Optional[float] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("scores", "labels", "membership")}


@torch.no_grad()
def logit_confidence(model: nn.Module, pool: Dataset, batch_size: int = 512) -> np.ndarray:
    """φ = z_y − logsumexp_{j≠y} z_j (= log p_y/(1 − p_y)) for every sample of ``pool``, in order."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for x, y, _ in DataLoader(pool, batch_size=batch_size):
        z = model(x.to(device)).double()
        y = y.to(device)
        z_y = z.gather(1, y[:, None]).squeeze(1)
        others = z.scatter(1, y[:, None], float("-inf"))
        out.append((z_y - torch.logsumexp(others, dim=1)).cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def correctness(model: nn.Module, pool: Dataset, batch_size: int = 512) -> np.ndarray:
    """1.0 where the model's top-1 prediction is the label, else 0.0, for every sample of ``pool``, in order
    (Deep Unlearn's U-LiRA statistic)."""
    model.eval()
    device = next(model.parameters()).device
    out = [(model(x.to(device)).argmax(1).cpu() == y).double() for x, y, _ in DataLoader(pool, batch_size=batch_size)]
    return torch.cat(out).numpy()


def deep_unlearn_membership(label: np.ndarray, sample: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Deep Unlearn's ``compute_membership_probabilities`` for observations (label 1 forgotten / 0 never
    seen, sample index, statistic z): per sample the mean and population std of its forgotten and of its
    never-seen z, then p = pdf_f(z) / (pdf_f(z) + pdf_n(z)) for every observation (NaN where a std is 0 or a
    sample lacks one kind of observation)."""
    from scipy.stats import norm

    n = int(sample.max()) + 1 if len(sample) else 0
    moments = np.zeros((2, 3, n))
    for lab in (0, 1):
        sel = label == lab
        for m, values in enumerate((np.ones(sel.sum()), z[sel], z[sel] ** 2)):
            np.add.at(moments[lab, m], sample[sel], values)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = moments[:, 1] / moments[:, 0]
        std = np.sqrt(np.maximum(moments[:, 2] / moments[:, 0] - mean ** 2, 0.0))
        f = norm.pdf(z, mean[1, sample], std[1, sample])
        return f / (f + norm.pdf(z, mean[0, sample], std[0, sample]))


def recipe_train_fn(model_factory: Callable[[], nn.Module], config=None) -> TrainFn:
    """``train_fn`` for :func:`ulira`: a fresh ``model_factory()`` (built under the run's seed, the global RNG
    restored afterwards) trained by :func:`unlearn_ext.train.train` with ``config`` (default ``TrainConfig()``)
    on a loader of the subset shuffled with that seed."""
    from ..data import loader
    from ..train import TrainConfig, train

    cfg = config or TrainConfig()

    def run(subset: Dataset, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = model_factory()
        return train(model, loader(subset, cfg.batch_size, shuffle=True, seed=seed), cfg)
    return run


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    ok = fpr <= level
    return float(tpr[ok].max()) if ok.any() else 0.0


def ulira(pool: Dataset, train_fn: TrainFn, unlearn_fn: UnlearnFn, *, n_shadow: int = 8, n_forget: int = 4,
          forget_fraction: float = 0.1, negatives: str = "never_seen", fix_variance: bool = True,
          seed: int = 0, batch_size: int = 512, protocol: str = "unlearn_ext") -> ULiRAResult:
    """Run U-LiRA (module docstring) on ``pool`` (a dataset of (x, y, sample_id)).

    ``train_fn(train_subset, seed) -> model`` trains a fresh model; ``unlearn_fn(model, forget_subset,
    retain_subset, seed)`` unlearns in place (or returns the model). Both get ``torch.utils.data.Subset``s of
    ``pool``. Costs n_shadow trainings (+ n_shadow·n_forget with ``negatives="retrained"``) and
    n_shadow·n_forget unlearning runs.
    """
    if n_shadow < 2 or n_forget < 1:
        raise ValueError(f"need n_shadow >= 2 (fits leave one split out) and n_forget >= 1, "
                         f"got {n_shadow}, {n_forget}")
    if not 0 < forget_fraction < 1:
        raise ValueError(f"forget_fraction must be in (0, 1), got {forget_fraction}")
    if negatives not in ("never_seen", "retrained"):
        raise ValueError(f"negatives must be 'never_seen' or 'retrained', got {negatives!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "deep_unlearn" and negatives != "never_seen":
        raise ValueError('protocol="deep_unlearn" has only never-seen negatives (negatives="never_seen")')
    statistic = correctness if protocol == "deep_unlearn" else logit_confidence
    n = len(pool)
    gen = torch.Generator().manual_seed(int(seed))
    # per (sample, split, label): count, Σφ, Σφ² — enough for leave-one-split-out fits
    stats = np.zeros((2, 3, n, n_shadow))
    obs = []  # (label, sample, split, φ)

    def record(label: int, idx: np.ndarray, split: int, phi: np.ndarray):
        np.add.at(stats[label, 0], (idx, split), 1.0)
        np.add.at(stats[label, 1], (idx, split), phi)
        np.add.at(stats[label, 2], (idx, split), phi * phi)
        obs.append(np.stack([np.full(len(idx), label), idx, np.full(len(idx), split), phi], axis=1))

    for s in range(n_shadow):
        perm = torch.randperm(n, generator=gen).numpy()
        inside, outside = perm[: n // 2], perm[n // 2:]
        original = train_fn(Subset(pool, inside.tolist()), seed * 1000 + s)
        for f in range(n_forget):
            run_seed = (seed * 1000 + s) * 1000 + f
            order = inside[torch.randperm(len(inside), generator=gen).numpy()]
            n_f = max(1, int(round(forget_fraction * len(inside))))
            forget_idx, retain_idx = order[:n_f], order[n_f:]
            forget_set, retain_set = Subset(pool, forget_idx.tolist()), Subset(pool, retain_idx.tolist())
            model = copy.deepcopy(original)
            model = unlearn_fn(model, forget_set, retain_set, run_seed) or model
            phi = statistic(model, pool, batch_size)
            record(1, forget_idx, s, phi[forget_idx])
            if negatives == "never_seen":
                record(0, outside, s, phi[outside])
            else:
                phi_r = logit_confidence(train_fn(retain_set, run_seed), pool, batch_size)
                record(0, forget_idx, s, phi_r[forget_idx])

    obs = np.concatenate(obs)
    label, sample, split, phi = obs[:, 0].astype(int), obs[:, 1].astype(int), obs[:, 2].astype(int), obs[:, 3]
    config = {"n_shadow": n_shadow, "n_forget": n_forget, "forget_fraction": forget_fraction,
              "negatives": negatives, "fix_variance": fix_variance, "seed": seed, "pool_size": n,
              "protocol": protocol}
    if protocol == "deep_unlearn":
        p = deep_unlearn_membership(label, sample, phi)
        scored = ~np.isnan(p)
        membership = p[label == 1]
        mean = float(np.nanmean(membership)) if scored[label == 1].any() else float("nan")
        if len(np.unique(label[scored])) < 2:  # every fit degenerate (σ = 0): nothing to rank, as in the original
            nan = float("nan")
            return ULiRAResult(auc=nan, tpr_at_1_fpr=nan, tpr_at_5_fpr=nan, n_scored=int(scored.sum()),
                               n_unscored=int((~scored).sum()), n_positive=int((label[scored] == 1).sum()),
                               n_negative=int((label[scored] == 0).sum()), config=config, scores=p[scored],
                               labels=label[scored], membership=membership, mean_membership=mean)
        return _report(label[scored], p[scored], scored, config, membership=membership, mean_membership=mean)
    totals = stats.sum(axis=3)  # (label, moment, sample)
    loo = totals[:, :, sample] - stats[:, :, sample, split]  # (label, moment, obs): without the obs' split
    count, mean = loo[:, 0], loo[:, 1] / np.maximum(loo[:, 0], 1)
    scored = (count[0] > 0) & (count[1] > 0)
    if fix_variance:
        # pooled within-sample variance of each label (all splits; the pooled value is one number)
        var = []
        for lab in (0, 1):
            c, s1, s2 = totals[lab]
            has = c > 0
            var.append(max((s2[has] - s1[has] ** 2 / c[has]).sum() / max(c[has].sum() - has.sum(), 1), 1e-8))
        var = np.array(var)[:, None]
    else:
        var = np.maximum(loo[:, 2] / np.maximum(count, 1) - mean ** 2, 1e-8)
        scored &= (count[0] > 1) & (count[1] > 1)

    def log_normal(x, mu, v):
        return -0.5 * (np.log(2 * np.pi * v) + (x - mu) ** 2 / v)

    score = log_normal(phi, mean[1], var[1]) - log_normal(phi, mean[0], var[0])
    return _report(label[scored], score[scored], scored, config)


def _report(y_true: np.ndarray, y_score: np.ndarray, scored: np.ndarray, config: dict, **extra) -> ULiRAResult:
    """ROC AUC and TPR at 1 % / 5 % FPR over the scored observations."""
    from sklearn.metrics import roc_auc_score, roc_curve

    if len(np.unique(y_true)) < 2:
        raise ValueError("U-LiRA scored no observations of one of the classes; raise n_shadow, n_forget or "
                         "forget_fraction")
    fpr, tpr, _ = roc_curve(y_true, y_score)
    return ULiRAResult(auc=float(roc_auc_score(y_true, y_score)), tpr_at_1_fpr=_tpr_at(fpr, tpr, 0.01),
                       tpr_at_5_fpr=_tpr_at(fpr, tpr, 0.05), n_scored=int(scored.sum()),
                       n_unscored=int((~scored).sum()), n_positive=int((y_true == 1).sum()),
                       n_negative=int((y_true == 0).sum()), config=config, scores=y_score, labels=y_true, **extra)

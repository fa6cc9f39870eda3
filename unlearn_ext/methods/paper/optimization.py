"""Algorithm 3 of Gogineni & Nadimi: optimization-based unlearning, naive and layer-wise partial (docs/algorithms.md#optimization).

Gradient ascent on the forget loss: each step maximises an objective J on a forget batch (and, when the
objective uses one, a retain batch drawn from an endless pass over D_r) by SGD with ``maximize=True``,
for E epochs over D_f or until forget accuracy has fallen to a target (option).

Objectives (``objective=``; J is maximised; ℓ is the mean cross-entropy of a batch). Their names are not
the baseline methods' (``ga``, ``ng_plus`` are Deep Unlearn's methods, with that code's optimizer and
defaults: :mod:`unlearn_ext.methods.baselines.ascent`):

* ``"ascent"`` (default): J = ℓ(D_f) − β·ℓ(D_r), β = ``beta`` (0 by default: pure gradient ascent, no
  retain data needed).
* ``"regularised_ascent"``: NG+-style retain-regularised ascent, J = (1 − α)·ℓ(D_f) − α·ℓ(D_r),
  α = ``alpha`` (0.95, Deep Unlearn's weighting; without NG+'s proximal term).
* ``"kl_uniform"``: J = −KL(U ‖ p_θ(·|x)) on D_f − β·ℓ(D_r): pushes forget predictions toward the uniform
  distribution instead of away from the label.
* a callable ``f(out_f, y_f, out_r, y_r, hp) -> J`` (``out_r``/``y_r`` None unless a retain loader is
  given): a user-defined objective.

* ``optimization`` (naive): full SGD updates.
* ``partial_optimization`` (layer-wise partial): per parameter tensor only the kˡ = keep_count(nˡ, r)
  coordinates of largest |∇J| move — ``masked_sgd_(maximize=True)`` through
  :class:`~unlearn_ext.optim.PartialSGD`; the rest stay bitwise unchanged.

The model is in train mode throughout (BatchNorm statistics follow the batches, as in training).
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from ..base import Method, register_method
from ..common import STOP_HPARAMS, batches, cycle, device_of, forget_stop, make_sgd, run_epochs
from ..hparams import RATIO

Tensor = torch.Tensor


def neg_kl_to_uniform(logits: Tensor) -> Tensor:
    """−KL(U ‖ softmax(logits)) averaged over the batch; 0 exactly when the prediction is uniform."""
    k = logits.shape[1]
    return -(-math.log(k) - F.log_softmax(logits, 1).mean(1)).mean()


def _retain_term(weight: float, out_r, y_r) -> Tensor:
    return weight * F.cross_entropy(out_r, y_r) if out_r is not None and weight != 0 else 0.0


OBJECTIVES: Dict[str, Callable] = {
    "ascent": lambda out_f, y_f, out_r, y_r, hp: F.cross_entropy(out_f, y_f) - _retain_term(hp["beta"], out_r, y_r),
    "regularised_ascent": lambda out_f, y_f, out_r, y_r, hp: ((1 - hp["alpha"]) * F.cross_entropy(out_f, y_f)
                                                              - _retain_term(hp["alpha"], out_r, y_r)),
    "kl_uniform": lambda out_f, y_f, out_r, y_r, hp: neg_kl_to_uniform(out_f) - _retain_term(hp["beta"], out_r, y_r),
}


@register_method
class Optimization(Method):
    """Naive optimization-based unlearning (Algorithm 3 with full updates).

    Hyper-parameters: ``epochs`` E (5; the paper sweeps E and gives no single value); ``lr`` — the
    model's learning rate (1e-3; the experiment runner passes each model's); ``momentum`` (0) and
    ``weight_decay`` (0) of the SGD; ``objective`` ("ascent" | "regularised_ascent" | "kl_uniform" |
    callable, see the module docstring); ``beta`` (0) and ``alpha`` (0.95)
    weights of the retain loss; ``stop_forget_acc`` — None (run E epochs), a number, or
    ``"original_test"`` (the original model's accuracy on ``test_loader``) — stop once forget accuracy is
    at most it, checked before each epoch or, with ``stop_every_step=True``, before each step. ``retain``
    is needed when the objective uses it (regularised_ascent, or β ≠ 0).
    """

    name = "optimization"
    defaults = {"epochs": 5, "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "objective": "ascent", "beta": 0.0,
                "alpha": 0.95, **STOP_HPARAMS, "test_loader": None}
    uses_model_lr = True  # Algorithm 3 trains at the model's learning rate
    budget_in_forget_passes = True

    def _optimizer(self, model, hp):
        return make_sgd(model.parameters(), hp["lr"], hp["momentum"], hp["weight_decay"], maximize=True)

    def _run(self, model, forget, retain, store, hp):
        objective = hp["objective"]
        if not callable(objective) and objective not in OBJECTIVES:
            raise ValueError(f"{self.name}: objective must be one of {sorted(OBJECTIVES)} or a callable, "
                             f"got {objective!r}")
        fn = objective if callable(objective) else OBJECTIVES[objective]
        needs_retain = objective == "regularised_ascent" or (not callable(objective) and hp["beta"] != 0)
        if needs_retain and retain is None:
            raise ValueError(f"{self.name}: objective {objective!r} with beta={hp['beta']} needs retain=")
        # Only draw retain batches when the objective uses them (a callable gets them if retain is given).
        device = device_of(model)
        retain_batches = (batches(cycle(retain), device) if retain is not None and (needs_retain or callable(objective))
                          else None)
        stop = forget_stop(self.name, model, forget, hp)

        def step_objective(model, x, y, ids):
            out_r = y_r = None
            if retain_batches is not None:
                x_r, y_r, _ = next(retain_batches)
                out_r = model(x_r)
            return fn(model(x), y, out_r, y_r, hp)

        return run_epochs(model, forget, self._optimizer(model, hp), hp["epochs"], step_objective, stop,
                          stop_every_step=hp["stop_every_step"])


@register_method
class PartialOptimization(Optimization):
    """Layer-wise partial optimization-based unlearning (Algorithm 3): as :class:`Optimization`, but each
    step moves only ``keep_count(nˡ, keep_ratio)`` coordinates of every parameter tensor, chosen by
    ``selection`` ("magnitude" = M-max on |∇J|, default | "random" | "round_robin"). Extra
    hyper-parameters: ``keep_ratio`` r (0.1; the paper sweeps {0.01, 0.05, 0.1, 0.2, 0.5}),
    ``selection``; ``seed`` seeds the random selection."""

    name = "partial_optimization"
    defaults = {**Optimization.defaults, "keep_ratio": 0.1, "selection": "magnitude", "seed": 0}
    takes_run_keep_ratio = True
    ranges = {"keep_ratio": RATIO}

    def _optimizer(self, model, hp):
        return make_sgd(model.parameters(), hp["lr"], hp["momentum"], hp["weight_decay"], maximize=True,
                        keep_ratio=hp["keep_ratio"], selection=hp["selection"], seed=hp["seed"])

"""Ascent on the forget loss — Deep Unlearn's ``ga`` (``munl/unlearning/gradient_ascent.py``, after
Unlearn-Sparse's ``GA.py``) and ``ng_plus`` (``munl/unlearning/neggradplus.py``, after SCRUB's notebook), in
github.com/xcadet/deepunlearn. Defaults are that code's ``ORIGINAL_*`` values; batch sizes are those of the
loaders passed (Deep Unlearn: 256).

Both have a strength knob (epochs): ``stop_forget_acc`` / ``stop_every_step`` (:data:`.common.STOP_HPARAMS`,
default off — the original behaviour) stop once forget accuracy has fallen to a target; the stats then
report ``forget_acc``, ``target_forget_acc``, ``steps``, ``stopped_early`` (:func:`.common.run_epochs`).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from ..base import Method, register_method
from ..common import (STOP_HPARAMS, batches, cross_entropy, device_of, forget_stop, make_sgd, run_epochs,
                      squared_distance)
from ..hparams import UNIT


@register_method
class GradientAscent(Method):
    """GA: SGD (momentum 0.9, weight decay 5e-4, lr 0.01) on −ℓ(D_f) for ``epochs`` (10) passes over D_f,
    model in train mode — the original's ``loss = -criterion(...)``; ``maximize=True`` is the same step
    (torch negates the gradient before adding weight decay)."""

    name = "ga"
    defaults = {"epochs": 10, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, **STOP_HPARAMS}
    budget_in_forget_passes = True

    def _run(self, model, forget, retain, store, hp):
        stop = forget_stop(self.name, model, forget, hp)
        opt = make_sgd(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                       weight_decay=hp["weight_decay"], maximize=True)
        return run_epochs(model, forget, opt, hp["epochs"], cross_entropy, stop,
                          stop_every_step=hp["stop_every_step"])


@register_method
class NegGradPlus(Method):
    """NG+: minimise α[ℓ(D_r) + (wd/2)‖θ−θ₀‖²] − (1−α)ℓ(D_f), α = 0.95, SGD (lr 0.01, momentum 0.9, no
    weight decay in the optimizer), ``epochs`` (10).

    One epoch = one pass over D_r, each retain batch paired with the next batch of a fresh
    ``itertools.cycle`` over D_f (the original's ``zip(retain_loader, cycle(forget_loader))``). The model
    stays in eval mode, as in that code: BatchNorm running statistics are frozen and dropout is off.
    ``weight_decay`` is the coefficient of the proximal term (0 in the original's defaults).
    """

    name = "ng_plus"
    needs_retain = True
    defaults = {"epochs": 10, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "alpha": 0.95, **STOP_HPARAMS}
    ranges = {"alpha": UNIT}

    def _run(self, model, forget, retain, store, hp):
        stop = forget_stop(self.name, model, forget, hp)
        device = device_of(model)
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])
        alpha, wd = hp["alpha"], hp["weight_decay"]
        forget_batches = None

        def new_cycle(epoch):
            nonlocal forget_batches
            forget_batches = itertools.cycle(batches(forget, device))

        def objective(m, xr, yr, ids):
            xf, yf, _ = next(forget_batches)
            retain_loss = F.cross_entropy(m(xr), yr) + wd / 2 * squared_distance(params, start)
            return alpha * retain_loss - (1 - alpha) * F.cross_entropy(m(xf), yf)

        return run_epochs(model, retain, opt, hp["epochs"], objective, stop, stop_every_step=hp["stop_every_step"],
                          on_epoch=new_cycle, train_mode=False)

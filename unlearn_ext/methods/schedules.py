"""Learning-rate schedules of the baselines, as functions of the 0-based epoch (or iteration) index, in the
closed form of the original code's schedulers. :func:`.common.run_epochs` applies one per epoch through its
``on_epoch`` hook with :func:`.common.set_lr`."""
from __future__ import annotations

import math
from typing import Callable

Schedule = Callable[[int], float]


def step_decay(base_lr: float, epochs: int, rate: float) -> Schedule:
    """LR × rate^(number of milestones ⌊.5E⌋, ⌊.8E⌋, ⌊.9E⌋ below the epoch) — repdistiller's
    ``adjust_learning_rate`` (SCRUB, CF-k, EU-k)."""
    milestones = [int(epochs * 0.5), int(epochs * 0.8), int(epochs * 0.9)]
    return lambda epoch: base_lr * rate ** sum(epoch > m for m in milestones)


def triangular(base_lr: float, epochs: int) -> Schedule:
    """MSG's per-epoch LR (Deep Unlearn's ``LinearAnnealingLR`` with E+1 total and ⌊(E+1)/2⌋ warm-up steps):
    epoch e uses base·t/a for t = e+1 ≤ a, else base·(E+1−t)/(E+1−a)."""
    a, total = (epochs + 1) // 2, epochs + 1
    return lambda e: base_lr * ((e + 1) / a if e + 1 <= a else (total - e - 1) / (total - a))


def cosine(base: float, total: int) -> Schedule:
    """base·(1 + cos(πt/T))/2 — ``CosineAnnealingLR`` with T_max = T and no minimum (CT per epoch, SFR-on
    per iteration for both its LR and its forget weight)."""
    return lambda t: base * (1 + math.cos(math.pi * t / total)) / 2

"""The guard on amnesiac undo's regime: how much of the training a request log may undo.

Amnesiac undo subtracts recorded updates without retraining; the further the undone steps reach, the more
the model loses. ``benchmarks/results/amnesiac_regime.md`` measured it (full Fashion-MNIST, 8 epochs at batch
128, LeNet and the MLP, 3 seeds; forget sets undoing 1.3, 4.2, 11.9, 34.8 and 72.3 % of the steps). For
each keep ratio, :data:`REGIME_LIMITS` holds the largest measured fraction of steps undone up to which the
seed-mean test accuracy stayed at most 2 points below Retrain's **for both models** (the stricter of the
two; ``python_tests/test_deletion_guard.py`` recomputes it from the committed JSON). 0.0 means no measured
fraction was within: every request that undoes a step is refused unless the caller raises the limit.

A keep ratio between two measured ones takes the limit of the next larger one (a larger r removes more of
each update and measured a smaller regime); a dense recording (``keep_ratio=None``) is naive amnesiac
without its fine-tune.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

#: keep ratio (None: dense) → largest fraction of recorded steps that may be undone (module docstring).
REGIME_LIMITS: Dict[Optional[float], float] = {
    0.01: 0.11922530206112296,  # MLP within up to 11.9 % (LeNet: every fraction, 72.3 %)
    0.05: 0.04175550817341862,  # both within up to 4.2 %
    0.1: 0.01279317697228145,  # MLP within up to 1.3 % (LeNet: 4.2 %)
    0.2: 0.01279317697228145,  # both within up to 1.3 %
    0.5: 0.0,  # LeNet outside already at 1.3 %
    None: 0.0,  # naive amnesiac without fine-tune: LeNet outside already at 1.3 %
}
SOURCE = "benchmarks/results/amnesiac_regime.md"


class RegimeExceeded(ValueError):
    """A request would take the fraction of recorded steps undone past the guard's limit. Nothing was
    written; the message names the fraction, the limit and what to do instead."""

    def __init__(self, message: str, fraction: float, limit: float) -> None:
        super().__init__(message)
        self.fraction = fraction
        self.limit = limit


def _row(keep_ratio: Optional[float]) -> Optional[float]:
    """The measured keep ratio whose limit applies to ``keep_ratio`` (None: the dense row)."""
    if keep_ratio is None:
        return None
    larger = [r for r in REGIME_LIMITS if r is not None and r >= keep_ratio - 1e-12]
    return min(larger) if larger else None


def default_limit(keep_ratio: Optional[float]) -> float:
    """The guard's limit for a recording at ``keep_ratio`` (module docstring)."""
    return REGIME_LIMITS[_row(keep_ratio)]


def limit_source(keep_ratio: Optional[float]) -> str:
    """Which measured row the default limit of ``keep_ratio`` comes from, for messages and receipts."""
    row = _row(keep_ratio)
    return f"{SOURCE}, " + ("amnesiac without fine-tune" if row is None else f"partial_amnesiac r={row:g}")


def check_limit(name: str, value) -> float:
    """``value`` as a fraction in [0, 1], else ``ValueError`` naming ``name``."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if isinstance(value, bool) or not (0.0 <= f <= 1.0):
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return f


__all__ = ["REGIME_LIMITS", "RegimeExceeded", "check_limit", "default_limit", "limit_source"]

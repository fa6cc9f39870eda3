"""Checks of hyper-parameter values, shared by every method: a bad value is a ``ValueError`` naming the method
and the hyper-parameter, raised before the model is touched.

:func:`check_all` checks every hyper-parameter whose documented default is a number or a bool against the
type of that default — an ``int`` default takes only integers (``epochs=1.5`` or ``"2"`` are refused), a
``float`` default any finite real, a ``bool`` default only ``True``/``False`` — and against its
:class:`Range` (integers default to ``>= 0``; ``lr``, ``momentum`` and ``weight_decay`` are ``>= 0``
everywhere). Values come back as plain Python numbers (numpy scalars included), so the ops see ``float``.
Hyper-parameters whose default is ``None``, a string or an object are the method's own to check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Dict, Mapping, Optional


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (an open end excludes the bound; None: unbounded); ``none_ok``: None is
    accepted too (e.g. certified's ``sigma=None``, "derive it")."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    none_ok: bool = False

    def contains(self, v: float) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or (v < self.high if self.high_open else v <= self.high)

    def __str__(self) -> str:
        lo = "" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        hi = "" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}" if hi else "finite"


NONNEGATIVE = Range(0.0)
POSITIVE = Range(0.0, low_open=True)
AT_LEAST_ONE = Range(1)
RATIO = Range(0.0, 1.0, low_open=True)  # a keep ratio / fraction, as docs/algorithms.md#the-selection-rule
UNIT = Range(0.0, 1.0)
COMMON: Dict[str, Range] = {"lr": NONNEGATIVE, "momentum": NONNEGATIVE, "weight_decay": NONNEGATIVE}


def integer(method: str, name: str, value, rng: Range = NONNEGATIVE) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{method}: {name} must be an integer {rng}, got {value!r} ({type(value).__name__})")
    if not rng.contains(int(value)):
        raise ValueError(f"{method}: {name} must be an integer {rng}, got {value}")
    return int(value)


def real(method: str, name: str, value, rng: Optional[Range] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{method}: {name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v) or (rng is not None and not rng.contains(v)):
        raise ValueError(f"{method}: {name} must be a finite number{'' if rng is None else ' ' + str(rng)}, "
                         f"got {value!r}")
    return v


def check_all(method: str, hp: dict, defaults: Mapping, ranges: Mapping[str, Range]) -> dict:
    """``hp`` with every number- or bool-defaulted value checked and made a plain ``int``/``float``/``bool``."""
    out = dict(hp)
    for name, default in defaults.items():
        value = hp[name]
        rng = ranges.get(name, COMMON.get(name))
        if value is None and rng is not None and rng.none_ok:
            continue
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f"{method}: {name} must be True or False, got {value!r}")
        elif isinstance(default, Integral):
            out[name] = integer(method, name, value, rng or NONNEGATIVE)
        elif isinstance(default, Real):
            out[name] = real(method, name, value, rng)
        elif name in ranges and value is not None:  # a None default that also takes a number (e.g. sigma)
            out[name] = real(method, name, value, rng)
    return out

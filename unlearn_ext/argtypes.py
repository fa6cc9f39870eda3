"""Argument types shared by the command lines (``type=`` of ``argparse``): each refuses a bad value with
``ArgumentTypeError`` saying what it expected, which argparse prints as one error line naming the option."""
from __future__ import annotations

import argparse
import math

#: Seeds are integers in [0, SEED_LIMIT): the membership attacks' folds (scikit-learn's
#: ``StratifiedKFold(random_state=seed)``, numpy's legacy generator) accept no other.
SEED_LIMIT = 2**32


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def size(text: str) -> int:
    """A subsample size: 0 (all of it) or at least 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 (0: all of it), got {text!r}") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"expected 0 (all of it) or an integer >= 2, got {value}")
    return value


def unit_interval(open_right: bool):
    """A number in (0, 1) or (0, 1]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (0.0 < value < 1.0 if open_right else 0.0 < value <= 1.0):
            raise argparse.ArgumentTypeError(f"expected a number in (0, 1{')' if open_right else ']'}, got {text!r}")
        return value
    return parse


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected integers in [0, 2**32), got {text.strip()!r}")
    return value


__all__ = ["SEED_LIMIT", "fraction", "positive_float", "positive_int", "seed", "size", "unit_interval"]

"""Checks every reader applies to what it read from a user's file, so that bad content is a ValueError naming
the file — never a crash further on, a message without the file, or labels silently truncated to integers."""
from __future__ import annotations

import numpy as np


def int_labels(where: str, values, low: int, high: int) -> np.ndarray:
    """``values`` (an array or list of shape (N,) or (N, 1)) as int64 labels in ``low..high``.

    Whole-number floats are accepted (MATLAB stores labels as doubles); NaN, fractions, strings, booleans
    and objects are refused. ``where`` names the file (and the array in it) in every message.
    """
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError) as e:  # ragged nested lists
        raise ValueError(f"{where}: labels are not a flat array of numbers ({e})") from None
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{where}: labels have shape {arr.shape}, expected (N,) or (N, 1)")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: labels must be whole numbers, found {arr[at]} at position {at}")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels must be integers, found {arr.dtype} values")
    if arr.size and (arr.min() < low or arr.max() > high):
        raise ValueError(f"{where}: labels must be in {low}..{high}, found {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def same_count(where: str, n_images: int, n_labels: int) -> None:
    """As many labels as images, and at least one of each."""
    if n_images != n_labels:
        raise ValueError(f"{where}: {n_images} images but {n_labels} labels")
    if n_images == 0:
        raise ValueError(f"{where}: no samples")

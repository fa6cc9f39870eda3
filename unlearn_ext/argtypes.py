"""Argument types and file checks shared by the command lines.

The types (``type=`` of ``argparse``) refuse a bad value with ``ArgumentTypeError`` saying what they expected,
which argparse prints as one error line naming the option. The file checks (:func:`input_file`,
:func:`new_file`, :func:`output_file`) run before any work and raise ``ValueError`` naming the option: a
path that is empty, a folder, missing, unwritable (tried by creating and removing a file there: permission
bits say nothing to root), or — for an output — one of the command's own inputs.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Dict, Iterable, Tuple

#: Seeds are integers in [0, SEED_LIMIT): the membership attacks' folds (scikit-learn's
#: ``StratifiedKFold(random_state=seed)``, numpy's legacy generator) accept no other.
SEED_LIMIT = 2**32


def _as_float(text: str) -> float:
    """``text`` as a float; NaN (which no range holds) when it is none."""
    try:
        return float(text)
    except ValueError:
        return math.nan


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
        value = _as_float(text)
        if not (0.0 < value < 1.0 if open_right else 0.0 < value <= 1.0):
            raise argparse.ArgumentTypeError(f"expected a number in (0, 1{')' if open_right else ']'}, got {text!r}")
        return value
    return parse


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _as_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _as_float(text)
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


def _named(flag: str, path: str) -> str:
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError(f"{flag}: expected a file path, got {path!r}")
    return os.path.abspath(path)


def input_file(flag: str, path: str) -> str:
    """``path`` is an existing regular file; its absolute path."""
    full = _named(flag, path)
    if not os.path.exists(full):
        raise ValueError(f"{flag}: {path} does not exist")
    if not os.path.isfile(full):
        raise ValueError(f"{flag}: {path} is not a file")
    return full


def writable_folder(flag: str, path: str) -> None:
    """The folder of ``path`` exists and takes a new file (tried: a file created there and removed)."""
    folder = os.path.dirname(_named(flag, path))
    if not os.path.isdir(folder):
        raise ValueError(f"{flag}: cannot write {path}: its folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".unlearn-ext-probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag}: cannot write {path} in {folder} ({e.strerror})") from None


def new_file(flag: str, path: str) -> str:
    """``path`` names nothing yet (not even a dangling link) in a writable folder; its absolute path."""
    full = _named(flag, path)
    if os.path.lexists(full):
        raise ValueError(f"{flag}: {path} exists; it is never overwritten: remove it or choose another path")
    writable_folder(flag, path)
    return full


def output_file(flag: str, path: str, inputs: Iterable[Tuple[str, str]], replaceable: bytes) -> str:
    """``path`` may be written: not a folder, none of ``inputs`` (``(flag, path)`` pairs of the command), and
    when it exists a file starting with ``replaceable`` (an output of this kind, which is replaced); in a
    writable folder. Its absolute path."""
    full = _named(flag, path)
    real = os.path.realpath(full)
    for other_flag, other in inputs:
        if os.path.realpath(other) == real:
            raise ValueError(f"{flag}: {path} is the {other_flag} of this command; write the output elsewhere")
    if os.path.isdir(full):
        raise ValueError(f"{flag}: {path} is a folder")
    if os.path.lexists(full):
        with open(full, "rb") as f:
            if f.read(len(replaceable)) != replaceable:
                raise ValueError(f"{flag}: {path} exists and is not an output of this kind; it is never replaced")
    writable_folder(flag, path)
    return full


def distinct(paths: Dict[str, str]) -> None:
    """No two of the ``{flag: path}`` name the same file."""
    seen: Dict[str, str] = {}
    for flag, path in paths.items():
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{flag} and {seen[real]} name the same file {path}")
        seen[real] = flag


__all__ = ["SEED_LIMIT", "distinct", "fraction", "input_file", "new_file", "output_file", "positive_float",
           "positive_int", "seed", "size", "unit_interval", "writable_folder"]

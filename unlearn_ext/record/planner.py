"""How many bytes a recording will take, known before training: :func:`plan_storage` (issue 18).

The bytes of a recorded step come from the store's own accounting, not from a formula that could drift
from it: a store counts a record as :func:`~.disk_format.record_overhead` of its ids and layers plus
:func:`~.encoding.nbytes_by_kind` of the kinds and counts its encoder chose, and the file beside its
records as :func:`~.disk_format.file_overhead` of the manifest (a closed DiskStore file has exactly
:meth:`~.store.UpdateStore.nbytes` bytes). The plan applies these functions to a representative update —
every trainable entry changed, dense or as its layer-wise top-k at the keep ratio — whose encoding is
known from its counts alone: each layer keeps all its entries (dense) or :func:`~unlearn_ext.ops.keep_count`
of them (what :func:`~unlearn_ext.ops.layerwise_topk` selects), none of them zero, so the encoder picks
:func:`~.encoding.choose_kind` of that count. Nothing the size of a layer or of a batch is allocated: a
model on the meta device, larger than memory, with a batch of billions of samples, plans in milliseconds.
Real updates sometimes leave entries exactly unchanged (a dead ReLU unit, an unused embedding row); the
store drops those where that is smaller, so the plan is an upper bound, met exactly when every entry
moves (or only a few per layer do not).

What no recording could hold or use is refused (``ValueError``) as the recorder would refuse it: the
manifest of :meth:`~.identity.Manifest.from_model` (a parameter dtype the ops cannot apply updates to, a
layer of 2**31 elements or more), and batches or step counts beyond the record format (a record stores
its id count as uint32 and its step as int64).

Only-ids recording (``UpdateRecorder(only_ids=...)``: only batches holding a deletable sample are
recorded): with a fraction f of the samples deletable, each recorded step costs the same, and a batch of
B samples drawn at random holds a deletable one with probability 1 − (1 − f)^B, the expected fraction of
steps recorded. (At f = 1% and B = 128 that is 72%: only-ids saves little unless f·B is small.)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from ..ops import checks, keep_count
from .disk_format import file_overhead, record_overhead
from .encoding import choose_kind, nbytes_by_kind
from .identity import Manifest
from .validation import MAX_IDS_PER_STEP, MAX_STEPS

MAX_BATCH_SIZE = MAX_IDS_PER_STEP


@dataclass(frozen=True)
class PlanRow:
    """One way of recording: the bytes of one recorded step, how many steps are recorded (expected, for
    only-ids) and the closed store file's total bytes."""

    recording: str
    bytes_per_step: int
    recorded_steps: int
    total_bytes: int


@dataclass(frozen=True)
class StoragePlan:
    steps: int
    batch_size: int
    value_dtype: str
    params: int  # trainable entries
    dense_update_nbytes: int  # one dense update in the layers' own dtypes
    rows: Tuple[PlanRow, ...]

    def row(self, recording: str) -> PlanRow:
        for r in self.rows:
            if r.recording == recording:
                return r
        raise ValueError(f"recording must be one of {[r.recording for r in self.rows]}, got {recording!r}")

    def table(self, free_bytes: Optional[int] = None, where: str = ".") -> str:
        """The plan as text; with ``free_bytes`` (of the disk at ``where``) whether each store fits."""
        lines = [f"{self.params:,} trainable entries, {self.steps:,} steps of {self.batch_size} samples, values in "
                 f"{self.value_dtype}; one dense update in the layers' dtypes: {_size(self.dense_update_nbytes)}", "",
                 f"{'recording':<30} {'bytes/recorded step':>22} {'recorded steps':>15} {'total bytes':>18}"
                 + ("  fits" if free_bytes is not None else "")]
        for r in self.rows:
            fits = ("  yes" if r.total_bytes <= free_bytes else "  NO") if free_bytes is not None else ""
            lines.append(f"{r.recording:<30} {r.bytes_per_step:>22,} {r.recorded_steps:>15,} {r.total_bytes:>18,}"
                         f"  ({_size(r.total_bytes)}){fits}")
        if free_bytes is not None:
            lines += ["", f"free space at {where}: {free_bytes:,} bytes ({_size(free_bytes)})"]
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _count(name: str, value, most: int, most_text: str, why: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or not 1 <= number <= most:
        raise ValueError(f"{name} must be an integer >= 1 and <= {most_text} ({why}), got {value!r}")
    return number


def plan_arguments(steps, batch_size, keep_ratio=None,
                   only_fraction=None) -> Tuple[int, int, Optional[float], Optional[float]]:
    """The numbers of :func:`plan_storage`, checked before any model is looked at: ``ValueError`` naming
    the first one that is malformed or beyond what a recording can hold."""
    steps = _count("steps", steps, MAX_STEPS, "2**63", "a record stores its step as int64")
    batch_size = _count("batch_size", batch_size, MAX_BATCH_SIZE, str(MAX_BATCH_SIZE),
                        "a record stores its number of sample ids as uint32")
    if keep_ratio is not None:
        keep_ratio = checks.ratio("keep_ratio", keep_ratio)
    if only_fraction is not None:
        only_fraction = checks.ratio("only_fraction", only_fraction)
    return steps, batch_size, keep_ratio, only_fraction


def record_nbytes(model: nn.Module, batch_size: int, keep_ratio: Optional[float],
                  value_dtype: torch.dtype) -> Tuple[int, int]:
    """``(bytes of one recorded step, bytes of the file beside its records)`` of a recording of ``model``:
    the store's accounting of a representative update (module docstring). ``model`` may be on the meta
    device: only its parameters' names, shapes and dtypes are read."""
    manifest = Manifest.from_model(model, keep_ratio, value_dtype)
    numels = manifest.numels
    counts = numels if keep_ratio is None else [keep_count(n, keep_ratio) for n in numels]
    kinds = [choose_kind(k, n) for k, n in zip(counts, numels)]
    payload = nbytes_by_kind(kinds, counts, numels, manifest.torch_value_dtype.itemsize)
    return record_overhead(batch_size, len(numels)) + sum(payload.values()), file_overhead(manifest)


def plan_storage(model: nn.Module, steps: int, batch_size: int, keep_ratio: Optional[float] = None,
                 value_dtype: torch.dtype = torch.float32, only_fraction: Optional[float] = None) -> StoragePlan:
    """The bytes of recording ``steps`` optimizer steps of ``batch_size`` samples of ``model``: dense, and
    partial at ``keep_ratio`` when given; each also with only-ids recording when ``only_fraction`` (the
    fraction of samples declared deletable) is given. Bad arguments raise ``ValueError`` naming them."""
    steps, batch_size, keep_ratio, only_fraction = plan_arguments(steps, batch_size, keep_ratio, only_fraction)
    manifest = Manifest.from_model(model, keep_ratio, value_dtype)
    ways: List[Tuple[str, Optional[float]]] = [("dense", None)]
    if keep_ratio is not None:
        ways.append((f"partial r={keep_ratio:g}", keep_ratio))
    rows = []
    for label, ratio in ways:
        per_step, overhead = record_nbytes(model, batch_size, ratio, value_dtype)
        rows.append(PlanRow(label, per_step, steps, overhead + steps * per_step))
    if only_fraction is not None:
        # min: the float product rounds up to 2**63 near the largest step counts
        recorded = min(steps, round(steps * (1.0 - (1.0 - only_fraction) ** batch_size)))
        rows += [PlanRow(f"{r.recording}, only ids f={only_fraction:g}", r.bytes_per_step, recorded,
                         r.total_bytes - (steps - recorded) * r.bytes_per_step) for r in list(rows)]
    return StoragePlan(steps, batch_size, manifest.value_dtype, sum(manifest.numels), manifest.dense_nbytes(),
                       tuple(rows))


__all__ = ["MAX_BATCH_SIZE", "MAX_STEPS", "PlanRow", "StoragePlan", "plan_arguments", "plan_storage", "record_nbytes"]

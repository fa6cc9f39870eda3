"""How many bytes a recording will take, known before training: :func:`plan_storage` (issue 18).

The bytes of a recorded step come from the store itself, not from a formula that could drift from it:
a representative update of the model — every trainable entry changed — is appended, dense or as its
layer-wise top-k at the keep ratio, to a :class:`~.store.MemoryStore` bound to the model's manifest, with
the ids of one batch. The store's byte accounting is that of the on-disk format (a closed DiskStore file
has exactly :meth:`~.store.UpdateStore.nbytes` bytes), so it gives one record's bytes and the file's own
(header, manifest, trailer). Real updates sometimes leave entries exactly unchanged (a dead ReLU unit, an
unused embedding row); the store drops those where that is smaller, so the plan is an upper bound, met
exactly when every entry moves (or only a few per layer do not).

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

from .. import ops
from ..ops import checks
from .identity import Manifest
from .store import MemoryStore


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


def _count(name: str, value) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = 0
    if isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


def record_nbytes(model: nn.Module, batch_size: int, keep_ratio: Optional[float],
                  value_dtype: torch.dtype) -> Tuple[int, int]:
    """``(bytes of one recorded step, bytes of the file beside its records)`` of a recording of ``model``,
    measured by the store on a representative update (module docstring). ``model`` may be on the meta
    device: only its parameters' names, shapes and dtypes are read."""
    manifest = Manifest.from_model(model, keep_ratio, value_dtype)
    layers = [torch.ones(shape, dtype=getattr(torch, dtype)) for shape, dtype in zip(manifest.shapes, manifest.dtypes)]
    if keep_ratio is None:
        values, indices = torch.cat([t.reshape(-1) for t in layers]), None
        offsets = torch.tensor([0] + manifest.numels, dtype=torch.int64).cumsum(0)
    else:
        values, indices, offsets = ops.layerwise_topk(layers, keep_ratio)
    store = MemoryStore()
    store.bind(manifest)
    store.append(0, torch.arange(batch_size), values, indices, offsets, validate=False)
    (per_step,) = store.record_nbytes()
    return per_step, store.nbytes() - per_step


def plan_storage(model: nn.Module, steps: int, batch_size: int, keep_ratio: Optional[float] = None,
                 value_dtype: torch.dtype = torch.float32, only_fraction: Optional[float] = None) -> StoragePlan:
    """The bytes of recording ``steps`` optimizer steps of ``batch_size`` samples of ``model``: dense, and
    partial at ``keep_ratio`` when given; each also with only-ids recording when ``only_fraction`` (the
    fraction of samples declared deletable) is given. Bad arguments raise ``ValueError`` naming them."""
    steps, batch_size = _count("steps", steps), _count("batch_size", batch_size)
    if keep_ratio is not None:
        keep_ratio = checks.ratio("keep_ratio", keep_ratio)
    if only_fraction is not None:
        only_fraction = checks.ratio("only_fraction", only_fraction)
    manifest = Manifest.from_model(model, keep_ratio, value_dtype)
    ways: List[Tuple[str, Optional[float]]] = [("dense", None)]
    if keep_ratio is not None:
        ways.append((f"partial r={keep_ratio:g}", keep_ratio))
    rows = []
    for label, ratio in ways:
        per_step, overhead = record_nbytes(model, batch_size, ratio, value_dtype)
        rows.append(PlanRow(label, per_step, steps, overhead + steps * per_step))
    if only_fraction is not None:
        recorded = round(steps * (1.0 - (1.0 - only_fraction) ** batch_size))
        rows += [PlanRow(f"{r.recording}, only ids f={only_fraction:g}", r.bytes_per_step, recorded,
                         r.total_bytes - (steps - recorded) * r.bytes_per_step) for r in list(rows)]
    return StoragePlan(steps, batch_size, manifest.value_dtype, sum(manifest.numels), manifest.dense_nbytes(),
                       tuple(rows))


__all__ = ["PlanRow", "StoragePlan", "plan_storage", "record_nbytes"]

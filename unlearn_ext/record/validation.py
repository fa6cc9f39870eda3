"""Checks of what a store is given to append: the step, the batch's sample ids and the update.

Every failure is a ``ValueError`` naming the argument, raised before anything is stored. The checks a
sparse update shares with :func:`unlearn_ext.ops.sparse_accumulate_` (offsets from 0 to the number of
values, never decreasing; every index inside its layer) are :func:`unlearn_ext.ops.checks.segments`;
a store also needs one update of exactly its L layers and indices ascending within each layer (the
encodings assume it).
"""
from __future__ import annotations

import operator
from typing import Optional, Sequence, Tuple

import torch

from ..ops import checks

MAX_STEPS = 2**63  # steps 0 .. 2**63 - 1: a record stores its step as int64
MAX_IDS_PER_STEP = 2**32 - 1  # a record stores its number of sample ids as uint32

Tensor = torch.Tensor


def as_id_tensor(sample_ids, what: str = "sample_ids") -> Tensor:
    """``sample_ids`` (a tensor, array, sequence or int of integer ids) as a flat int64 CPU tensor.
    Floating, boolean or complex ids raise ``ValueError`` (a float id would be truncated silently)."""
    if isinstance(sample_ids, Tensor):
        t = sample_ids.detach()
    else:
        try:
            t = torch.as_tensor(sample_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} must be integer sample ids, got {type(sample_ids).__name__} ({e})") from None
        if t.numel() == 0:
            t = t.to(torch.int64)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what} must have an integer dtype, got {t.dtype}")
    return t.to("cpu", torch.int64).reshape(-1)


def as_step(step) -> int:
    """``step`` as a non-negative Python int (an int, a numpy integer or a one-element integer tensor)."""
    if isinstance(step, bool) or (isinstance(step, Tensor) and (step.numel() != 1 or step.is_floating_point())):
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    try:
        step = operator.index(step.item() if isinstance(step, Tensor) else step)
    except TypeError:
        raise ValueError(f"step must be a non-negative integer, got {step!r}") from None
    if not 0 <= step < MAX_STEPS:
        raise ValueError(f"step must be an integer in [0, 2**63) (a record stores it as int64), got {step}")
    return step


def check_update(numels: Sequence[int], values: Tensor, indices: Optional[Tensor],
                 offsets: Tensor) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Validate an update of ``len(numels)`` layers in the format of :func:`unlearn_ext.ops.layerwise_topk`
    (or ``indices=None``: dense) and return it with int32 indices and int64 offsets; ``ValueError``
    naming the first problem otherwise. Finiteness is checked by the store after encoding, where one
    pass also catches values that overflow its value dtype."""
    L = len(numels)
    for name, t in (("values", values), ("offsets", offsets)) + ((("indices", indices),) if indices is not None
                                                                  else ()):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != values.device:
            raise ValueError(f"{name} is on {t.device} but values is on {values.device}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offsets must be int64, got {offsets.dtype}")
    if offsets.numel() != L + 1:
        raise ValueError(f"offsets has {offsets.numel()} entries; the manifest has {L} layers (expected {L + 1})")
    offsets = offsets.to(torch.int64)
    if indices is None:
        sizes = torch.tensor([0] + list(numels), dtype=torch.int64, device=values.device).cumsum(0)
        if values.numel() != int(sizes[-1]) or not torch.equal(offsets, sizes):
            raise ValueError("a dense update (indices=None) must hold every element of every layer: "
                             f"offsets {offsets.tolist()} do not match the layer sizes {list(numels)}")
    else:
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be int32, got {indices.dtype}")
        if indices.numel() != values.numel():
            raise ValueError(f"values has {values.numel()} entries but indices has {indices.numel()}")
        layers = [torch.empty(n, device="meta") for n in numels]  # segments() reads only their sizes
        checks.segments("append", layers, values, indices, offsets)
        if indices.numel():
            seg = torch.repeat_interleave(torch.arange(L, device=values.device), offsets.diff(),
                                          output_size=indices.numel())
            idx = indices.to(torch.int64)
            if bool(((idx[1:] <= idx[:-1]) & (seg[1:] == seg[:-1])).any()):
                raise ValueError("indices must be strictly ascending within each layer")
        indices = indices.to(torch.int32)
    return values, indices, offsets


__all__ = ["as_id_tensor", "as_step", "check_update"]

"""Argument checks shared by both back-ends of every op (metadata only; the data checks — NaN/Inf in a
selected-from tensor, offsets and index ranges, written tensors that share memory — are made by the
back-end that reads the data, before it writes anything). Every failure is a ``ValueError`` that names the argument."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NUMEL = 2**31 - 1  # indices are int32


def ratio(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a float in (0, 1], got {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def finite(name: str, value: float, low: Optional[float] = None) -> float:
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        bound = "" if low is None else f" and >= {low}"
        raise ValueError(f"{name} must be finite{bound}, got {value}")
    return value


def tensor_list(name: str, xs, *, dtypes=FLOAT_DTYPES, same_dtype: bool = True,
                must_be_contiguous: bool = False) -> List[Tensor]:
    """A list of tensors on one device (of one dtype if ``same_dtype``); read-only inputs that are not
    contiguous are copied to contiguous memory, in-place ones (``must_be_contiguous``) are refused."""
    if isinstance(xs, Tensor) or not isinstance(xs, (list, tuple)):
        raise ValueError(f"{name} must be a list of tensors, got {type(xs).__name__}")
    out = []
    for i, x in enumerate(xs):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
        if x.dtype not in dtypes:
            raise ValueError(f"{name}[{i}] has dtype {x.dtype}; supported: {', '.join(map(str, dtypes))}")
        if x.numel() > MAX_NUMEL:
            raise ValueError(f"{name}[{i}] has {x.numel()} elements; at most 2**31 - 1 are supported "
                             "(indices are int32)")
        if out and x.device != out[0].device:
            raise ValueError(f"{name}[{i}] is on {x.device} but {name}[0] is on {out[0].device}")
        if same_dtype and out and x.dtype != out[0].dtype:
            raise ValueError(f"{name}[{i}] has dtype {x.dtype} but {name}[0] has {out[0].dtype}")
        if not x.is_contiguous():
            if must_be_contiguous:
                raise ValueError(f"{name}[{i}] is not contiguous; it is written in place, so pass a "
                                 "contiguous tensor")
            x = x.contiguous()
        out.append(x)
    return out


def matching(name: str, xs: Sequence[Tensor], ref_name: str, refs: Sequence[Tensor], *,
             same_dtype: bool = True) -> None:
    """``xs`` pairs up with ``refs``: same length, shapes, device (and dtype)."""
    if len(xs) != len(refs):
        raise ValueError(f"{name} has {len(xs)} tensors but {ref_name} has {len(refs)}")
    for i, (x, r) in enumerate(zip(xs, refs)):
        if x.shape != r.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(x.shape)} but {ref_name}[{i}] has {tuple(r.shape)}")
        if x.device != r.device:
            raise ValueError(f"{name}[{i}] is on {x.device} but {ref_name}[{i}] is on {r.device}")
        if same_dtype and x.dtype != r.dtype:
            raise ValueError(f"{name}[{i}] has dtype {x.dtype} but {ref_name}[{i}] has {r.dtype}")


def all_finite(op: str, name: str, xs: Sequence[Tensor]) -> None:
    for i, x in enumerate(xs):
        if x.numel() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{op}: {name}[{i}] contains NaN or Inf; cannot select from it")


def disjoint(op: str, lists: Dict[str, Sequence[Tensor]]) -> None:
    """No two tensors written in place share memory (one tensor twice, or overlapping views of a storage):
    the op would read values it has already changed. The tensors are contiguous and on one device."""
    listed = [(name, i, x) for name, xs in lists.items() for i, x in enumerate(xs)
              if x.numel() and x.device.type != "meta"]
    # (begin, end, position in the argument order): equal starts keep that order, as in csrc/checks.h.
    spans = sorted((x.data_ptr(), k, x.data_ptr() + x.numel() * x.element_size())
                   for k, (_, _, x) in enumerate(listed))
    far = None  # the span reaching furthest so far, in address order
    for begin, k, end in spans:
        if far is not None and begin < far[2]:
            (a, i, _), (b, j, _) = listed[far[1]], listed[k]
            raise ValueError(f"{op}: {a}[{i}] and {b}[{j}] share memory (the same tensor twice or overlapping "
                             "views); tensors written in place must not overlap")
        if far is None or end > far[2]:
            far = (begin, k, end)


def segments(op: str, dense: Sequence[Tensor], values: Tensor, indices: Tensor, offsets: Tensor) -> None:
    """Data checks of a sparse update batch: offsets start at 0, never decrease, end at len(values), form
    a whole number of L-layer updates, and every index lies inside its layer."""
    L = len(dense)
    off = offsets.tolist()
    if off[0] != 0 or off[-1] != values.numel():
        raise ValueError(f"{op}: offsets must start at 0 and end at len(values) = {values.numel()}, "
                         f"got {off[0]} ... {off[-1]}")
    if (len(off) - 1) % L:
        raise ValueError(f"{op}: offsets has {len(off) - 1} segments, not a multiple of len(dense) = {L}")
    for s in range(len(off) - 1):
        lo, hi = off[s], off[s + 1]
        if hi < lo:
            raise ValueError(f"{op}: offsets decrease at segment {s} ({lo} > {hi})")
        if hi > lo:
            seg = indices[lo:hi]
            n = dense[s % L].numel()
            if int(seg.min()) < 0 or int(seg.max()) >= n:
                raise ValueError(f"{op}: indices of segment {s} (layer {s % L}) out of range [0, {n})")

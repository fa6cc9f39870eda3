"""Argument checks of the ops: the Python side of ``csrc/checks.h``, which the compiled kernels run on both
devices (on CUDA by design only: the CUDA kernels have never executed on a GPU). The wrappers run these
before either back-end (metadata only, so a bad call fails before any data is read), the fake kernels run
them under ``torch.compile``, and the reference back-end adds the data checks the kernels make themselves
(NaN/Inf in a selected-from tensor, offsets and index ranges, tensors written in place that share memory)
before it writes anything. Every failure is a ``ValueError`` that names the argument.

Under ``torch.compile`` with the compiled kernels, the *values* of scalar arguments (the ratio's range, the
hyper-parameters' signs) are left to the kernel (``defer_scalars``): dynamo cannot turn a ``raise`` inside
the traced wrapper into the caller's ``ValueError`` (``fullgraph=True`` fails with "Observed exception"),
while the kernel raises it when the compiled graph runs, before it writes anything. Range checks use
comparisons only (no ``math.isnan``), which dynamo traces on a symbolic float.
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import _backend

Tensor = torch.Tensor
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NUMEL = 2**31 - 1  # indices are int32


def defer_scalars(tensors: Sequence[Tensor]) -> bool:
    """Whether the compiled kernel will check the scalar arguments' values itself (see the module doc)."""
    return _backend.COMPILED and len(tensors) > 0 and torch.compiler.is_compiling()


def real(name: str, value) -> float:
    """A real number as a float: a Python or numpy int/float (any ``numbers.Real``), not a bool or tensor."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = "a tensor; pass a number (e.g. float(t))" if isinstance(value, Tensor) else \
            f"{type(value).__name__} {value!r}"
        raise ValueError(f"{name} must be a real number, got {what}")
    return float(value)


def ratio(name: str, value, *, defer: bool = False) -> float:
    """A keep ratio r in (0, 1] (NaN fails both comparisons)."""
    value = real(name, value)
    if not defer and not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def finite(name: str, value, low: Optional[float] = None, *, defer: bool = False) -> float:
    value = real(name, value)
    if not defer and not (-math.inf < value < math.inf and (low is None or value >= low)):
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


def vector(name: str, t, dtypes: Tuple[torch.dtype, ...], device: torch.device, device_owner: str) -> Tensor:
    """A 1-D tensor of one of ``dtypes`` on ``device`` (that of ``device_owner``), made contiguous."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.dtype not in dtypes:
        raise ValueError(f"{name} must be a 1-D tensor of dtype {' or '.join(map(str, dtypes))}, "
                         f"got {t.dim()}-D {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {device_owner} is on {device}")
    return t.contiguous()


# ---- the arguments of each op (the functions of csrc/checks.h) ----------------------------------------

def _op_errors(check):
    """The check's ValueErrors start with the op's name (its first argument), as the kernels' do."""
    @functools.wraps(check)
    def named(op: str, *args, **kwargs):
        try:
            return check(op, *args, **kwargs)
        except ValueError as e:
            raise ValueError(f"{op}: {e}") from None
    return named


@_op_errors
def topk_args(op: str, xs, r, subtract, *, defer: bool = False):
    """layerwise_topk(_mask): ``(xs, ratio, subtract)`` checked; ``defer`` leaves the ratio's value to the
    kernel."""
    xs = tensor_list("xs", xs)
    r = ratio("ratio", r, defer=defer or defer_scalars(xs))
    if subtract is not None:
        subtract = tensor_list("subtract", subtract)
        matching("subtract", subtract, "xs", xs)
    return xs, r, subtract


@_op_errors
def accumulate_args(op: str, dense, values, indices, offsets, alpha, *, defer: bool = False):
    """sparse_accumulate_: the batch's metadata (its offsets and indices are the back-end's to check)."""
    dense = tensor_list("dense", dense, same_dtype=False, must_be_contiguous=True)
    if not dense:
        raise ValueError("dense must hold at least one tensor")
    alpha = finite("alpha", alpha, defer=defer or defer_scalars(dense))
    dev = dense[0].device
    values = vector("values", values, FLOAT_DTYPES, dev, "dense[0]")
    indices = vector("indices", indices, (torch.int32,), dev, "dense[0]")
    offsets = vector("offsets", offsets, (torch.int64,), dev, "dense[0]")
    if values.numel() != indices.numel():
        raise ValueError(f"values has {values.numel()} entries but indices has {indices.numel()}")
    if offsets.numel() < 1:
        raise ValueError("offsets must have at least one entry (0)")
    if (offsets.numel() - 1) % len(dense):
        raise ValueError(f"offsets has {offsets.numel() - 1} segments, not a multiple of len(dense) = "
                         f"{len(dense)}")
    return dense, values, indices, offsets, alpha


def _step_lists(params, grads, states: Dict[str, Sequence[Tensor]], masks, r, defer: bool):
    """params (written in place), grads and optimizer ``states`` (written) of the params' dtypes and
    shapes, bool masks; returns them checked, with the ratio and whether scalar values are deferred."""
    params = tensor_list("params", params, same_dtype=False, must_be_contiguous=True)
    grads = tensor_list("grads", grads, same_dtype=False)
    matching("grads", grads, "params", params)
    defer = defer or defer_scalars(params)
    r = ratio("ratio", r, defer=defer)
    states = {name: tensor_list(name, bufs, same_dtype=False, must_be_contiguous=True)
              for name, bufs in states.items()}
    for name, bufs in states.items():
        matching(name, bufs, "params", params)
    if masks is not None:
        masks = tensor_list("masks", masks, dtypes=(torch.bool,))
        matching("masks", masks, "params", params, same_dtype=False)
    return params, grads, states, masks, r, defer


def _non_negative(defer: bool, **values) -> Dict[str, float]:
    return {name: finite(name, v, low=0.0, defer=defer) for name, v in values.items()}


@_op_errors
def sgd_args(op: str, params, grads, momentum_buffers, masks, r, lr, momentum, dampening, weight_decay,
             nesterov, maximize, off_scale, *, defer: bool = False) -> tuple:
    """masked_sgd_: its arguments checked, in the op's order. ``momentum_buffers`` may be empty or None
    when ``momentum == 0``."""
    momentum = real("momentum", momentum)
    if momentum_buffers is None:
        if momentum != 0:
            raise ValueError(f"momentum_buffers is None but momentum = {momentum} needs one buffer per param")
        momentum_buffers = []
    with_buffers = momentum != 0 or len(momentum_buffers) > 0  # with momentum == 0 they are never touched
    params, grads, states, masks, r, defer = _step_lists(
        params, grads, {"momentum_buffers": momentum_buffers} if with_buffers else {}, masks, r, defer)
    h = _non_negative(defer, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      off_scale=off_scale)
    if not defer and nesterov and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError("nesterov requires momentum > 0 and dampening == 0")
    return (params, grads, states.get("momentum_buffers", []), masks, r, h["lr"], h["momentum"], h["dampening"],
            h["weight_decay"], bool(nesterov), bool(maximize), h["off_scale"])


@_op_errors
def adam_args(op: str, params, grads, exp_avgs, exp_avg_sqs, masks, r, lr, beta1, beta2, eps, weight_decay,
              step, maximize, off_scale, *, defer: bool = False) -> tuple:
    """masked_adam_: its arguments checked, in the op's order."""
    params, grads, states, masks, r, defer = _step_lists(
        params, grads, {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}, masks, r, defer)
    h = _non_negative(defer, lr=lr, eps=eps, weight_decay=weight_decay, off_scale=off_scale)
    betas = [real(name, v) for name, v in (("beta1", beta1), ("beta2", beta2))]
    for name, v in zip(("beta1", "beta2"), betas):
        if not defer and not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"step must be an integer, got {type(step).__name__} {step!r}")
    if not defer and step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return (params, grads, states["exp_avgs"], states["exp_avg_sqs"], masks, r, h["lr"], betas[0], betas[1],
            h["eps"], h["weight_decay"], int(step), bool(maximize), h["off_scale"])


# ---- data checks of the reference back-end (the kernels make them while they read the data) ------------

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
    """Data checks of a sparse update batch: offsets start at 0, never decrease and end at len(values), and
    every index lies inside its layer."""
    L = len(dense)
    off = offsets.tolist()
    if off[0] != 0 or off[-1] != values.numel():
        raise ValueError(f"{op}: offsets must start at 0 and end at len(values) = {values.numel()}, "
                         f"got {off[0]} ... {off[-1]}")
    for s in range(len(off) - 1):
        lo, hi = off[s], off[s + 1]
        if hi < lo:
            raise ValueError(f"{op}: offsets decrease at segment {s} ({lo} > {hi})")
        if hi > lo:
            seg = indices[lo:hi]
            n = dense[s % L].numel()
            if int(seg.min()) < 0 or int(seg.max()) >= n:
                raise ValueError(f"{op}: indices of segment {s} (layer {s % L}) out of range [0, {n})")

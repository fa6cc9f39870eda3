"""The only door to the kernels: typed wrappers with argument checks (SPEC §1).

Read-only tensor arguments that are not contiguous are copied to contiguous memory; tensors written in
place must be contiguous (else ``ValueError``). Each op runs the compiled kernel when the extension is
loaded (``unlearn_ext.build_info()["backend"] == "compiled"``) and the reference otherwise.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _backend
from . import checks, reference
from .reference import keep_count

Tensor = torch.Tensor

if _backend.COMPILED:
    from . import fake  # noqa: F401  (registers the fake kernels used by torch.compile)


def _compiled(tensors: Sequence[Tensor]) -> bool:
    return _backend.COMPILED and len(tensors) > 0


def layerwise_topk(xs: Sequence[Tensor], ratio: float, largest: bool = True,
                   subtract: Optional[Sequence[Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Fused layer-wise top-k (SPEC §1.2): ``(values, int32 indices ascending per layer, int64 offsets)``.

    With ``subtract``, selects on ``xs[l] - subtract[l]`` (the update) without materialising it and
    returns its signed values.
    """
    xs = checks.tensor_list("xs", xs)
    ratio = checks.ratio("ratio", ratio)
    if subtract is not None:
        subtract = checks.tensor_list("subtract", subtract)
        checks.matching("subtract", subtract, "xs", xs)
    if _compiled(xs):
        return torch.ops.unlearn_ext.layerwise_topk(xs, ratio, bool(largest), subtract)
    if subtract is None:
        checks.all_finite("layerwise_topk", "xs", xs)
    else:
        checks.all_finite("layerwise_topk", "xs - subtract", [x - s for x, s in zip(xs, subtract)])
    return reference.layerwise_topk(xs, ratio, bool(largest), subtract)


def layerwise_topk_mask(xs: Sequence[Tensor], ratio: float, largest: bool = True) -> List[Tensor]:
    """The same selection as one bool mask per layer (SPEC §1.3)."""
    xs = checks.tensor_list("xs", xs)
    ratio = checks.ratio("ratio", ratio)
    if _compiled(xs):
        return list(torch.ops.unlearn_ext.layerwise_topk_mask(xs, ratio, bool(largest)))
    checks.all_finite("layerwise_topk_mask", "xs", xs)
    return reference.layerwise_topk_mask(xs, ratio, bool(largest))


def sparse_accumulate_(dense: Sequence[Tensor], values: Tensor, indices: Tensor, offsets: Tensor,
                       alpha: float = 1.0) -> None:
    """In place, for each segment s of ``offsets``: ``dense[s % L].view(-1)[indices[seg]] += alpha *
    values[seg]`` (SPEC §1.4), B = (len(offsets) - 1) / L stored updates in one call, in order.
    All checks (including index ranges, and that no two tensors of ``dense`` share memory) happen before
    anything is written."""
    dense = checks.tensor_list("dense", dense, same_dtype=False, must_be_contiguous=True)
    if not dense:
        raise ValueError("dense must hold at least one tensor")
    alpha = checks.finite("alpha", alpha)
    dev = dense[0].device
    for name, t, dtypes in (("values", values, checks.FLOAT_DTYPES), ("indices", indices, (torch.int32,)),
                            ("offsets", offsets, (torch.int64,))):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.dtype not in dtypes:
            raise ValueError(f"{name} must be a 1-D tensor of dtype {' or '.join(map(str, dtypes))}, "
                             f"got {t.dim()}-D {t.dtype}")
        if t.device != dev:
            raise ValueError(f"{name} is on {t.device} but dense[0] is on {dev}")
    if values.numel() != indices.numel():
        raise ValueError(f"values has {values.numel()} entries but indices has {indices.numel()}")
    if offsets.numel() < 1:
        raise ValueError("offsets must have at least one entry (0)")
    values, indices, offsets = values.contiguous(), indices.contiguous(), offsets.contiguous()
    if _backend.COMPILED:
        torch.ops.unlearn_ext.sparse_accumulate_(dense, values, indices, offsets, alpha)
        return
    checks.disjoint("sparse_accumulate_", {"dense": dense})
    checks.segments("sparse_accumulate_", dense, values, indices, offsets)
    reference.sparse_accumulate_(dense, values, indices, offsets, alpha)


def _step_lists(op: str, params, grads, states, masks, ratio):
    params = checks.tensor_list("params", params, same_dtype=False, must_be_contiguous=True)
    grads = checks.tensor_list("grads", grads, same_dtype=False)
    checks.matching("grads", grads, "params", params)
    checks.ratio("ratio", ratio)
    for name, bufs in states.items():
        bufs = checks.tensor_list(name, bufs, same_dtype=False, must_be_contiguous=True)
        checks.matching(name, bufs, "params", params)
        states[name] = bufs
    if masks is not None:
        masks = checks.tensor_list("masks", masks, dtypes=(torch.bool,))
        checks.matching("masks", masks, "params", params, same_dtype=False)
    elif not _compiled(params):
        checks.all_finite(op, "grads", grads)
    return params, grads, states, masks


def masked_sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                masks: Optional[Sequence[Tensor]] = None, ratio: float = 1.0, lr: float = 1e-3,
                momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                nesterov: bool = False, maximize: bool = False, off_scale: float = 0.0) -> None:
    """Masked partial SGD step, fused over layers (SPEC §1.5). The mask is ``masks`` or, if None, the
    per-layer top-``ratio`` of |grad|. ``off_scale=0`` leaves unselected params and buffers bitwise
    unchanged. With ``momentum == 0``, ``momentum_buffers`` may be empty."""
    for name, v in (("lr", lr), ("momentum", momentum), ("dampening", dampening),
                    ("weight_decay", weight_decay), ("off_scale", off_scale)):
        checks.finite(name, v, low=0.0)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov requires momentum > 0 and dampening == 0")
    states = {"momentum_buffers": momentum_buffers} if momentum != 0 or len(momentum_buffers) else {}
    params, grads, states, masks = _step_lists("masked_sgd_", params, grads, states, masks, ratio)
    bufs = states.get("momentum_buffers", [])
    args = (params, grads, bufs, masks, float(ratio), float(lr), float(momentum), float(dampening),
            float(weight_decay), bool(nesterov), bool(maximize), float(off_scale))
    if not params:
        return
    if _compiled(params):
        torch.ops.unlearn_ext.masked_sgd_(*args)
    else:
        checks.disjoint("masked_sgd_", {"params": params, "momentum_buffers": bufs})
        reference.masked_sgd_(*args)


def masked_adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], masks: Optional[Sequence[Tensor]] = None, ratio: float = 1.0,
                 lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 1e-2, step: int = 1, maximize: bool = False,
                 off_scale: float = 0.0) -> None:
    """Masked partial AdamW step (decoupled weight decay), the rules of :func:`masked_sgd_` against
    ``torch.optim.AdamW``. ``step`` is the step count after this step (>= 1)."""
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("off_scale", off_scale)):
        checks.finite(name, v, low=0.0)
    for name, v in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if int(step) < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    params, grads, states, masks = _step_lists("masked_adam_", params, grads, states, masks, ratio)
    args = (params, grads, states["exp_avgs"], states["exp_avg_sqs"], masks, float(ratio), float(lr),
            float(beta1), float(beta2), float(eps), float(weight_decay), int(step), bool(maximize),
            float(off_scale))
    if not params:
        return
    if _compiled(params):
        torch.ops.unlearn_ext.masked_adam_(*args)
    else:
        checks.disjoint("masked_adam_", {"params": params, **states})
        reference.masked_adam_(*args)


__all__ = ["layerwise_topk", "layerwise_topk_mask", "sparse_accumulate_", "masked_sgd_", "masked_adam_",
           "keep_count", "reference", "checks"]

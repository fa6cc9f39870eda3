"""The only door to the kernels: typed wrappers with argument checks (docs/algorithms.md#the-ops).

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
    """Fused layer-wise top-k: ``(values, int32 indices ascending per layer, int64 offsets)``.

    With ``subtract``, selects on ``xs[l] - subtract[l]`` (the update) without materialising it and
    returns its signed values.
    """
    xs, ratio, subtract = checks.topk_args("layerwise_topk", xs, ratio, subtract)
    if _compiled(xs):
        return torch.ops.unlearn_ext.layerwise_topk(xs, ratio, bool(largest), subtract)
    if subtract is None:
        checks.all_finite("layerwise_topk", "xs", xs)
    else:
        checks.all_finite("layerwise_topk", "xs - subtract", [x - s for x, s in zip(xs, subtract)])
    return reference.layerwise_topk(xs, ratio, bool(largest), subtract)


def layerwise_topk_mask(xs: Sequence[Tensor], ratio: float, largest: bool = True) -> List[Tensor]:
    """The same selection as one bool mask per layer."""
    xs, ratio, _ = checks.topk_args("layerwise_topk_mask", xs, ratio, None)
    if _compiled(xs):
        return list(torch.ops.unlearn_ext.layerwise_topk_mask(xs, ratio, bool(largest)))
    checks.all_finite("layerwise_topk_mask", "xs", xs)
    return reference.layerwise_topk_mask(xs, ratio, bool(largest))


def sparse_accumulate_(dense: Sequence[Tensor], values: Tensor, indices: Tensor, offsets: Tensor,
                       alpha: float = 1.0) -> None:
    """In place, for each segment s of ``offsets``: ``dense[s % L].view(-1)[indices[seg]] += alpha *
    values[seg]``, B = (len(offsets) - 1) / L stored updates in one call, in order.
    All checks (including index ranges, and that no two tensors of ``dense`` share memory) happen before
    anything is written."""
    dense, values, indices, offsets, alpha = checks.accumulate_args("sparse_accumulate_", dense, values, indices,
                                                                    offsets, alpha)
    if _backend.COMPILED:
        torch.ops.unlearn_ext.sparse_accumulate_(dense, values, indices, offsets, alpha)
        return
    checks.disjoint("sparse_accumulate_", {"dense": dense})
    checks.segments("sparse_accumulate_", dense, values, indices, offsets)
    reference.sparse_accumulate_(dense, values, indices, offsets, alpha)


def masked_sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Optional[Sequence[Tensor]],
                masks: Optional[Sequence[Tensor]] = None, ratio: float = 1.0, lr: float = 1e-3,
                momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                nesterov: bool = False, maximize: bool = False, off_scale: float = 0.0) -> None:
    """Masked partial SGD step, fused over layers. The mask is ``masks`` or, if None, the
    per-layer top-``ratio`` of |grad|. ``off_scale=0`` leaves unselected params and buffers bitwise
    unchanged. With ``momentum == 0``, ``momentum_buffers`` may be empty or None."""
    args = checks.sgd_args("masked_sgd_", params, grads, momentum_buffers, masks, ratio, lr, momentum, dampening,
                           weight_decay, nesterov, maximize, off_scale)
    params, grads, bufs, masks = args[:4]
    if not params:
        return
    if _compiled(params):
        torch.ops.unlearn_ext.masked_sgd_(*args)
        return
    checks.disjoint("masked_sgd_", {"params": params, "momentum_buffers": bufs})
    if masks is None:
        checks.all_finite("masked_sgd_", "grads", grads)
    reference.masked_sgd_(*args)


def masked_adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], masks: Optional[Sequence[Tensor]] = None, ratio: float = 1.0,
                 lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 1e-2, step: int = 1, maximize: bool = False,
                 off_scale: float = 0.0) -> None:
    """Masked partial AdamW step (decoupled weight decay), the rules of :func:`masked_sgd_` against
    ``torch.optim.AdamW``. ``step`` is the step count after this step (>= 1)."""
    args = checks.adam_args("masked_adam_", params, grads, exp_avgs, exp_avg_sqs, masks, ratio, lr, beta1, beta2,
                            eps, weight_decay, step, maximize, off_scale)
    params, grads, exp_avgs, exp_avg_sqs, masks = args[:5]
    if not params:
        return
    if _compiled(params):
        torch.ops.unlearn_ext.masked_adam_(*args)
        return
    checks.disjoint("masked_adam_", {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs})
    if masks is None:
        checks.all_finite("masked_adam_", "grads", grads)
    reference.masked_adam_(*args)


__all__ = ["layerwise_topk", "layerwise_topk_mask", "sparse_accumulate_", "masked_sgd_", "masked_adam_",
           "keep_count", "reference", "checks"]

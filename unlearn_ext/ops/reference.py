"""Plain-PyTorch definition of every unlearn_ext op (docs/algorithms.md#the-ops).

This module is the *definition* the compiled kernels are tested against; it favours clarity over speed.
Argument checking lives in :mod:`unlearn_ext.ops.checks` and runs before these functions in both
back-ends, so the functions here assume valid input.

Selection rule (docs/algorithms.md#the-selection-rule): for a layer of ``n`` elements and keep ratio ``r``,
``k = keep_count(n, r)``; keep the ``k`` entries of largest ``|x|`` (or smallest with ``largest=False``),
ties at the threshold broken by lower flat index first. ``|x|`` is compared as float32 (fp16/bf16 are
widened exactly), which is the same order as the compiled kernels' 31-bit radix keys.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def keep_count(n: int, ratio: float) -> int:
    """k = min(n, max(1, ceil(r*n))), 0 for an empty layer.

    ``r*n`` is a double; a product within a relative 1e-9 above an integer counts as that integer
    (``0.1 * 30`` keeps 3, not 4). Mirrors ``keep_count`` in ``csrc/select.h``.
    """
    if n <= 0:
        return 0
    t = float(ratio) * float(n)
    fl = math.floor(t)
    k = int(fl) if (t - fl) <= 1e-9 * t else int(fl) + 1
    return min(n, max(1, k))


def _abs_keys(x: Tensor) -> Tensor:
    """int64 keys ordered like |x| (the float32 bit pattern of |x|, sign cleared)."""
    return x.detach().reshape(-1).float().abs().view(torch.int32).to(torch.int64)


def select_indices(x: Tensor, ratio: float, largest: bool = True) -> Tensor:
    """Ascending int64 flat indices of the entries one layer keeps."""
    n = x.numel()
    k = keep_count(n, ratio)
    if k == 0:
        return torch.zeros(0, dtype=torch.int64, device=x.device)
    keys = _abs_keys(x)
    # A stable sort keeps equal keys in index order, so the first k are the rule's choice.
    order = torch.sort(keys, descending=largest, stable=True).indices[:k]
    return torch.sort(order).values


def _difference(x: Tensor, s: Optional[Tensor]) -> Tensor:
    return x if s is None else x - s


def layerwise_topk(
    xs: Sequence[Tensor], ratio: float, largest: bool = True, subtract: Optional[Sequence[Tensor]] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Selected signed values (of ``xs - subtract`` if given), int32 ascending indices, int64 offsets."""
    device = xs[0].device if len(xs) else torch.device("cpu")
    dtype = xs[0].dtype if len(xs) else torch.float32
    values, indices, offsets = [], [], [0]
    for i, x in enumerate(xs):
        d = _difference(x, None if subtract is None else subtract[i]).reshape(-1)
        idx = select_indices(d, ratio, largest)
        values.append(d[idx])
        indices.append(idx.to(torch.int32))
        offsets.append(offsets[-1] + idx.numel())
    if not values:
        return (torch.zeros(0, dtype=dtype, device=device), torch.zeros(0, dtype=torch.int32, device=device),
                torch.zeros(1, dtype=torch.int64, device=device))
    return torch.cat(values), torch.cat(indices), torch.tensor(offsets, dtype=torch.int64, device=device)


def layerwise_topk_mask(xs: Sequence[Tensor], ratio: float, largest: bool = True) -> List[Tensor]:
    masks = []
    for x in xs:
        m = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
        m[select_indices(x, ratio, largest)] = True
        masks.append(m.view(x.shape))
    return masks


def sparse_accumulate_(dense: Sequence[Tensor], values: Tensor, indices: Tensor, offsets: Tensor,
                       alpha: float) -> None:
    """``dense[l].view(-1)[indices[seg]] += alpha * values[seg]`` for every segment, in segment order.

    Arithmetic is float32: each segment's additions are summed in float32 onto the widened layer and the
    layer is rounded back to its dtype once per segment (exact for untouched entries).
    """
    L = len(dense)
    off = offsets.tolist()
    for s in range(len(off) - 1):
        lo, hi = off[s], off[s + 1]
        if hi == lo:
            continue
        flat = dense[s % L].view(-1)
        acc = flat.float()
        acc.index_add_(0, indices[lo:hi].long(), values[lo:hi].float() * float(alpha))
        flat.copy_(acc)


def _masks_for(grads: Sequence[Tensor], masks: Optional[Sequence[Tensor]], ratio: float) -> List[Tensor]:
    if masks is not None:
        return [m.bool() for m in masks]
    return layerwise_topk_mask(grads, ratio, True)


def _step_gradient(g: Tensor, selected: Tensor, maximize: bool, off_scale: float) -> Tensor:
    """The float32 gradient a masked step uses: negated when maximising, scaled by ``off_scale`` where
    not selected."""
    g32 = -g.float() if maximize else g.float()
    return g32 if off_scale == 1.0 else torch.where(selected, g32, g32 * float(off_scale))


def masked_sgd_(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
                masks: Optional[Sequence[Tensor]], ratio: float, lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, off_scale: float) -> None:
    """torch.optim.SGD's step on selected coordinates, the off_scale-scaled step elsewhere.

    Computed in float32 and rounded to the parameter dtype. With ``off_scale == 0`` unselected param and
    momentum entries are left bitwise unchanged. torch.optim.SGD's first step sets ``buf = d``; callers
    get exactly that by passing zeroed buffers and ``dampening=0`` on the first step
    (``0 * momentum + d == d``), which is what :class:`unlearn_ext.optim.PartialSGD` does.
    """
    sel = _masks_for(grads, masks, ratio)
    for i, (p, g) in enumerate(zip(params, grads)):
        p32, m = p.float(), sel[i]
        g32 = _step_gradient(g, m, maximize, off_scale)
        d = g32
        if weight_decay != 0:
            d = d.add(p32, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            b32 = buf.float()
            b32 = b32.mul(momentum).add(d, alpha=1 - dampening)
            d = d.add(b32, alpha=momentum) if nesterov else b32
        new_p = p32.add(d, alpha=-lr)
        moves = m if off_scale == 0 else torch.ones_like(m)
        if momentum != 0:
            buf.copy_(torch.where(moves, b32, buf.float()))
        p.copy_(torch.where(moves, new_p, p32))


def masked_adam_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                 exp_avg_sqs: Sequence[Tensor], masks: Optional[Sequence[Tensor]], ratio: float, lr: float,
                 beta1: float, beta2: float, eps: float, weight_decay: float, step: int, maximize: bool,
                 off_scale: float) -> None:
    """torch.optim.AdamW's step (decoupled weight decay, no amsgrad) on selected coordinates.

    ``step`` is the step count after this step (>= 1), shared by all coordinates for bias correction.
    Unselected coordinates take the same step on ``off_scale * grad``; ``off_scale == 0`` leaves param
    and both moments bitwise unchanged. Float32 arithmetic, rounded to each tensor's dtype.
    """
    sel = _masks_for(grads, masks, ratio)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    step_size = lr / bias_correction1
    for i, (p, g) in enumerate(zip(params, grads)):
        p32, m = p.float(), sel[i]
        g32 = _step_gradient(g, m, maximize, off_scale)
        ea, eas = exp_avgs[i], exp_avg_sqs[i]
        new_p = p32.mul(1 - lr * weight_decay)
        ea32 = ea.float().lerp(g32, 1 - beta1)
        eas32 = eas.float().mul(beta2).addcmul(g32, g32, value=1 - beta2)
        denom = (eas32.sqrt() / bias_correction2_sqrt).add(eps)
        new_p = new_p.addcdiv(ea32, denom, value=-step_size)
        moves = m if off_scale == 0 else torch.ones_like(m)
        ea.copy_(torch.where(moves, ea32, ea.float()))
        eas.copy_(torch.where(moves, eas32, eas.float()))
        p.copy_(torch.where(moves, new_p, p32))

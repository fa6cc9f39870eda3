"""Second-order pieces shared by certified unlearning and influence unlearning: Hessian-vector products by
double back-propagation and the LiSSA estimate of an inverse-Hessian-vector product.

**LiSSA** (:func:`lissa_inverse_hvp`, Agarwal et al.; the recursion of the certified-unlearning code's
``newton_update``): with v the vector to multiply and H_j the Hessian of the mean cross-entropy on the j-th
small random batch (:func:`batch_sampler`: drawn with replacement) plus ``damping``·I,
``h_0 = v,  h_j = v + h_{j-1} − H_j h_{j-1} / scale`` for j = 1..depth; the estimate is the mean over
``repeats`` independent recursions of ``h_depth / scale``. It converges to (H + damping·I)⁻¹v when every
eigenvalue of (H + damping·I)/scale lies in (0, 2) (so ``scale`` must exceed the largest eigenvalue);
truncated at ``depth`` it is the regularised inverse Σ_{j<depth}(I − H̃/scale)^j / scale, whose gain is at
most depth/scale in every direction.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import default_collate

from ..train import unpack_batch

Tensor = torch.Tensor
BatchFn = Callable[[], Tuple[Tensor, Tensor]]


def batch_sampler(dataset, batch_size: int, seed: int, device) -> BatchFn:
    """Random batches of ``dataset`` drawn with replacement (LiSSA's stochastic Hessians), seeded."""
    g = torch.Generator().manual_seed(int(seed))
    n = len(dataset)

    def draw():
        idx = torch.randint(n, (int(batch_size),), generator=g).tolist()
        x, y, _ = unpack_batch(default_collate([dataset[i] for i in idx]))
        return x.to(device), y.to(device)
    return draw


def hvp(model: nn.Module, params: Sequence[Tensor], x: Tensor, y: Tensor, v: Sequence[Tensor]) -> List[Tensor]:
    """H·v, H the Hessian of the mean cross-entropy of ``model`` on (x, y) w.r.t. ``params``."""
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    return list(torch.autograd.grad(grads, params, grad_outputs=list(v)))


def lissa_inverse_hvp(model: nn.Module, params: Sequence[Tensor], v: Sequence[Tensor], sample_batch: BatchFn,
                      *, damping: float, scale: float, depth: int, repeats: int) -> List[Tensor]:
    """LiSSA estimate of (H + damping·I)⁻¹ v on the batches ``sample_batch()`` returns (module docstring).
    Raises FloatingPointError when the recursion diverges (``scale`` below the largest eigenvalue)."""
    if not (scale > 0 and depth >= 1 and repeats >= 1):
        raise ValueError(f"need scale > 0, depth >= 1, repeats >= 1; got {scale}, {depth}, {repeats}")
    v = [t.detach() for t in v]
    total = [torch.zeros_like(t) for t in v]
    for _ in range(int(repeats)):
        h = [t.clone() for t in v]
        for j in range(int(depth)):
            if j % 64 == 63:  # a diverging recursion overflows within tens of steps: stop it early
                _check_finite(h, scale)
            hv = hvp(model, params, *sample_batch(), h)
            with torch.no_grad():
                # h ← v + h − (H h + damping·h)/scale, fused over layers
                torch._foreach_mul_(h, 1.0 - damping / scale)
                torch._foreach_add_(h, v)
                torch._foreach_add_(h, hv, alpha=-1.0 / scale)
        torch._foreach_add_(total, h)
    est = [t / (scale * repeats) for t in total]
    _check_finite(est, scale)
    return est


def _check_finite(ts: Sequence[Tensor], scale: float) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in ts):
        raise FloatingPointError(f"LiSSA diverged: scale={scale} is below the largest Hessian eigenvalue; "
                                 "raise scale")

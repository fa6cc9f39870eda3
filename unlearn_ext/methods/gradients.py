"""First-order gradient statistics over a loader, shared by the baselines (SalUn's and MSG's masks, the
certified and influence Newton steps). Each runs the model as it is — callers set train/eval mode."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .common import batches

Tensor = torch.Tensor


def summed_batch_grads(model: nn.Module, loaders: Sequence[Tuple[object, float]], params: Sequence[Tensor]
                       ) -> List[Tensor]:
    """Σ over ``(loader, sign)`` pairs and their batches of ∇(sign · mean-batch cross-entropy) — what the
    original code gets by calling ``backward()`` batch after batch into ``.grad``."""
    device = params[0].device
    total = [torch.zeros_like(p) for p in params]
    for data, sign in loaders:
        for x, y, _ in batches(data, device):
            grads = torch.autograd.grad(sign * F.cross_entropy(model(x), y), params, allow_unused=True)
            for t, g in zip(total, grads):
                if g is not None:
                    t.add_(g)
    return total


def mean_loss_grad(model: nn.Module, loader, params: Sequence[Tensor]) -> Tuple[List[Tensor], int]:
    """(1/n) Σ_i ∇ℓ_i over every sample of ``loader`` (cross-entropy), and n."""
    device = params[0].device
    total = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y, _ in batches(loader, device):
        loss = F.cross_entropy(model(x), y, reduction="sum")
        for t, g in zip(total, torch.autograd.grad(loss, params)):
            t.add_(g)
        n += len(y)
    if n == 0:
        raise ValueError("the loader yielded no samples")
    return [t / n for t in total], n

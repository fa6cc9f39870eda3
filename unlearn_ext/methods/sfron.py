"""SFR-on (Huang et al., NeurIPS 2024, "Unified Gradient-Based Machine Unlearning with Remain Geometry
Enhancement"; code: github.com/K1nght/Unified-Unlearning-w-Remain-Geometry, ``Classification/unlearn/sfron.py``).

Method ``"sfron"``:

1. Saliency mask from diagonal-Fisher statistics (model in eval mode): F_f = mean over D_f batches of the
   squared batch-mean gradient, F_r likewise on D_r; m = 1[(F_f + 1e-15)/(F_r + 1e-15) ≥ γ].
2. ``steps`` iterations t = 0..T−1 with one SGD optimizer (momentum, weight decay; cosine LR over the
   iterations). Every ``forget_every``-th iteration first a forget step on a D_f batch:
   loss = −α_t Σᵢ wᵢℓᵢ with wᵢ = ℓᵢ^(−λ) / Σⱼ ℓⱼ^(−λ) (weights detached: low-loss samples — the ones still
   remembered — weigh most), α_t = ``forget_alpha``·(1 + cos(πt/T))/2; gradient times m, clipped to total
   norm ``max_norm``, applied by ``ops.masked_sgd_`` with m (unmasked weights and their momentum stay
   bitwise unchanged — the authors' grad-times-mask then ``optimizer.step()`` lets weight decay and momentum
   move them, the bug SPEC §1.5 rules out). Then, every iteration, an ordinary SGD step on a D_r batch
   (the same op with an all-true mask, so both steps share SGD's momentum buffer as in the original).

Defaults: the authors' CIFAR-10 setting — T = 1500, k = 5, γ = 1, λ = 0.5, α = 25, max_norm 7, SGD lr 0.01,
momentum 0.9, weight decay 5e-4. Their EMA (β = 1.0) is the identity and is left out.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Method, register_method
from .common import batches, cycle, device_of
from .deep_unlearn import MaskedSGD

Tensor = torch.Tensor


def fisher_diagonal(model: nn.Module, data, params) -> List[Tensor]:
    """Mean over ``data``'s batches of the squared gradient of the batch-mean cross-entropy."""
    device = device_of(model)
    fisher = [torch.zeros_like(p) for p in params]
    n = 0
    for x, y, _ in batches(data, device):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        for f, g in zip(fisher, grads):
            f.addcmul_(g, g)
        n += 1
    return [f / max(n, 1) for f in fisher]


def fisher_ratio_mask(model: nn.Module, forget, retain, gamma: float) -> List[Tensor]:
    """m = 1[(F_f + 1e-15)/(F_r + 1e-15) ≥ γ] per parameter (model put in eval mode)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    f_forget = fisher_diagonal(model, forget, params)
    f_retain = fisher_diagonal(model, retain, params)
    return [(ff + 1e-15) / (fr + 1e-15) >= gamma for ff, fr in zip(f_forget, f_retain)]


def weighted_forget_loss(losses: Tensor, lam: float) -> Tensor:
    """−Σᵢ wᵢℓᵢ with wᵢ = ℓᵢ^(−λ) / Σⱼ ℓⱼ^(−λ), the weights detached (low-loss samples weigh most)."""
    coef = 1.0 / (losses.detach().pow(lam) + 1e-15)
    return -(coef / coef.sum() * losses).sum()


def masked_forget_step(model: nn.Module, opt: MaskedSGD, x: Tensor, y: Tensor, masks: Sequence[Tensor],
                       alpha: float, lam: float, max_norm: float) -> float:
    """One SFR-on forget step: gradient of α·(weighted forget loss), times the mask, clipped to total norm
    ``max_norm``, applied through ``opt`` with ``masks`` (unmasked weights and momentum bitwise unchanged).
    Returns the weighted forget loss (before the step)."""
    loss = weighted_forget_loss(F.cross_entropy(model(x), y, reduction="none"), lam)
    opt.zero_grad()
    (alpha * loss).backward()
    with torch.no_grad():
        for p, m in zip(opt.params, masks):
            if p.grad is not None:
                p.grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(opt.params, max_norm)
    opt.step(masks)
    return float(loss.detach())


@register_method
class SFRon(Method):
    """SFR-on: Fisher-ratio saliency mask, adaptively weighted masked forget steps every k-th iteration
    interleaved with retain steps (module docstring)."""

    name = "sfron"
    needs_retain = True
    defaults = {"steps": 1500, "forget_every": 5, "gamma": 1.0, "lam": 0.5, "forget_alpha": 25.0,
                "max_norm": 7.0, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        masks = fisher_ratio_mask(model, forget, retain, hp["gamma"])
        everything = [torch.ones_like(p, dtype=torch.bool) for p in params]
        opt = MaskedSGD(params, masks, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        total, k = int(hp["steps"]), int(hp["forget_every"])
        cosine = lambda base, t: base * (1 + math.cos(math.pi * t / total)) / 2  # noqa: E731
        device = device_of(model)
        forget_batches, retain_batches = batches(cycle(forget), device), batches(cycle(retain), device)
        model.train()
        forget_steps = 0
        for t in range(total):
            opt.param_groups[0]["lr"] = cosine(hp["lr"], t)
            if t % k == 0:
                x, y, _ = next(forget_batches)
                masked_forget_step(model, opt, x, y, masks, cosine(hp["forget_alpha"], t), hp["lam"],
                                   hp["max_norm"])
                forget_steps += 1
            x, y, _ = next(retain_batches)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(everything)
        kept = sum(int(m.sum()) for m in masks)
        return {"steps": total, "forget_steps": forget_steps,
                "mask_fraction": kept / max(1, sum(m.numel() for m in masks))}

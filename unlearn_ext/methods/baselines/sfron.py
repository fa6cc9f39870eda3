"""SFR-on (Huang et al., NeurIPS 2024, "Unified Gradient-Based Machine Unlearning with Remain Geometry
Enhancement"; code: github.com/K1nght/Unified-Unlearning-w-Remain-Geometry, ``Classification/unlearn/sfron.py``).

Method ``"sfron"``:

1. Saliency mask from diagonal-Fisher statistics (model in eval mode): F_f = mean over D_f batches of the
   squared batch-mean gradient, F_r likewise on D_r; m = 1[(F_f + 1e-15)/(F_r + 1e-15) ≥ γ].
2. ``steps`` iterations t = 0..T−1 with one SGD optimizer (momentum, weight decay; LR cosine over the
   iterations), model in train mode. Every ``forget_every``-th iteration first a forget step on a D_f
   batch: loss = −α_t Σᵢ wᵢℓᵢ with wᵢ = ℓᵢ^(−λ) / Σⱼ ℓⱼ^(−λ) (weights detached: low-loss samples — the
   ones still remembered — weigh most), α_t = ``forget_alpha``·(1 + cos(πt/T))/2; the gradient times m,
   clipped to total norm ``max_norm``, then a plain SGD step. Then, every iteration, an SGD step on a D_r
   batch (the same optimizer, so both share its momentum).

The forget step is the original's — ``param.grad *= mask`` then ``optimizer.step()``, under which weight
decay and momentum still move the masked-out weights (``freeze_unmasked=False``, default).
``freeze_unmasked=True`` applies it through :class:`~unlearn_ext.optim.PartialSGD` with the mask instead,
so masked-out weights and their momentum stay bitwise unchanged on forget steps (``masked_sgd_``'s rule; the
retain steps use an all-true mask, so they are ordinary SGD steps).

Defaults: the authors' CIFAR-10 setting — T = 1500, k = 5, γ = 1, λ = 0.5, α = 25, max_norm 7, SGD lr 0.01,
momentum 0.9, weight decay 5e-4. Their EMA (β = 1.0) is the identity and is left out.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from ...optim import PartialSGD
from ..base import Method, register_method
from ..common import batches, cycle, device_of, gradient_masks, set_lr
from ..hparams import AT_LEAST_ONE, NONNEGATIVE, POSITIVE
from ..schedules import cosine

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


@register_method
class SFRon(Method):
    """SFR-on: Fisher-ratio saliency mask, adaptively weighted masked forget steps every k-th iteration
    interleaved with retain steps (module docstring)."""

    name = "sfron"
    needs_retain = True
    defaults = {"steps": 1500, "forget_every": 5, "gamma": 1.0, "lam": 0.5, "forget_alpha": 25.0,
                "max_norm": 7.0, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "freeze_unmasked": False}
    ranges = {"forget_every": AT_LEAST_ONE, "gamma": NONNEGATIVE, "max_norm": POSITIVE}

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        masks = fisher_ratio_mask(model, forget, retain, hp["gamma"])
        sgd = dict(lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        everything = [torch.ones_like(p, dtype=torch.bool) for p in params]
        freeze = hp["freeze_unmasked"]
        opt = PartialSGD(params, masks=everything, **sgd) if freeze else torch.optim.SGD(params, **sgd)
        total, k = hp["steps"], hp["forget_every"]
        lr_at, alpha_at = cosine(hp["lr"], total), cosine(hp["forget_alpha"], total)
        device = device_of(model)
        forget_batches, retain_batches = batches(cycle(forget), device), batches(cycle(retain), device)
        forget_steps = 0
        for t in range(total):
            set_lr(opt, lr_at(t))
            model.train()
            if t % k == 0:
                x, y, _ = next(forget_batches)
                opt.zero_grad()
                with gradient_masks(params, masks):
                    loss = weighted_forget_loss(F.cross_entropy(model(x), y, reduction="none"), hp["lam"])
                    (alpha_at(t) * loss).backward()
                torch.nn.utils.clip_grad_norm_(params, hp["max_norm"])
                if freeze:
                    opt.param_groups[0]["masks"] = masks
                opt.step()
                if freeze:
                    opt.param_groups[0]["masks"] = everything
                forget_steps += 1
            x, y, _ = next(retain_batches)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        kept = sum(int(m.sum()) for m in masks)
        return {"steps": total, "forget_steps": forget_steps,
                "mask_fraction": kept / max(1, sum(m.numel() for m in masks))}

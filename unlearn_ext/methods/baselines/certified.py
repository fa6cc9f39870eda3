"""Certified unlearning for deep networks (Zhang, Dong, Wang & Li, ICML 2024, "Towards Certified Unlearning
for Deep Neural Networks"; code: github.com/zhangbinchi/certified-deep-unlearning, ``unlearn.py``).

Method ``"certified"``: one Newton step from the trained weights w* toward the optimum of the regularised
retain objective, then Gaussian noise:

    L_λ(w, D_r) = (1/|D_r|) Σ_{i∈D_r} ℓ_i(w) + (λ/2)‖w‖²
    w̃ = w* − (H_r + (λ + γ)I)⁻¹ ∇L_λ(w*, D_r)          (LiSSA, :mod:`..second_order`; model in eval mode)
    w_out = w̃ + N(0, σ²I)

**Noise** (the Gaussian mechanism on the bound of the paper's Theorem): training keeps ‖w‖₂ ≤ C (project
with :func:`project_to_ball_` or :class:`NormBall` after every optimizer step); with M the Lipschitz
constant of the loss Hessian and λ_min the smallest eigenvalue of the (unregularised) retain Hessian at w*
(λ + λ_min > 0 required), the distance between the Newton estimate and the retrained optimum is at most

    Δ = 2C(MC + λ) / (λ + λ_min)

and the output is (ε, δ)-indistinguishable from the same mechanism applied to the retrained model when

    σ = Δ · sqrt(2 ln(1.25/δ)) / ε                                    (:func:`certified_sigma`)

(the classical Gaussian-mechanism constant, stated for ε ≤ 1). M and λ_min are not computable for a deep
network, so they are hyper-parameters: defaults ``M=1.0``, ``lambda_min=0.0`` (the paper's local convex
approximation). The bound uses λ alone, not λ + γ: the larger Δ, so the certificate reported is not
overstated.

**σ.** Default ``sigma=1e-3``, the original code's fixed noise std (``--std``): a usable model, whose
certificate is what the stats report — ``epsilon_certified`` = Δ·sqrt(2 ln(1.25/δ))/σ at ``delta`` (about
7.7e9 at the defaults: formally no guarantee; ``certificate_meaningful`` says whether ε ≤ 1).
``sigma=None`` derives σ from (``epsilon``, ``delta``) instead and warns when that noise is larger than the
weights themselves (σ·√d > ‖w*‖, d the number of weights) — at the defaults σ ≈ 7.7e6, which wipes the model:
that *is* what a formal (1, 1e-5) certificate costs here. The noise is always added, from its own seeded
generator (the original's ``sequential_unlearning.py`` adds it to a copy of the state that is thrown away).

Defaults (the original's ``unlearn.py`` arguments): λ = 5e-4 (``--weight-decay``), γ = 0.01 (``--gamma``,
"the convex approximation coefficient", added to the Hessian only), scale = 1000, C = 20, repeats = 10
(``--s1``), depth = 1000 (``--s2``), LiSSA batch 10 (``--unlearn-bs``), σ = 1e-3 (``--std``).
Difference from that code, following the paper: the regulariser is (λ/2)‖w‖², whose gradient is λw and
Hessian λI (the code adds λ·Σ_layers ‖w_l‖, unsquared, to the loss, whose gradient is λ·w_l/‖w_l‖ and whose
Hessian is not λI).
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Iterable

import torch
from torch import nn

from ..base import Method, register_method
from ..common import dataset_of, device_of
from ..gradients import mean_loss_grad
from ..hparams import AT_LEAST_ONE, NONNEGATIVE, POSITIVE, Range
from ..second_order import batch_sampler, lissa_inverse_hvp

Tensor = torch.Tensor


def certified_sigma(epsilon: float, delta: float, C: float, M: float, lam: float, lambda_min: float) -> float:
    """σ = Δ·sqrt(2 ln(1.25/δ))/ε with Δ = 2C(MC + λ)/(λ + λ_min) (see the module docstring)."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if not (C > 0 and M >= 0 and lam > 0):
        raise ValueError(f"need C > 0, M >= 0, lam > 0; got C={C}, M={M}, lam={lam}")
    if not lam + lambda_min > 0:
        raise ValueError(f"lam + lambda_min must be > 0 (the regularised Hessian must be positive definite), "
                         f"got {lam} + {lambda_min}")
    bound = 2.0 * C * (M * C + lam) / (lam + lambda_min)
    return bound * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def project_to_ball_(params: Iterable[Tensor], C: float) -> float:
    """Scale ``params`` in place so that their joint L2 norm is at most ``C`` (the authors' projection after
    every step); returns the norm before projection."""
    params = [p for p in params]
    with torch.no_grad():
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p) for p in params])))
        if norm > C:
            torch._foreach_mul_(params, C / norm)
    return norm


class NormBall:
    """Keeps ‖w‖ ≤ C during :func:`unlearn_ext.train.train`: pass it in ``recorders=`` (it projects right
    after each optimizer step). Put it *after* an UpdateRecorder in that list if the recorded update should
    include the projection."""

    def __init__(self, model: nn.Module, C: float = 20.0):
        self.model, self.C = model, float(C)

    @contextmanager
    def step(self, sample_ids=None):
        yield
        project_to_ball_([p for p in self.model.parameters() if p.requires_grad], self.C)


def _flat(ts) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in ts])


@register_method
class CertifiedUnlearning(Method):
    """Newton step with a damped Hessian (LiSSA) plus Gaussian noise (module docstring).

    Hyper-parameters: ``lam`` λ (5e-4), ``gamma`` γ (0.01, Hessian only), ``scale``/``depth``/``repeats``/
    ``batch_size`` of LiSSA (1000/1000/10/10), ``C`` the training norm bound (20), ``M`` the Hessian
    Lipschitz constant (1), ``lambda_min`` the smallest retain-Hessian eigenvalue (0), ``sigma`` the noise
    std (1e-3; None: derived from ``epsilon`` (1) and ``delta`` (1e-5)) and ``seed`` (batches and noise).
    """

    name = "certified"
    needs_retain = True
    defaults = {"lam": 5e-4, "gamma": 0.01, "scale": 1000.0, "depth": 1000, "repeats": 10, "batch_size": 10,
                "C": 20.0, "M": 1.0, "lambda_min": 0.0, "epsilon": 1.0, "delta": 1e-5, "sigma": 1e-3, "seed": 0}
    ranges = {"lam": POSITIVE, "gamma": NONNEGATIVE, "scale": POSITIVE, "depth": AT_LEAST_ONE,
              "repeats": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "C": POSITIVE, "M": NONNEGATIVE,
              "epsilon": POSITIVE, "delta": Range(0.0, 1.0, low_open=True, high_open=True),
              "sigma": Range(0.0, none_ok=True)}

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        device = device_of(model)
        model.eval()  # BN statistics fixed: the objective must not move while LiSSA samples it
        weight_norm = float(_flat(params).norm())
        if weight_norm > hp["C"] * (1 + 1e-6):
            warnings.warn(f"certified: ‖w*‖ = {weight_norm:.4g} > C = {hp['C']}; the certificate assumes "
                          "training kept ‖w‖ ≤ C (see NormBall)", RuntimeWarning, stacklevel=3)
        bound = certified_sigma(1.0, hp["delta"], hp["C"], hp["M"], hp["lam"], hp["lambda_min"])  # σ at ε = 1
        if hp["sigma"] is None:
            sigma = bound / hp["epsilon"]
            n_weights = sum(p.numel() for p in params)
            if sigma * math.sqrt(n_weights) > weight_norm:
                warnings.warn(f"certified: σ = {sigma:.3g} from (ε={hp['epsilon']}, δ={hp['delta']}) adds noise of "
                              f"norm ≈ {sigma * math.sqrt(n_weights):.3g}, more than the weights' {weight_norm:.3g}: "
                              "the unlearned model is destroyed", RuntimeWarning, stacklevel=3)
        else:
            sigma = hp["sigma"]
        grad, n_retain = mean_loss_grad(model, retain, params)
        torch._foreach_add_(grad, [p.detach() for p in params], alpha=hp["lam"])  # ∇L_λ = mean ∇ℓ + λw
        sampler = batch_sampler(dataset_of(self.name, "retain", retain), hp["batch_size"], hp["seed"], device)
        step = lissa_inverse_hvp(model, params, grad, sampler, damping=hp["lam"] + hp["gamma"], scale=hp["scale"],
                                 depth=hp["depth"], repeats=hp["repeats"])
        gen = torch.Generator(device=device).manual_seed(hp["seed"] + 1)
        noise = [torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * sigma for p in params]
        with torch.no_grad():
            torch._foreach_sub_(params, step)
            torch._foreach_add_(params, noise)
        epsilon = bound / sigma if sigma > 0 else math.inf
        return {"sigma": sigma, "epsilon_certified": epsilon, "delta": hp["delta"],
                "certificate_meaningful": epsilon <= 1.0, "sigma_at_epsilon_1": bound,
                "weight_norm": weight_norm, "n_retain": n_retain, "newton_step_norm": float(_flat(step).norm()),
                "noise_norm": float(_flat(noise).norm()), "hvp_batches": hp["depth"] * hp["repeats"]}

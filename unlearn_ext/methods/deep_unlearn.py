"""Deep Unlearn's baselines (Cadet et al., "Deep Unlearn: Benchmarking Machine Unlearning for Image
Classification"), with the update rules of its code (github.com/xcadet/deepunlearn, ``munl/unlearning``).

Every method changes the model in place; batch sizes are those of the loaders you pass (Deep Unlearn's
defaults: 256, MSG and CT 64, SCRUB retain 32 / forget 64). Defaults are the ``ORIGINAL_*`` values of
Deep Unlearn's code — its benchmark then tunes them per data set and model with Optuna, so treat them as
starting points. Deliberate differences from that code are stated per method.

The epoch loops are :func:`.common.run_epochs` (model in train mode unless stated; a non-finite loss ends
the run before its step — gradient ascent run too far — and the step count says where). MSG and CT report
themselves unsupported (``Method.unsupported``) on a model without ``nn.Conv2d`` layers.

============ ============================================================================ ==================
name         update rule                                                                   defaults
============ ============================================================================ ==================
``ga``       ascend ℓ(D_f): SGD on −ℓ, model in train mode                                  epochs 10, lr 0.01,
                                                                                            momentum 0.9,
                                                                                            wd 5e-4
``ng_plus``  minimise α[ℓ(D_r) + (wd/2)‖θ−θ₀‖²] − (1−α)ℓ(D_f) on (retain, cycled forget)  epochs 10, lr 0.01,
             batch pairs; model in eval mode, so BatchNorm statistics stay frozen           momentum 0.9,
                                                                                            alpha 0.95, wd 0
``srl``      each epoch, SGD on D_r ∪ D_f (shuffled together) where every forget sample      epochs 5, lr 0.1,
             gets a fresh uniform label in {0..K−1} each time it is seen                    momentum 0.9,
                                                                                            wd 5e-4
``salun``    mask = global top ``threshold`` fraction of |Σ_b ∇(−ℓ_b(D_f))| over all        epochs 10, lr 0.01,
             parameters (``layerwise_topk_mask`` on the concatenated gradient); then SRL    momentum 0, wd 0,
             training whose steps only move masked coordinates (``masked_sgd_``, masks)     threshold 0.5
``msg``      g = Σ_b ∇ℓ_b(random |D_f| retain samples) − Σ_b ∇ℓ_b(D_f); in each Conv2d      epochs 5, lr 1e-3,
             weight re-initialise (Kaiming normal, fan_out) the keep_count(n, p) entries    momentum 0.9,
             of smallest |g| (``layerwise_topk_mask(largest=False)``); then fine-tune on    wd 5e-4, p 0.3,
             D_r with a triangular LR, the gradient scaled by 1 on those entries and 0.1    off_scale 0.1
             on the rest of each conv weight (``masked_sgd_(off_scale=0.1)``)
``ct``       transpose the two spatial axes of every Conv2d kernel, then fine-tune on D_r  epochs 3, lr 1e-3,
             (SGD, cosine LR per epoch)                                                     momentum 0.9,
                                                                                            wd 5e-4
``scrub``    SCRUB: epochs 1..``max_epochs`` first ascend KL_T(teacher‖student) on D_f,     epochs 5,
             then every epoch descend γ·ℓ + α·KL_T on D_r; step LR decay ×0.1 after         max_epochs 3,
             epochs ⌊.5E⌋, ⌊.8E⌋, ⌊.9E⌋; teacher = the model before unlearning              lr 5e-4, mom 0.9,
                                                                                            wd 5e-4, T 2,
                                                                                            γ 1, α 0.5
``bad_teacher`` distil on D_r ∪ D_f: KL from the student to the competent teacher (the      epochs 10, Adam
             original model) on retain samples and to an incompetent (randomly              lr 0.01, wd 0, T 1
             re-initialised copy) on forget samples
``cfk``      freeze all but the last k blocks, fine-tune those on D_r with ℓ +             k 2, epochs 10,
             (c/2)‖θ−θ₀‖² (plain SGD, LR ×0.1 after epochs ⌊.5E⌋, ⌊.8E⌋, ⌊.9E⌋)             lr 0.01, c 0.1
``euk``      as ``cfk`` but the last k blocks are first re-initialised (exact unlearning   as cfk
             of those layers)
``fisher``   Fisher forgetting: θ ← θ + sqrt(v)·N(0, I), v = α / (diag Fisher on D_r)      alpha 3e-6
             with Golatkar et al.'s clamps and per-row averaging
``influence`` θ ← θ + α·(H_r + damping·I)⁻¹ (1/n)Σ_{i∈D_f}∇ℓ_i (LiSSA, as certified)        alpha 1, damping
                                                                                            0.01, scale 1000,
                                                                                            depth 1000
============ ============================================================================ ==================

"Blocks" for CF-k/EU-k (Deep Unlearn uses ResNet stages and ViT layers, which a generic model lacks): the
model's parameterised sub-modules in registration order, descending into ``nn.Sequential``/``nn.ModuleList``
containers, with every normalisation layer joined to the block before it. For torchvision's ResNet-18
the last 2 blocks are ``layer4[1]`` and ``fc`` (Deep Unlearn's k=1: all of ``layer4`` and ``fc``); for an MLP
the last two Linear layers.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset

from .. import ops
from ..data import loader as make_loader
from .base import Method, register_method
from .common import batches, device_of, make_sgd, run_epochs, sample_ids
from .certified import batch_sampler, lissa_inverse_hvp, mean_loss_grad

Tensor = torch.Tensor


# ------------------------------------------------------------------------------------------ helpers

Objective = Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor]


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _sgd(params, hp) -> torch.optim.Optimizer:
    return make_sgd(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])


def _fit(model: nn.Module, data, opt, epochs: int, objective: Objective,
         lr_at: Optional[Callable[[int], float]] = None) -> int:
    """``epochs`` passes of :func:`.common.run_epochs` (train mode, one ``opt`` step per batch on
    ``objective(model, x, y, ids)``, stopping before a non-finite loss); ``lr_at(epoch)`` sets each epoch's
    LR. Returns the number of steps."""
    steps = 0
    for epoch in range(int(epochs)):
        if lr_at is not None:
            _set_lr(opt, lr_at(epoch))
        stats = run_epochs(model, data, opt, 1, objective)
        steps += stats["steps"]
        if stats["diverged"]:
            break
    return steps


def _cross_entropy(model: nn.Module, x: Tensor, y: Tensor, ids: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _sq_dist(params: Sequence[Tensor], start: Sequence[Tensor]) -> Tensor:
    """‖θ − θ₀‖² over a list of parameters (differentiable in θ)."""
    return sum((p - p0).pow(2).sum() for p, p0 in zip(params, start))


def _step_decay(base_lr: float, epochs: int, rate: float) -> Callable[[int], float]:
    """LR × rate^(number of milestones ⌊.5E⌋, ⌊.8E⌋, ⌊.9E⌋ below the epoch) — repdistiller's schedule."""
    milestones = [int(epochs * 0.5), int(epochs * 0.8), int(epochs * 0.9)]
    return lambda epoch: base_lr * rate ** sum(epoch > m for m in milestones)


class MaskedSGD:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) whose every step is one ``ops.masked_sgd_`` call with
    explicit masks: selected coordinates take SGD's step, the others the step on ``off_scale``·grad
    (``off_scale=0``: bitwise unchanged, weight decay and momentum included). Buffers start at zero, which
    reproduces SGD's first step (buf = d). Parameters without a gradient are skipped, as SGD does."""

    def __init__(self, params, masks: Sequence[Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, off_scale: float = 0.0):
        self.params = list(params)
        self.masks = list(masks)
        self.param_groups = [{"lr": float(lr)}]
        self.momentum, self.weight_decay, self.off_scale = float(momentum), float(weight_decay), float(off_scale)
        self.buffers = [torch.zeros_like(p) for p in self.params] if momentum else []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, masks: Optional[Sequence[Tensor]] = None) -> None:
        masks = self.masks if masks is None else masks
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        ops.masked_sgd_([self.params[i] for i in live], [self.params[i].grad for i in live],
                        [self.buffers[i] for i in live] if self.buffers else [], [masks[i] for i in live],
                        lr=self.param_groups[0]["lr"], momentum=self.momentum, dampening=0.0,
                        weight_decay=self.weight_decay, off_scale=self.off_scale)


def _relabel_forget(y: Tensor, ids: Tensor, forget_ids: Tensor, num_classes: int,
                    generator: torch.Generator) -> Tensor:
    """A fresh uniform label in {0..K−1} for every forget sample of the batch (Deep Unlearn's
    ``RandomRelabelDataset`` draws one per access, so a sample gets a new label every time it is seen)."""
    is_forget = torch.isin(ids, forget_ids).to(y.device)
    y = y.clone()
    n = int(is_forget.sum())
    if n:
        y[is_forget] = torch.randint(num_classes, (n,), generator=generator).to(y.device)
    return y


def _random_label_epochs(model, forget, retain, opt, epochs: int, seed: int) -> int:
    """SRL's training (also SalUn's second phase): each epoch one shuffled pass over D_r ∪ D_f with the
    forget samples relabelled at random on every visit."""
    forget_ids = sample_ids(forget)
    data = make_loader(ConcatDataset([forget.dataset, retain.dataset]), batch_size=retain.batch_size,
                       shuffle=True, seed=seed)
    gen = torch.Generator().manual_seed(int(seed))

    def objective(m, x, y, ids):
        out = m(x)
        return F.cross_entropy(out, _relabel_forget(y, ids, forget_ids, out.shape[1], gen))
    return _fit(model, data, opt, epochs, objective)


def _accumulate_grads(model: nn.Module, loaders: Sequence) -> None:
    """Sum into ``.grad`` the gradients of ``sign · mean-batch cross-entropy`` for (loader, sign) pairs."""
    device = device_of(model)
    model.zero_grad(set_to_none=True)
    for data, sign in loaders:
        for x, y, _ in batches(data, device):
            (sign * F.cross_entropy(model(x), y)).backward()


def _grads(params: Sequence[Tensor]) -> List[Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _reinit_(modules: Sequence[nn.Module], seed: int) -> None:
    """Fresh default initialisation (each module's ``reset_parameters``), seeded, global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for root in modules:
            for m in root.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def blocks(model: nn.Module) -> List[List[nn.Module]]:
    """The model's blocks for CF-k/EU-k (module docstring), first to last."""
    out: List[List[nn.Module]] = []

    def visit(module):
        for child in module.children():
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, (nn.Sequential, nn.ModuleList)):
                visit(child)
            elif isinstance(child, _NORMS) and out:
                out[-1].append(child)
            else:
                out.append([child])
    visit(model)
    return out


def _conv2d_weights(model: nn.Module) -> List[nn.Parameter]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def transpose_conv_kernels_(weights: Sequence[Tensor]) -> None:
    """weight[o, i, h, w] → weight[o, i, w, h] in place for every 4-D conv weight (CT). A non-square kernel
    changes shape, as in the original."""
    for w in weights:
        if w.shape[2] == w.shape[3]:
            w.copy_(w.transpose(2, 3).clone())
        else:
            w.data = w.transpose(2, 3).contiguous()


# ------------------------------------------------------------------------------------------ methods

@register_method
class GradientAscent(Method):
    """GA: SGD on −ℓ(D_f) (Deep Unlearn ``gradient_ascent.py``, after Unlearn-Sparse's GA)."""

    name = "ga"
    defaults = {"epochs": 10, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}

    def _run(self, model, forget, retain, store, hp):
        opt = make_sgd(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                       weight_decay=hp["weight_decay"], maximize=True)
        return {"steps": _fit(model, forget, opt, hp["epochs"], _cross_entropy)}


@register_method
class NegGradPlus(Method):
    """NG+: minimise α[ℓ(D_r) + (wd/2)‖θ−θ₀‖²] − (1−α)ℓ(D_f) (Deep Unlearn ``neggradplus.py``, after SCRUB).

    One epoch = one pass over D_r, each retain batch paired with the next forget batch (forget cycled). The
    model stays in eval mode, as in that code: BatchNorm running statistics are frozen and dropout is off.
    ``weight_decay`` is the coefficient of the proximal term (the optimizer itself has none).
    """

    name = "ng_plus"
    needs_retain = True
    defaults = {"epochs": 10, "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "alpha": 0.95}

    def _run(self, model, forget, retain, store, hp):
        device = device_of(model)
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        opt = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])
        alpha, wd = hp["alpha"], hp["weight_decay"]
        model.eval()
        steps = 0
        for _ in range(int(hp["epochs"])):
            for (xr, yr, _), (xf, yf, _) in zip(batches(retain, device),
                                                itertools.cycle(list(batches(forget, device)))):
                retain_loss = F.cross_entropy(model(xr), yr)
                if wd:
                    retain_loss = retain_loss + wd / 2 * _sq_dist(params, start)
                loss = alpha * retain_loss - (1 - alpha) * F.cross_entropy(model(xf), yf)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
        return {"steps": steps}


@register_method
class SuccessiveRandomLabels(Method):
    """SRL: SGD on D_r ∪ D_f with a fresh random label for a forget sample at every visit
    (Deep Unlearn ``successive_random_labels.py``; labels uniform over all K classes, as there)."""

    name = "srl"
    needs_retain = True
    defaults = {"epochs": 5, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "seed": 0}

    def _run(self, model, forget, retain, store, hp):
        opt = _sgd(model.parameters(), hp)
        return {"steps": _random_label_epochs(model, forget, retain, opt, hp["epochs"], hp["seed"])}


@register_method
class SalUn(Method):
    """SalUn (Fan et al., ICLR 2024) as Deep Unlearn runs it (``salun.py``): a saliency mask from the forget
    gradient, then random-label training that moves only the masked weights.

    Mask: the global top ``threshold`` fraction of |Σ_b ∇(−ℓ_b)| over D_f batches across all parameters —
    exactly keep_count(N, threshold) of the N weights (SalUn's code keeps ⌊threshold·N⌋; the package's
    selection rule is the ceiling, ties to the lower flat index). Computed with the model in eval mode.
    Training steps go through ``ops.masked_sgd_`` with that mask and ``off_scale=0``, so unmasked weights and
    their momentum stay bitwise unchanged even with momentum or weight decay (SalUn's grad-times-mask
    followed by ``optimizer.step()`` lets weight decay and momentum move them; with the default momentum 0
    and weight decay 0 the two agree).
    """

    name = "salun"
    needs_retain = True
    defaults = {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "threshold": 0.5, "seed": 0}

    @staticmethod
    def saliency_mask(model: nn.Module, forget, threshold: float) -> List[Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        model.eval()
        _accumulate_grads(model, [(forget, -1.0)])
        grads = _grads(params)
        model.zero_grad(set_to_none=True)
        flat = ops.layerwise_topk_mask([torch.cat([g.reshape(-1) for g in grads])], threshold)[0]
        return [m.view_as(p) for m, p in zip(torch.split(flat, [p.numel() for p in params]), params)]

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        masks = self.saliency_mask(model, forget, hp["threshold"])
        opt = MaskedSGD(params, masks, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        steps = _random_label_epochs(model, forget, retain, opt, hp["epochs"], hp["seed"])
        kept = sum(int(m.sum()) for m in masks)
        return {"steps": steps, "mask_fraction": kept / sum(m.numel() for m in masks)}


def triangular_lr(base_lr: float, epochs: int) -> Callable[[int], float]:
    """MSG's per-epoch LR (Deep Unlearn's ``LinearAnnealingLR`` with E+1 total and ⌊(E+1)/2⌋ warm-up steps):
    epoch e uses base·t/a for t = e+1 ≤ a, else base·(E+1−t)/(E+1−a)."""
    a, total = (epochs + 1) // 2, epochs + 1
    return lambda e: base_lr * ((e + 1) / a if e + 1 <= a else (total - e - 1) / (total - a))


class _ConvMethod(Method):
    """A method that acts on Conv2d kernels: unsupported on a model without any."""

    @classmethod
    def unsupported(cls, model: nn.Module) -> Optional[str]:
        return None if _conv2d_weights(model) else "the model has no nn.Conv2d layer (this method acts on conv kernels)"


@register_method
class MaskedSmallGradients(_ConvMethod):
    """MSG, Deep Unlearn's "kgltop2" (a NeurIPS'23 unlearning-challenge entry).

    1. g = Σ_b ∇ℓ_b on a random subset of |D_f| retain samples (batches of the forget loader's size) minus
       Σ_b ∇ℓ_b on D_f, model in eval mode.
    2. For every Conv2d weight: mask = its keep_count(n, ``init_rate``) entries of smallest |g| (one
       ``ops.layerwise_topk_mask(largest=False)`` call over all conv weights; the original keeps round(p·n));
       those entries get fresh Kaiming-normal (fan_out, ReLU) values, the others keep theirs.
    3. Fine-tune on D_r for ``epochs`` with the triangular LR (:func:`triangular_lr`), SGD with momentum and
       weight decay through ``ops.masked_sgd_``: the re-initialised entries take the full gradient, the rest
       of each conv weight ``off_scale``·gradient (0.1), all other parameters the full gradient. In the
       original the masked conv layers stay in place for the whole fine-tune, so the damped update and the
       triangular-LR fine-tune are one phase, as here.
    """

    name = "msg"
    needs_retain = True
    defaults = {"epochs": 5, "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "init_rate": 0.3,
                "off_scale": 0.1, "seed": 0}

    def _run(self, model, forget, retain, store, hp):
        convs = _conv2d_weights(model)
        gen = torch.Generator().manual_seed(int(hp["seed"]))
        n_forget = len(forget.dataset)
        subset = torch.randperm(len(retain.dataset), generator=gen)[:n_forget].tolist()
        model.eval()
        _accumulate_grads(model, [(DataLoader(Subset(retain.dataset, subset), batch_size=forget.batch_size), 1.0),
                                  (forget, -1.0)])
        conv_masks = ops.layerwise_topk_mask(_grads(convs), hp["init_rate"], largest=False)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for w, m in zip(convs, conv_masks):
                fresh = nn.init.kaiming_normal_(torch.empty(w.shape), mode="fan_out", nonlinearity="relu",
                                                generator=gen).to(w)
                w.copy_(torch.where(m, fresh, w))
        params = [p for p in model.parameters() if p.requires_grad]
        by_id = {id(w): m for w, m in zip(convs, conv_masks)}
        masks = [by_id.get(id(p), torch.ones_like(p, dtype=torch.bool)) for p in params]
        opt = MaskedSGD(params, masks, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                        off_scale=hp["off_scale"])
        steps = _fit(model, retain, opt, hp["epochs"], _cross_entropy, lr_at=triangular_lr(hp["lr"], hp["epochs"]))
        return {"steps": steps, "reinitialised": [int(m.sum()) for m in conv_masks]}


@register_method
class ConvTranspose(_ConvMethod):
    """CT, Deep Unlearn's "kgltop5": swap the two spatial axes of every Conv2d kernel (weight[o, i, h, w] →
    weight[o, i, w, h]), then fine-tune on D_r with SGD and a per-epoch cosine LR (T_max = epochs)."""

    name = "ct"
    needs_retain = True
    defaults = {"epochs": 3, "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}

    def _run(self, model, forget, retain, store, hp):
        convs = _conv2d_weights(model)
        transpose_conv_kernels_(convs)
        epochs = int(hp["epochs"])
        steps = _fit(model, retain, _sgd(model.parameters(), hp), epochs, _cross_entropy,
                     lr_at=lambda e: hp["lr"] * (1 + math.cos(math.pi * e / epochs)) / 2)
        return {"steps": steps, "transposed": len(convs)}


def _kl_t(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """Hinton's distillation loss KL(softmax(t/T) ‖ softmax(s/T))·T², mean over the batch (repdistiller)."""
    return F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1),
                    reduction="batchmean") * T * T


@register_method
class SCRUB(Method):
    """SCRUB (Kurmanji et al., NeurIPS 2023) as Deep Unlearn's ``scrubv2.py`` runs it: teacher = frozen copy
    of the model; for epoch e = 1..E, LR by the step schedule, then if e ≤ ``max_epochs`` one pass over D_f
    minimising −KL_T(teacher‖student), then one pass over D_r minimising γ·ℓ + α·KL_T (student in train
    mode, one SGD optimizer). While the student equals the teacher the KL and its gradient are zero, so the
    first max pass moves nothing (as in the original); the min steps break the tie and later max passes push
    the student away on D_f. Not reproduced: the final pick among per-epoch checkpoints, which needs a
    validation loader."""

    name = "scrub"
    needs_retain = True
    defaults = {"epochs": 5, "max_epochs": 3, "lr": 5e-4, "momentum": 0.9, "weight_decay": 5e-4,
                "lr_decay_rate": 0.1, "temperature": 2.0, "gamma": 1.0, "alpha": 0.5}

    def _run(self, model, forget, retain, store, hp):
        teacher = copy.deepcopy(model).eval()
        T = hp["temperature"]
        opt = _sgd(model.parameters(), hp)
        lr_at = _step_decay(hp["lr"], hp["epochs"], hp["lr_decay_rate"])

        def teacher_out(x):
            with torch.no_grad():
                return teacher(x)

        def max_step(m, x, y, ids):  # forget pass: move away from the teacher
            return -_kl_t(m(x), teacher_out(x), T)

        def min_step(m, x, y, ids):  # retain pass: stay with the teacher and the labels
            out = m(x)
            return hp["gamma"] * F.cross_entropy(out, y) + hp["alpha"] * _kl_t(out, teacher_out(x), T)

        steps = {"max": 0, "min": 0}
        for epoch in range(1, int(hp["epochs"]) + 1):
            _set_lr(opt, lr_at(epoch))
            if epoch <= hp["max_epochs"]:
                steps["max"] += run_epochs(model, forget, opt, 1, max_step)["steps"]
            steps["min"] += run_epochs(model, retain, opt, 1, min_step)["steps"]
        return {"steps": steps["max"] + steps["min"], "max_steps": steps["max"], "min_steps": steps["min"]}


@register_method
class BadTeacher(Method):
    """Bad Teacher (Chundawat et al., AAAI 2023) as in Deep Unlearn's ``bad_teacher.py``: Adam on
    KL(teacher_mix ‖ student) at temperature T over shuffled D_r ∪ D_f, where the teacher is the original
    model for retain samples and an incompetent teacher — a copy of the model re-initialised with each
    layer's default initialisation (Deep Unlearn builds a random torchvision ResNet-18) — for forget
    samples. KL is averaged over the batch ("batchmean"; the original's element mean only rescales the loss,
    which Adam ignores)."""

    name = "bad_teacher"
    needs_retain = True
    defaults = {"epochs": 10, "lr": 0.01, "weight_decay": 0.0, "temperature": 1.0, "seed": 0}

    def _run(self, model, forget, retain, store, hp):
        competent = copy.deepcopy(model).eval()
        incompetent = copy.deepcopy(model)
        _reinit_([incompetent], hp["seed"])
        incompetent.eval()
        forget_ids = sample_ids(forget)
        data = make_loader(ConcatDataset([retain.dataset, forget.dataset]), batch_size=retain.batch_size,
                           shuffle=True, seed=hp["seed"])
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        T = hp["temperature"]

        def objective(m, x, y, ids):
            is_forget = torch.isin(ids, forget_ids).to(x.device).unsqueeze(1)
            with torch.no_grad():
                target = torch.where(is_forget, F.softmax(incompetent(x) / T, dim=1),
                                     F.softmax(competent(x) / T, dim=1))
            return F.kl_div(F.log_softmax(m(x) / T, dim=1), target, reduction="batchmean")
        return {"steps": _fit(model, data, opt, hp["epochs"], objective)}


class _LastBlocks(Method):
    """CF-k / EU-k (Goel et al.; Deep Unlearn's ``catastrophic_forgetting_k.py`` / ``exact_unlearning_k.py``,
    after SCRUB's code): only the last ``k`` blocks (module docstring) train, on D_r, with plain SGD (no
    momentum, as in that code), loss ℓ + (c/2)‖θ−θ₀‖² over the trained parameters (θ₀ = their values when
    fine-tuning starts, c = ``l2_to_init``) and LR ×``lr_decay_rate`` after epochs ⌊.5E⌋, ⌊.8E⌋, ⌊.9E⌋.
    Frozen blocks are in eval mode (their BatchNorm statistics do not move); trained blocks are in train
    mode (Deep Unlearn keeps the whole model in eval mode, which would leave re-initialised BatchNorm
    layers of EU-k with reset statistics). ``requires_grad`` flags are restored afterwards."""

    needs_retain = True
    reinitialise = False
    defaults = {"k": 2, "epochs": 10, "lr": 0.01, "lr_decay_rate": 0.1, "l2_to_init": 0.1}

    def _run(self, model, forget, retain, store, hp):
        all_blocks = blocks(model)
        k = int(hp["k"])
        if not 1 <= k <= len(all_blocks):
            raise ValueError(f"{self.name}: k must be in [1, {len(all_blocks)}] for this model, got {k}")
        trained = [m for block in all_blocks[-k:] for m in block]
        if self.reinitialise:
            _reinit_(trained, hp["seed"])
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            params = [p for m in trained for p in m.parameters()]
            for p in params:
                p.requires_grad_(True)
            start = [p.detach().clone() for p in params]
            c = hp["l2_to_init"]

            def objective(m, x, y, ids):
                m.eval()  # run_epochs puts the whole model in train mode: frozen blocks back to eval
                for block in trained:
                    block.train()
                return F.cross_entropy(m(x), y) + c / 2 * _sq_dist(params, start)
            steps = _fit(model, retain, torch.optim.SGD(params, lr=hp["lr"]), hp["epochs"], objective,
                         lr_at=_step_decay(hp["lr"], hp["epochs"], hp["lr_decay_rate"]))
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return {"steps": steps, "trained_parameters": sum(p.numel() for p in params)}


@register_method
class CatastrophicForgettingK(_LastBlocks):
    __doc__ = _LastBlocks.__doc__
    name = "cfk"


@register_method
class ExactUnlearningK(_LastBlocks):
    __doc__ = _LastBlocks.__doc__ + " EU-k first re-initialises the last k blocks (seeded)."
    name = "euk"
    reinitialise = True
    defaults = {**_LastBlocks.defaults, "seed": 0}


@register_method
class FisherForgetting(Method):
    """Fisher forgetting (Golatkar et al., CVPR 2020) with the rule of Deep Unlearn's ``fisher.py``:
    F = (1/B) Σ_batches Σ_y mean_i p(y|x_i) · (∇_θ mean-batch ℓ(x, y))² on D_r (model in eval mode), then
    v = α·min(1/(F + 1e-8), 1e3) (1e2 for the classifier, detected as a parameter whose first dimension is
    the number of classes), averaged over dim 1 for matrices, ×10 for the classifier and for 1-D parameters,
    and θ ← θ + sqrt(v)·N(0, I) (seeded). Default α = 3e-6 is Golatkar et al.'s; Deep Unlearn starts its
    search at 0.2 (from Unlearn-Sparse), which gives noise std up to ~45 per weight and wipes small models.
    """

    name = "fisher"
    needs_retain = True
    defaults = {"alpha": 3e-6, "seed": 0}

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        device = device_of(model)
        fisher = [torch.zeros_like(p) for p in params]
        model.eval()
        n_batches, num_classes = 0, None
        for x, _, _ in batches(retain, device):
            out = model(x)
            num_classes = out.shape[1]
            prob = F.softmax(out, dim=1).detach().mean(0)
            for c in range(num_classes):
                target = torch.full((len(x),), c, dtype=torch.long, device=device)
                grads = torch.autograd.grad(F.cross_entropy(out, target), params, retain_graph=True)
                for acc, g in zip(fisher, grads):
                    acc.addcmul_(g, g, value=float(prob[c]))
            n_batches += 1
        gen = torch.Generator(device=device).manual_seed(int(hp["seed"]))
        with torch.no_grad():
            for p, f in zip(params, fisher):
                classifier = p.shape[0] == num_classes
                var = (1.0 / (f / n_batches + 1e-8)).clamp(max=1e2 if classifier else 1e3) * hp["alpha"]
                if p.ndim > 1:
                    var = var.mean(dim=1, keepdim=True).expand_as(p)
                if classifier or p.ndim == 1:
                    var = var * 10
                p.add_(var.sqrt() * torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype))
        return {"fisher_batches": n_batches}


@register_method
class InfluenceUnlearning(Method):
    """Influence-function unlearning: θ ← θ + α·H̃⁻¹ v with v = (1/n) Σ_{i∈D_f} ∇ℓ_i (n = |D_f| + |D_r|) — the
    first-order effect of deleting D_f from the empirical risk — and H̃ = H_r + damping·I, H_r the Hessian of
    the mean retain loss at θ (eval mode). H̃⁻¹v is the LiSSA estimate of :mod:`.certified` (random retain
    batches of ``batch_size``; ``scale`` must exceed H's largest eigenvalue, ``depth``/``scale`` caps the gain).
    Deep Unlearn's ``iu.py`` (from Unlearn-Saliency's "Wfisher") instead uses v = (n_f/n)(mean ∇ℓ_f − mean
    ∇ℓ_r), a single-vector Sherman–Morrison recursion over ≤1000 per-sample retain gradients, and α = 0.2;
    that recursion tracks one vector, not the WoodFisher inverse, so the damped-Hessian LiSSA is used here.
    """

    name = "influence"
    needs_retain = True
    defaults = {"alpha": 1.0, "damping": 0.01, "scale": 1000.0, "depth": 1000, "repeats": 1, "batch_size": 32,
                "seed": 0}

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        model.eval()
        v, n_forget = mean_loss_grad(model, forget, params)
        n = n_forget + len(retain.dataset)
        torch._foreach_mul_(v, n_forget / n)
        step = lissa_inverse_hvp(model, params, v, batch_sampler(retain.dataset, hp["batch_size"], hp["seed"],
                                                                 params[0].device),
                                 damping=hp["damping"], scale=hp["scale"], depth=hp["depth"], repeats=hp["repeats"])
        with torch.no_grad():
            torch._foreach_add_(params, step, alpha=hp["alpha"])
        return {"step_norm": float(torch.cat([s.reshape(-1) for s in step]).norm()) * abs(hp["alpha"])}

"""Fine-tuning only the last blocks: CF-k and EU-k (Goel et al., "Towards Adversarial Evaluations for Inexact
Machine Unlearning") as Deep Unlearn runs them — ``munl/unlearning/catastrophic_forgetting_k.py`` and
``exact_unlearning_k.py`` with ``scrub_utils.fk_finetune`` (after SCRUB's ``small_scale_unlearning.ipynb``)
and ``munl/models`` (``select_last_k_blocks``, ``get_model_classifier``, ``init_weights``), in
github.com/xcadet/deepunlearn.

**Blocks.** The original takes the last k of ResNet-18's stages (``layer1``…``layer4``) or TinyViT's
``layers``, plus the classifier (``fc``/``head``); its default k = 1 trains all of ``layer4`` and ``fc``.
Here (:func:`blocks`, :func:`classifier`): the classifier is the model's last ``nn.Linear``; the blocks are
found from the top of the module tree — a child that holds transformer ``layers`` (an ``nn.TransformerEncoder``,
torchvision's ViT encoder) stands for those layers; a container that holds the classifier, or is the only
other parameterised child of its parent, is looked into; every other parameterised child is one block,
and a normalisation layer joins the block before it. For torchvision's ResNet-18 that is the stem,
``layer1``…``layer4`` (so k = 1 is the original's ``layer4`` + ``fc``); for ResNet-9 its six stages; for
LeNet, VGG and AlexNet each conv (with its BatchNorm) and each hidden linear layer; for an MLP each hidden
linear layer; for the ViTs each encoder layer (the final norm joined to the last).
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..base import Method, register_method
from ..common import STOP_HPARAMS, forget_stop, run_epochs, set_lr, squared_distance
from ..hparams import AT_LEAST_ONE, NONNEGATIVE
from ..schedules import step_decay

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def classifier(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (its output layer)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer to serve as its classifier")
    return linears[-1]


def blocks(model: nn.Module) -> List[List[nn.Module]]:
    """The model's blocks, first to last, the classifier excluded (module docstring)."""
    head = classifier(model)
    out: List[List[nn.Module]] = []

    def add(child: nn.Module) -> None:
        if isinstance(child, _NORMS) and out:
            out[-1].append(child)
        else:
            out.append([child])

    def visit(module: nn.Module) -> None:
        kids = [c for c in module.children() if _has_params(c) and c is not head]
        holds_head = [any(m is head for m in c.modules()) for c in kids]
        others = len(kids) - sum(holds_head)
        for child, has_head in zip(kids, holds_head):
            layers = getattr(child, "layers", None)
            if isinstance(layers, (nn.Sequential, nn.ModuleList)) and not has_head:
                for layer in layers:
                    out.append([layer])
                for rest in child.children():  # e.g. the encoder's final norm
                    if rest is not layers and _has_params(rest):
                        add(rest)
            elif has_head or (others == 1 and isinstance(child, (nn.Sequential, nn.ModuleList))):
                visit(child)
            else:
                add(child)
    visit(model)
    return out


def _init_weights(m: nn.Module) -> None:
    """Deep Unlearn's ``init_weights`` for one module."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_uniform_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@torch.no_grad()
def deep_unlearn_init_(modules) -> None:
    """``module.apply(init_weights)`` for each module, as Deep Unlearn's ``reinialize_modules``: Conv2d
    Kaiming-uniform (fan_out, ReLU) and zero bias; BatchNorm2d weight 1, bias 0 (running statistics kept);
    Linear Xavier-uniform, zero bias. Other layer types keep their values, as there."""
    for module in modules:
        module.apply(_init_weights)


class _LastBlocks(Method):
    """CF-k: only the last ``k`` blocks (1) and the classifier train, on D_r, for ``epochs`` (10) with plain
    SGD (lr 0.01; no momentum, no weight decay — ``fk_finetune``'s optimizer) on ℓ + (c/2)‖θ−θ₀‖² over the
    trained parameters (θ₀ = their values when fine-tuning starts, c = ``l2_to_init``, 0.1) and the LR
    ×``lr_decay_rate`` (0.1) after epochs ⌊.5E⌋, ⌊.8E⌋, ⌊.9E⌋. The whole model is in eval mode throughout,
    as in the original (BatchNorm statistics never move, dropout is off). ``requires_grad`` flags are
    restored afterwards. Strength knob (epochs, lr): ``stop_forget_acc`` / ``stop_every_step``
    (:data:`..common.STOP_HPARAMS`, default off) end CF-k's fine-tune once forget accuracy is at most a
    target; EU-k, whose re-initialisation forgets and whose fine-tune repairs, keeps the most-repaired state
    still within the target (``ForgetAccuracyStop.repair``)."""

    needs_retain = True
    reinitialise = False
    defaults = {"k": 1, "epochs": 10, "lr": 0.01, "lr_decay_rate": 0.1, "l2_to_init": 0.1, **STOP_HPARAMS}
    ranges = {"k": AT_LEAST_ONE, "lr_decay_rate": NONNEGATIVE, "l2_to_init": NONNEGATIVE}

    def _run(self, model, forget, retain, store, hp):
        stop = forget_stop(self.name, model, forget, hp, repair=self.reinitialise)
        all_blocks = blocks(model)
        k = hp["k"]
        if not all_blocks:
            raise ValueError(f"{self.name}: the model has no block besides its classifier")
        if k > len(all_blocks):
            raise ValueError(f"{self.name}: k must be in [1, {len(all_blocks)}] for this model, got {k}")
        trained = [m for block in all_blocks[-k:] for m in block] + [classifier(model)]
        if self.reinitialise:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hp["seed"])
                deep_unlearn_init_(trained)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            params = list(dict.fromkeys(p for m in trained for p in m.parameters()))
            for p in params:
                p.requires_grad_(True)
            start = [p.detach().clone() for p in params]
            c = hp["l2_to_init"]
            opt = torch.optim.SGD(params, lr=hp["lr"])
            lr_at = step_decay(hp["lr"], hp["epochs"], hp["lr_decay_rate"])

            def objective(m, x, y, ids):
                return nn.functional.cross_entropy(m(x), y) + c / 2 * squared_distance(params, start)
            stats = run_epochs(model, retain, opt, hp["epochs"], objective, stop, stop_every_step=hp["stop_every_step"],
                               on_epoch=lambda e: set_lr(opt, lr_at(e)), train_mode=False)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return {**stats, "trained_parameters": sum(p.numel() for p in params)}


@register_method
class CatastrophicForgettingK(_LastBlocks):
    __doc__ = _LastBlocks.__doc__
    name = "cfk"


@register_method
class ExactUnlearningK(_LastBlocks):
    __doc__ = _LastBlocks.__doc__ + """

    EU-k first re-initialises the trained blocks and the classifier with Deep Unlearn's ``init_weights``
    (:func:`deep_unlearn_init_`, under ``seed``; BatchNorm running statistics are kept, as there)."""
    name = "euk"
    reinitialise = True
    defaults = {**_LastBlocks.defaults, "seed": 0}

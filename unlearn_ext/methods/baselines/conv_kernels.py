"""Methods that act on convolution kernels, both NeurIPS'23 unlearning-challenge entries as Deep Unlearn runs
them (github.com/xcadet/deepunlearn): MSG, its "kgltop2" (``munl/unlearning/kgltop2.py``), and CT, its
"kgltop5" (``munl/unlearning/kgltop5.py``). Defaults are that code's ``ORIGINAL_*`` values; batch sizes are
those of the loaders passed (Deep Unlearn: 64). Both report themselves unsupported
(``Method.unsupported``) on a model without ``nn.Conv2d`` layers. Both forget by a kernel change and repair
by fine-tuning on D_r; their strength knob is that repair: with ``stop_forget_acc`` / ``stop_every_step``
(:data:`.common.STOP_HPARAMS`, default off — the original behaviour) the repair runs in full and the model
ends at its most-repaired state whose forget accuracy is still at most the target
(``ForgetAccuracyStop.repair``; ``steps`` up to that state, ``steps_run`` all).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ... import ops
from ...optim import PartialSGD
from ..base import Method, register_method
from ..common import STOP_HPARAMS, cross_entropy, dataset_of, forget_stop, make_sgd, run_epochs, set_lr
from ..gradients import summed_batch_grads
from ..hparams import AT_LEAST_ONE, NONNEGATIVE, RATIO
from ..schedules import cosine, triangular

Tensor = torch.Tensor


def conv2d_layers(model: nn.Module) -> List[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@torch.no_grad()
def transpose_conv_kernels_(weights: Sequence[Tensor]) -> None:
    """weight[o, i, h, w] → weight[o, i, w, h] in place for every 4-D conv weight (CT). A non-square kernel
    changes shape, as in the original."""
    for w in weights:
        if w.shape[2] == w.shape[3]:
            w.copy_(w.transpose(2, 3).clone())
        else:
            w.data = w.transpose(2, 3).contiguous()


@torch.no_grad()
def fresh_conv_values(conv: nn.Conv2d, generator: torch.Generator):
    """What a newly built ``nn.Conv2d`` followed by ``kaiming_normal_(fan_out, relu)`` holds (MSG's new
    ``MaskConv2d``): Kaiming-normal weights and, if the layer has a bias, PyTorch's default conv bias
    U(−1/√fan_in, 1/√fan_in). Returns (weight, bias or None) on the layer's device."""
    w = conv.weight
    weight = nn.init.kaiming_normal_(torch.empty(w.shape), mode="fan_out", nonlinearity="relu",
                                     generator=generator).to(w)
    bias = None
    if conv.bias is not None:
        fan_in = w.shape[1] * w[0, 0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
        bias = torch.empty(conv.bias.shape).uniform_(-bound, bound, generator=generator).to(conv.bias)
    return weight, bias


class _ConvMethod(Method):
    """A method that acts on Conv2d kernels: unsupported on a model without any."""

    @classmethod
    def unsupported(cls, model: nn.Module) -> Optional[str]:
        return None if conv2d_layers(model) else "the model has no nn.Conv2d layer (this method acts on conv kernels)"


@register_method
class MaskedSmallGradients(_ConvMethod):
    """MSG (Deep Unlearn's "kgltop2"):

    1. g = Σ_b ∇ℓ_b on a random subset of |D_f| retain samples (shuffled batches of ``grad_batch_size``, 64)
       minus Σ_b ∇ℓ_b on the D_f batches, with the model in train mode — as the original runs it (it sets no
       mode, and its pipeline hands over a freshly loaded model, in train mode; BatchNorm statistics follow
       these batches).
    2. For every Conv2d: mask = the keep_count(n, ``init_rate``) weight entries of smallest |g| (one
       ``ops.layerwise_topk_mask(largest=False)`` call over all conv weights; the original keeps round(p·n),
       the same count when p·n is an integer or its fraction exceeds ½, else one fewer); those entries get fresh
       Kaiming-normal (fan_out, ReLU) values, the others keep theirs, and the conv's bias is re-initialised
       with PyTorch's default (the original builds a new conv module, whose bias is fresh)
       (:func:`fresh_conv_values`, seeded).
    3. Fine-tune on D_r for ``epochs`` (5), train mode, with the triangular LR (:func:`..schedules.triangular`,
       base 1e-3), SGD momentum 0.9 and weight decay 5e-4 through :class:`~unlearn_ext.optim.PartialSGD`
       with fixed masks: the re-initialised entries take the full gradient, the rest of each conv weight
       ``off_scale``·gradient (0.1; weight decay and momentum act in full, as on the original's masked
       gradient), all other parameters the full gradient.
    """

    name = "msg"
    needs_retain = True
    defaults = {"epochs": 5, "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "init_rate": 0.3,
                "off_scale": 0.1, "grad_batch_size": 64, "seed": 0, **STOP_HPARAMS}
    ranges = {"init_rate": RATIO, "off_scale": NONNEGATIVE, "grad_batch_size": AT_LEAST_ONE}

    def _run(self, model, forget, retain, store, hp):
        stop = forget_stop(self.name, model, forget, hp, repair=True)
        convs = conv2d_layers(model)
        gen = torch.Generator().manual_seed(hp["seed"])
        retain_set = dataset_of(self.name, "retain", retain)
        subset = torch.randperm(len(retain_set), generator=gen)[:len(dataset_of(self.name, "forget", forget))]
        snip = DataLoader(Subset(retain_set, subset.tolist()), batch_size=hp["grad_batch_size"], shuffle=True,
                          generator=gen)
        model.train()
        grads = summed_batch_grads(model, [(snip, 1.0), (forget, -1.0)], [c.weight for c in convs])
        conv_masks = ops.layerwise_topk_mask(grads, hp["init_rate"], largest=False)
        with torch.no_grad():
            for conv, m in zip(convs, conv_masks):
                weight, bias = fresh_conv_values(conv, gen)
                conv.weight.copy_(torch.where(m, weight, conv.weight))
                if bias is not None:
                    conv.bias.copy_(bias)
        params = [p for p in model.parameters() if p.requires_grad]
        by_id = {id(c.weight): m for c, m in zip(convs, conv_masks)}
        masks = [by_id.get(id(p), torch.ones_like(p, dtype=torch.bool)) for p in params]
        opt = PartialSGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                         masks=masks, off_scale=hp["off_scale"])
        lr_at = triangular(hp["lr"], hp["epochs"])
        stats = run_epochs(model, retain, opt, hp["epochs"], cross_entropy, stop, stop_every_step=hp["stop_every_step"],
                           on_epoch=lambda e: set_lr(opt, lr_at(e)))
        return {**stats, "reinitialised": [int(m.sum()) for m in conv_masks]}


@register_method
class ConvTranspose(_ConvMethod):
    """CT (Deep Unlearn's "kgltop5"): swap the two spatial axes of every Conv2d kernel (weight[o, i, h, w] →
    weight[o, i, w, h]), then fine-tune on D_r in train mode for ``epochs`` (3) with SGD (lr 1e-3,
    momentum 0.9, weight decay 5e-4) and a per-epoch cosine LR (T_max = epochs)."""

    name = "ct"
    needs_retain = True
    defaults = {"epochs": 3, "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, **STOP_HPARAMS}

    def _run(self, model, forget, retain, store, hp):
        stop = forget_stop(self.name, model, forget, hp, repair=True)
        convs = conv2d_layers(model)
        transpose_conv_kernels_([c.weight for c in convs])
        opt = make_sgd(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        lr_at = cosine(hp["lr"], hp["epochs"])
        stats = run_epochs(model, retain, opt, hp["epochs"], cross_entropy, stop, stop_every_step=hp["stop_every_step"],
                           on_epoch=lambda e: set_lr(opt, lr_at(e)))
        return {**stats, "transposed": len(convs)}

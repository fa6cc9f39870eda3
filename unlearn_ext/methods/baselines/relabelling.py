"""Training on D_r ∪ D_f with random labels for the forget samples — Deep Unlearn's ``srl``
(``munl/unlearning/successive_random_labels.py``) and ``salun`` (``munl/unlearning/salun.py``, after
github.com/OPTML-Group/Unlearn-Saliency ``generate_mask.py`` and ``unlearn/RL.py``), in
github.com/xcadet/deepunlearn. Defaults are that code's; the combined loader is re-batched at the retain
loader's batch size (Deep Unlearn: 256 for both).

Each epoch is one shuffled pass over D_r ∪ D_f in which every forget sample gets a fresh label drawn
uniformly from all K classes (its own included) each time it is seen — Deep Unlearn's
``RandomRelabelDataset`` draws one per access; a forget sample is one whose id is a forget id, so the two
sets must not share ids (:attr:`~unlearn_ext.methods.base.Method.mixes_by_id`). Both have a strength knob
(epochs): ``stop_forget_acc`` / ``stop_every_step`` (:data:`.common.STOP_HPARAMS`, default off).
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset

from ... import ops
from ...data import loader as make_loader
from ...optim import PartialSGD
from ..base import Method, register_method
from ..common import (STOP_HPARAMS, batch_size_of, check_labels, dataset_of, forget_stop, gradient_masks, make_sgd,
                      run_epochs, sample_ids)
from ..gradients import summed_batch_grads
from ..hparams import RATIO

Tensor = torch.Tensor


def relabel_forget(y: Tensor, ids: Tensor, forget_ids: Tensor, num_classes: int,
                   generator: torch.Generator) -> Tensor:
    """``y`` with a fresh uniform label in {0..K−1} for every forget sample of the batch."""
    is_forget = torch.isin(torch.as_tensor(ids).cpu(), forget_ids).to(y.device)
    y = y.clone()
    n = int(is_forget.sum())
    if n:
        y[is_forget] = torch.randint(num_classes, (n,), generator=generator).to(y.device)
    return y


def random_label_epochs(name: str, model: nn.Module, forget, retain, opt, hp: dict) -> dict:
    """``hp["epochs"]`` shuffled passes over D_r ∪ D_f with the forget samples relabelled at random on every
    visit (:func:`relabel_forget`), stopping as ``hp`` asks; :func:`.common.run_epochs`' stats."""
    stop = forget_stop(name, model, forget, hp)
    forget_ids = sample_ids(name, "forget", forget).cpu()
    data = make_loader(ConcatDataset([dataset_of(name, "forget", forget), dataset_of(name, "retain", retain)]),
                       batch_size=batch_size_of(retain), shuffle=True, seed=hp["seed"])
    gen = torch.Generator().manual_seed(hp["seed"])

    def objective(m, x, y, ids):
        out = m(x)
        check_labels(y, out.shape[1])
        return F.cross_entropy(out, relabel_forget(y, ids, forget_ids, out.shape[1], gen))
    return run_epochs(model, data, opt, hp["epochs"], objective, stop, stop_every_step=hp["stop_every_step"])


@register_method
class SuccessiveRandomLabels(Method):
    """SRL: SGD (lr 0.1, momentum 0.9, weight decay 5e-4 — Deep Unlearn's generic defaults, its scheduler
    unused by this method) for ``epochs`` (5) random-label passes over D_r ∪ D_f, model in train mode."""

    name = "srl"
    needs_retain = True
    mixes_by_id = True
    defaults = {"epochs": 5, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "seed": 0, **STOP_HPARAMS}

    def _run(self, model, forget, retain, store, hp):
        opt = make_sgd(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        return random_label_epochs(self.name, model, forget, retain, opt, hp)


@register_method
class SalUn(Method):
    """SalUn (Fan et al., ICLR 2024): a saliency mask from the forget gradient, then SRL's training through
    the mask. SGD lr 0.01, momentum 0, weight decay 0, ``epochs`` 10, ``threshold`` 0.5 (Deep Unlearn's).

    Mask: the global top ``threshold`` fraction of |Σ_b ∇(−ℓ_b)| over the D_f batches across all parameters,
    model in eval mode — ``keep_count(N, threshold)`` = ⌈threshold·N⌉ of the N weights by the package's
    selection rule (``ops.layerwise_topk_mask`` on the concatenated gradient, ties to the lower flat index),
    where the original keeps ⌊threshold·N⌋ (the same count when threshold·N is an integer, else one fewer).

    Training multiplies each gradient by the mask before a plain SGD step (``freeze_unmasked=False``, the
    original's ``param.grad *= mask``; with momentum or weight decay they still move masked-out weights).
    ``freeze_unmasked=True`` steps through :class:`~unlearn_ext.optim.PartialSGD` with the mask instead, so
    masked-out weights and their momentum stay bitwise unchanged (``masked_sgd_``'s rule). At the defaults
    (momentum 0, weight decay 0) the two are the same update.
    """

    name = "salun"
    needs_retain = True
    mixes_by_id = True
    defaults = {"epochs": 10, "lr": 0.01, "momentum": 0.0, "weight_decay": 0.0, "threshold": 0.5, "seed": 0,
                "freeze_unmasked": False, **STOP_HPARAMS}
    ranges = {"threshold": RATIO}

    @staticmethod
    def saliency_mask(model: nn.Module, forget, threshold: float) -> List[Tensor]:
        params = [p for p in model.parameters() if p.requires_grad]
        was_training = model.training
        model.eval()
        grads = summed_batch_grads(model, [(forget, -1.0)], params)
        model.train(was_training)
        flat = ops.layerwise_topk_mask([torch.cat([g.reshape(-1) for g in grads])], threshold)[0]
        return [m.view_as(p) for m, p in zip(torch.split(flat, [p.numel() for p in params]), params)]

    def _run(self, model, forget, retain, store, hp):
        params = [p for p in model.parameters() if p.requires_grad]
        masks = self.saliency_mask(model, forget, hp["threshold"])
        sgd = dict(lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        if hp["freeze_unmasked"]:
            stats = random_label_epochs(self.name, model, forget, retain, PartialSGD(params, masks=masks, **sgd), hp)
        else:
            with gradient_masks(params, masks):
                stats = random_label_epochs(self.name, model, forget, retain, torch.optim.SGD(params, **sgd), hp)
        kept = sum(int(m.sum()) for m in masks)
        return {**stats, "mask_fraction": kept / sum(m.numel() for m in masks)}

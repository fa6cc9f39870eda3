"""Algorithm 2 of Gogineni & Nadimi: label-flipping unlearning, naive and layer-wise partial (docs/algorithms.md#label-flip).

Every forget sample gets a wrong label — uniform over the K − 1 other classes, drawn once per sample
(seeded) and kept for the whole run — and the model is trained on D_f with those labels by SGD at the
model's learning rate for E epochs, or until forget accuracy has fallen to a target (option).

* ``label_flip`` (naive): a full SGD update each step.
* ``partial_label_flip`` (layer-wise partial): each step, in each parameter tensor, only the
  kˡ = keep_count(nˡ, r) coordinates of largest |∇| move — the M-max partial update, one
  ``masked_sgd_(masks=None)`` call through :class:`~unlearn_ext.optim.PartialSGD`; every other
  coordinate stays bitwise as it was. ``selection="random"`` / ``"round_robin"`` give the other
  partial-update rules of that literature (see :mod:`unlearn_ext.optim`).

Choices where the paper leaves room: plain SGD (momentum 0, no weight decay; both are options), the
model in train mode, the stopping rule checked before every epoch, or before every step with
``stop_every_step=True`` (see :func:`.common.run_epochs`).
The fixed wrong label of sample ``i`` is ``(y_i + o_i) mod K`` with ``o_i`` uniform in {1 … K−1}, so it is
never the true label and is uniform over the others.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Method, register_method
from ..common import STOP_HPARAMS, check_labels, forget_stop, make_sgd, output_width, run_epochs, sample_labels
from ..hparams import RATIO

Tensor = torch.Tensor


class FlippedLabels:
    """A wrong label per sample id, drawn on first sight from a seeded generator and fixed afterwards."""

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.table = torch.full((0,), -1, dtype=torch.int64)  # id -> flipped label, -1 = not drawn yet

    def __call__(self, y: Tensor, ids: Tensor, num_classes: int) -> Tensor:
        if num_classes < 2:
            raise ValueError(f"label flipping needs at least 2 classes, got {num_classes}")
        check_labels(y, num_classes)  # (y + o) mod K of an out-of-range y would be a silent wrong label
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError(f"sample ids must be >= 0 (they index the table of flipped labels), got {int(ids.min())}")
        if ids.numel() and int(ids.max()) >= len(self.table):
            grown = torch.full((int(ids.max()) + 1,), -1, dtype=torch.int64)
            grown[:len(self.table)] = self.table
            self.table = grown
        unseen = self.table[ids] < 0
        if unseen.any():
            offset = torch.randint(1, num_classes, (int(unseen.sum()),), generator=self.generator)
            self.table[ids[unseen]] = (y.detach().cpu()[unseen] + offset) % num_classes
        return self.table[ids].to(y.device)


@register_method
class LabelFlip(Method):
    """Naive label-flipping unlearning (Algorithm 2 with full updates).

    Hyper-parameters: ``epochs`` E (5; the paper sweeps E and gives no single value); ``lr`` — the
    model's learning rate (1e-3, the paper's shallow-model rate; the experiment runner passes each
    model's); ``momentum`` (0) and ``weight_decay`` (0) of the SGD;
    ``seed`` of the label draw (0; K is the model's output width);
    ``stop_forget_acc`` — None (run E epochs), a number, or ``"original_test"`` (the original model's
    accuracy on ``test_loader``) — stop once forget accuracy is at most it; ``stop_every_step`` (False: the
    rule is checked before each epoch; True: before each step, one evaluation pass over D_f per step).
    """

    name = "label_flip"
    defaults = {"epochs": 5, "lr": 1e-3, "momentum": 0.0, "weight_decay": 0.0, "seed": 0,
                **STOP_HPARAMS, "test_loader": None}
    uses_model_lr = True  # Algorithm 2 trains at the model's learning rate
    budget_in_forget_passes = True

    def _optimizer(self, model, hp):
        return make_sgd(model.parameters(), hp["lr"], hp["momentum"], hp["weight_decay"])

    def _run(self, model, forget, retain, store, hp):
        try:  # every label is flipped: check them all before the first step
            check_labels(sample_labels(forget), output_width(model, forget))
        except ValueError as e:
            raise ValueError(f"{self.name}: {e}") from None
        stop = forget_stop(self.name, model, forget, hp)
        flipped = FlippedLabels(hp["seed"])

        def objective(model, x, y, ids):
            out = model(x)
            return F.cross_entropy(out, flipped(y, ids, out.shape[1]))  # K = the model's output width

        return run_epochs(model, forget, self._optimizer(model, hp), hp["epochs"], objective, stop,
                          stop_every_step=hp["stop_every_step"])


@register_method
class PartialLabelFlip(LabelFlip):
    """Layer-wise partial label-flipping unlearning (Algorithm 2): as :class:`LabelFlip`, but each step moves
    only ``keep_count(nˡ, keep_ratio)`` coordinates per parameter tensor. Extra hyper-parameters:
    ``keep_ratio`` r (0.1; the paper sweeps {0.01, 0.05, 0.1, 0.2, 0.5}) and ``selection``
    ("magnitude" = M-max, default | "random" | "round_robin")."""

    name = "partial_label_flip"
    defaults = {**LabelFlip.defaults, "keep_ratio": 0.1, "selection": "magnitude"}
    takes_run_keep_ratio = True
    ranges = {"keep_ratio": RATIO}

    def _optimizer(self, model, hp):
        return make_sgd(model.parameters(), hp["lr"], hp["momentum"], hp["weight_decay"],
                        keep_ratio=hp["keep_ratio"], selection=hp["selection"], seed=hp["seed"])

"""Teacher–student methods: SCRUB (Kurmanji et al., NeurIPS 2023) as Deep Unlearn's
``munl/unlearning/scrubv2.py`` runs it (after github.com/meghdadk/SCRUB's ``MIA_experiments.ipynb``, with
repdistiller's ``train_distill``), and Bad Teacher (Chundawat et al., AAAI 2023) as Deep Unlearn's
``munl/unlearning/bad_teacher.py`` (after vikram2000b/bad-teaching-unlearning), in
github.com/xcadet/deepunlearn. Defaults are that code's ``ORIGINAL_*`` values; batch sizes are those of
the loaders passed (Deep Unlearn: SCRUB retain 32 / forget 64, Bad Teacher 256).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset

from ...data import loader as make_loader
from ...metrics import accuracy
from ..base import Method, register_method
from ..common import (STOP_HPARAMS, batch_size_of, batches, dataset_of, device_of, forget_stop, make_sgd, run_epochs,
                      sample_ids, sample_labels, set_lr)
from ..hparams import NONNEGATIVE, POSITIVE
from ..schedules import step_decay

Tensor = torch.Tensor


def distill_kl(student: Tensor, teacher: Tensor, T: float) -> Tensor:
    """Hinton's distillation loss KL(softmax(t/T) ‖ softmax(s/T))·T², summed over classes and averaged over
    the batch (repdistiller's ``DistillKL``)."""
    return F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1),
                    reduction="batchmean") * T * T


@torch.no_grad()
def error_on_classes(model: nn.Module, data, classes: Tensor) -> float:
    """1 − top-1 accuracy over the samples of ``data`` whose label is in ``classes`` (eval mode, restored)."""
    was_training = model.training
    model.eval()
    wrong = total = 0
    for x, y, _ in batches(data, device_of(model)):
        keep = torch.isin(y, classes.to(y.device))
        wrong += int((model(x[keep]).argmax(1) != y[keep]).sum()) if keep.any() else 0
        total += int(keep.sum())
    model.train(was_training)
    return wrong / max(total, 1)


@register_method
class SCRUB(Method):
    """SCRUB: teacher = frozen copy of the model (eval mode); for epoch e = 1..E (``epochs``, 5), LR by the
    step schedule (lr 5e-4 × ``lr_decay_rate`` 0.1 after epochs ⌊.5E⌋, ⌊.8E⌋, ⌊.9E⌋), then if e ≤
    ``max_epochs`` (3) one pass over D_f minimising −KL_T(teacher‖student), then one pass over D_r minimising
    γ·ℓ + α·KL_T (γ 1, α 0.5, T 2), student in train mode, one SGD optimizer (momentum 0.9, weight decay
    5e-4). While the student equals the teacher the KL and its gradient are zero, so the first max pass
    moves nothing (as in the original); the min steps break the tie and later max passes push the student
    away on D_f. (The original's β·0 "other distillation" term and its zero-distance smoothing term, the
    student's distance to itself, add nothing and are left out.)

    Checkpoint choice (``val_loader``, a loader of a validation split): the original records the forget
    error and the error on the validation samples of the forget set's classes before every epoch and after
    the last, keeps the student after every epoch, and returns the one whose forget error is closest to the
    last validation error; when that is the starting point it returns the last student. That rule runs
    when ``val_loader`` is given (stats ``selected_epoch``); without one (the default — the method gets no
    validation data unless passed) the last student is returned.
    """

    name = "scrub"
    needs_retain = True
    defaults = {"epochs": 5, "max_epochs": 3, "lr": 5e-4, "momentum": 0.9, "weight_decay": 5e-4,
                "lr_decay_rate": 0.1, "temperature": 2.0, "gamma": 1.0, "alpha": 0.5, "val_loader": None}
    ranges = {"lr_decay_rate": NONNEGATIVE, "temperature": POSITIVE}

    def _run(self, model, forget, retain, store, hp):
        teacher = copy.deepcopy(model).eval()
        T = hp["temperature"]
        opt = make_sgd(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        lr_at = step_decay(hp["lr"], hp["epochs"], hp["lr_decay_rate"])
        val = hp["val_loader"]
        classes = sample_labels(forget).unique().cpu() if val is not None else None

        def teacher_out(x):
            with torch.no_grad():
                return teacher(x)

        def max_step(m, x, y, ids):  # forget pass: move away from the teacher
            return -distill_kl(m(x), teacher_out(x), T)

        def min_step(m, x, y, ids):  # retain pass: stay with the teacher and the labels
            out = m(x)
            return hp["gamma"] * F.cross_entropy(out, y) + hp["alpha"] * distill_kl(out, teacher_out(x), T)

        forget_err, val_err, kept = [], [], []

        def record():
            forget_err.append(1.0 - accuracy(model, forget))
            val_err.append(error_on_classes(model, val, classes))

        steps = {"max": 0, "min": 0}
        for epoch in range(1, hp["epochs"] + 1):
            set_lr(opt, lr_at(epoch))
            if val is not None:
                record()
            if epoch <= hp["max_epochs"]:
                steps["max"] += run_epochs(model, forget, opt, 1, max_step)["steps"]
            steps["min"] += run_epochs(model, retain, opt, 1, min_step)["steps"]
            if val is not None:
                kept.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        stats = {"steps": steps["max"] + steps["min"], "max_steps": steps["max"], "min_steps": steps["min"]}
        if val is not None and kept:
            record()
            selected = min(range(len(forget_err)), key=lambda i: abs(forget_err[i] - val_err[-1]))
            if selected != 0:
                model.load_state_dict(kept[selected - 1])
            stats.update(selected_epoch=selected if selected else len(kept), forget_errors=forget_err,
                         val_errors=val_err)
        return stats


@register_method
class BadTeacher(Method):
    """Bad Teacher: Adam (lr 0.01, weight decay 0) for ``epochs`` (10) over shuffled D_r ∪ D_f on
    KL(teacher_mix ‖ student) at temperature T (1), student in train mode, where the teacher is the original
    model for retain samples and an incompetent teacher — a copy of the model re-initialised with each layer's
    default initialisation (Deep Unlearn builds a random torchvision ResNet-18, i.e. the same model with
    fresh weights), both in eval mode — for forget samples. The KL is ``F.kl_div``'s default element mean,
    as in the original. Strength knob (epochs): ``stop_forget_acc`` / ``stop_every_step`` (default off)."""

    name = "bad_teacher"
    needs_retain = True
    mixes_by_id = True  # the teacher of a sample is chosen by its id
    defaults = {"epochs": 10, "lr": 0.01, "weight_decay": 0.0, "temperature": 1.0, "seed": 0, **STOP_HPARAMS}
    ranges = {"temperature": POSITIVE}

    def _run(self, model, forget, retain, store, hp):
        stop = forget_stop(self.name, model, forget, hp)
        competent = copy.deepcopy(model).eval()
        incompetent = reinitialised_copy(model, hp["seed"]).eval()
        forget_ids = sample_ids(self.name, "forget", forget).cpu()
        data = make_loader(ConcatDataset([dataset_of(self.name, "retain", retain),
                                          dataset_of(self.name, "forget", forget)]),
                           batch_size=batch_size_of(retain), shuffle=True, seed=hp["seed"])
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        T = hp["temperature"]

        def objective(m, x, y, ids):
            is_forget = torch.isin(torch.as_tensor(ids).cpu(), forget_ids).to(x.device).unsqueeze(1)
            with torch.no_grad():
                target = torch.where(is_forget, F.softmax(incompetent(x) / T, dim=1),
                                     F.softmax(competent(x) / T, dim=1))
            # F.kl_div's reduction="mean" (the original's default): the element mean
            return F.kl_div(F.log_softmax(m(x) / T, dim=1), target, reduction="sum") / target.numel()
        return run_epochs(model, data, opt, hp["epochs"], objective, stop, stop_every_step=hp["stop_every_step"])


def reinitialised_copy(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with every sub-module's ``reset_parameters()`` (BatchNorm statistics included),
    seeded, the global RNG state untouched."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in fresh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return fresh

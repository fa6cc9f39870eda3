"""The references every unlearning result is read against (docs/algorithms.md#neighbouring-methods): Retrain and FT.

* ``retrain`` — the gold standard: train a freshly initialised model on D_r with the original recipe
  (``train_config``, a :class:`~unlearn_ext.train.TrainConfig`; default ``TrainConfig()``, the paper's
  8 epochs of Adam at 1e-3). The fresh weights come from ``model_factory()`` when given, else from every
  sub-module's ``reset_parameters()`` (BatchNorm running statistics included), all under ``seed`` with
  the global RNG state restored afterwards. The model is changed in place, like every method's. Batches
  are those of the ``retain`` loader (``train_config.batch_size`` does not re-batch it).
* ``finetune`` (FT) — ``epochs`` (2) further epochs of the recipe's optimizer on D_r at ``lr`` (1e-3; the
  experiment runner passes each model's learning rate); it can stop at a forget accuracy
  (``stop_forget_acc``), which the evaluation protocol's calibration uses.
"""
from __future__ import annotations

import torch

from ..train import TrainConfig, train
from .base import Method, register_method
from .common import STOP_HPARAMS, device_of, finetune, forget_stop


@register_method
class Retrain(Method):
    """Retrain from scratch on D_r. Hyper-parameters: ``train_config`` (None → ``TrainConfig()``),
    ``model_factory`` (None → re-initialise the given model's modules), ``seed`` (0)."""

    name = "retrain"
    needs_retain = True
    defaults = {"train_config": None, "model_factory": None, "seed": 0}

    def _run(self, model, forget, retain, store, hp):
        cfg = hp["train_config"] or TrainConfig()
        device = device_of(model)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(int(hp["seed"]))
            if hp["model_factory"] is not None:
                model.load_state_dict(hp["model_factory"]().state_dict())
            else:
                for m in model.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            train(model, retain, cfg)
        return {"epochs": cfg.epochs, "steps": cfg.epochs * len(retain)}


@register_method
class Finetune(Method):
    """FT: fine-tune on D_r. Hyper-parameters: ``epochs`` (2), ``lr`` (1e-3), ``train_config`` (the
    optimizer recipe; None → ``TrainConfig()``, Adam). Strength knob (epochs, lr): ``stop_forget_acc`` /
    ``stop_every_step`` (:data:`.common.STOP_HPARAMS`, default off) stop once forget accuracy has fallen to a
    target; ``steps`` is then the steps taken."""

    name = "finetune"
    needs_retain = True
    defaults = {"epochs": 2, "lr": 1e-3, "train_config": None, **STOP_HPARAMS}
    uses_model_lr = True  # FT runs the training recipe

    def _run(self, model, forget, retain, store, hp):
        stats = finetune(model, retain, hp["train_config"], hp["epochs"], hp["lr"],
                         forget_stop(self.name, model, forget, hp), hp["stop_every_step"])
        return {**stats, "steps": stats["finetune_steps"]}

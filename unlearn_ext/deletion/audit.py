"""What a request did to the model, measured on the data it was trained from (optional per request).

:class:`Audit` evaluates a model state — a ``state_dict`` loaded into a fresh registry model — on three
things: accuracy on the request's forgotten ids (``forget_accuracy``), accuracy on the validation half of
the test split (``validation_accuracy``: the same seeded half the evaluation protocol calibrates on), and
the loss-LR membership attack with the forgotten ids as members and validation samples as non-members
(``loss_lr_mia``: its accuracy, 0.5 when the attack cannot tell them apart). The attack needs at least 10
forgotten ids (10-fold cross-validation); with fewer it is ``None`` and ``loss_lr_mia_note`` says why.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .. import data, models
from ..metrics.accuracy import accuracy_of
from ..metrics.mia import loss_lr_mia_from_losses
from ..metrics.outputs import collect_outputs
from ..protocol.splits import validation_split

MIN_ATTACK_MEMBERS = 10


class Audit:
    """``audit(state) -> dict`` for one request's ``ids`` (module docstring): ``splits`` is the data set the
    model was trained on (ids are its training sample ids), ``model`` the registry name that builds it,
    ``seed`` the run's (it picks the validation half)."""

    def __init__(self, splits: data.DataSplits, model: str, ids: Sequence[int], seed: int = 0) -> None:
        ids_t = torch.as_tensor(list(ids), dtype=torch.int64)
        unknown = ids_t[~torch.isin(ids_t, splits.train.ids)]
        if unknown.numel():
            raise ValueError(f"--dataset: {unknown.numel()} id(s) are not training sample ids of {splits.name}, e.g. "
                             f"{unknown[:5].tolist()}")
        self.splits, self.model_name = splits, model
        self.forget = splits.train.subset(torch.isin(splits.train.ids, ids_t).nonzero().view(-1))
        self.validation = validation_split(splits.test, seed)[0]

    def __call__(self, state: Mapping[str, torch.Tensor]) -> dict:
        net = models.make_model(self.model_name, self.splits.input_shape, self.splits.num_classes)
        net.load_state_dict(dict(state))
        forget = collect_outputs(net, data.loader(self.forget, 512))
        validation = collect_outputs(net, data.loader(self.validation, 512))
        out = {"forget_accuracy": accuracy_of(forget), "validation_accuracy": accuracy_of(validation),
               "n_forget": len(forget), "n_validation": len(validation), "loss_lr_mia": None}
        if len(forget) < MIN_ATTACK_MEMBERS:
            out["loss_lr_mia_note"] = (f"{len(forget)} forgotten id(s): the attack needs at least "
                                       f"{MIN_ATTACK_MEMBERS} members")
        else:
            out["loss_lr_mia"] = loss_lr_mia_from_losses(forget.loss.numpy(), validation.loss.numpy())["accuracy"]
        return out


__all__ = ["Audit", "MIN_ATTACK_MEMBERS"]

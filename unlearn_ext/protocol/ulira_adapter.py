"""Any registered method as U-LiRA's ``unlearn_fn`` (:func:`unlearn_ext.metrics.ulira`): the attack lives in
:mod:`unlearn_ext.metrics`, below the methods, so the adapter that runs a method for it lives here."""
from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from ..data import loader
from ..methods import unlearn
from ..metrics.ulira import UnlearnFn


def method_unlearn_fn(method, batch_size: int = 128, **hparams) -> UnlearnFn:
    """``unlearn_fn`` for :func:`~unlearn_ext.metrics.ulira`: ``unlearn_ext.methods.unlearn(method, model,
    forget=..., retain=..., **hparams)`` with loaders of ``batch_size`` (forget in order, retain shuffled with
    the run's seed). ``method`` is a registered name, a Method class or an instance."""

    def run(model: nn.Module, forget_set: Dataset, retain_set: Dataset, seed: int) -> nn.Module:
        unlearn(method, model, forget=loader(forget_set, batch_size),
                retain=loader(retain_set, batch_size, shuffle=True, seed=seed), **hparams)
        return model
    return run

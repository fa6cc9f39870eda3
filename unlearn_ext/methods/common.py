"""Loops and pieces shared by unlearning methods (reusable by any method family).

* :func:`device_of`, :func:`batches`, :func:`cycle`, :func:`sample_ids` — data plumbing for loaders of
  ``(x, y, sample_id)`` batches.
* :func:`accuracy` — top-1 accuracy in eval mode (methods sit below :mod:`unlearn_ext.metrics` in the
  dependency order, so they cannot import it).
* :func:`make_sgd` — ``torch.optim.SGD`` for a naive method, :class:`~unlearn_ext.optim.PartialSGD` for
  its layer-wise partial variant, from one set of arguments.
* :class:`ForgetAccuracyStop` / :func:`stop_rule` — "stop when forget accuracy has fallen to a target"
  (a number, or the original model's accuracy on a test loader), checked before every epoch.
* :func:`run_epochs` — epochs of ``opt`` steps on a per-batch objective with optional stopping; what
  label flipping and gradient ascent are built from.
* :func:`finetune` — a few epochs of the training recipe on a loader (FT, naive amnesiac's fine-tune).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from ..optim import PartialSGD
from ..train import TrainConfig, train

Tensor = torch.Tensor


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batches(loader, device) -> Iterator:
    """``(x, y, ids)`` of each batch with ``x`` and ``y`` on ``device`` (ids stay where they are)."""
    for x, y, ids in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), ids


def cycle(loader) -> Iterator:
    """Batches of ``loader`` without end: a new pass (a new shuffle) whenever one is exhausted."""
    return itertools.chain.from_iterable(iter(loader) for _ in itertools.count())


def sample_ids(loader) -> Tensor:
    """All sample ids of a loader: read off the dataset when it keeps them (``IndexedTensorDataset.ids``),
    else collected by one pass over the loader."""
    ids = getattr(getattr(loader, "dataset", None), "ids", None)
    if isinstance(ids, Tensor):
        return ids.reshape(-1)
    return torch.cat([torch.as_tensor(i).reshape(-1) for _, _, i in loader])


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    """Top-1 accuracy over ``loader`` in eval mode; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y, _ in batches(loader, device_of(model)):
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def make_sgd(params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, maximize: bool = False,
             keep_ratio: Optional[float] = None, selection: str = "magnitude", seed: int = 0
             ) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` when ``keep_ratio`` is None (naive: every coordinate moves), else
    :class:`PartialSGD` updating ``keep_count(nˡ, keep_ratio)`` coordinates per layer and step."""
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    if keep_ratio is None:
        return torch.optim.SGD(params, **kw)
    return PartialSGD(params, keep_ratio=keep_ratio, selection=selection, seed=seed, **kw)


@dataclasses.dataclass
class ForgetAccuracyStop:
    """Stop once accuracy on ``forget`` is at most ``target``."""

    forget: object
    target: float
    last: Optional[float] = None  # the accuracy last measured

    def reached(self, model: nn.Module) -> bool:
        self.last = accuracy(model, self.forget)
        return self.last <= self.target


def stop_rule(model: nn.Module, forget, target: Union[None, float, str], test_loader=None
              ) -> Optional[ForgetAccuracyStop]:
    """The stopping option shared by the paper's Algorithms 2 and 3: ``None`` (run every epoch), a number
    (stop when forget accuracy ≤ it), or ``"original_test"`` (stop when forget accuracy ≤ the original
    model's accuracy on ``test_loader``, measured now, before unlearning — SPEC §3)."""
    if target is None:
        return None
    if target == "original_test":
        if test_loader is None:
            raise ValueError('stop_forget_acc="original_test" needs test_loader= (a loader of the test set)')
        target = accuracy(model, test_loader)
    elif isinstance(target, str):
        raise ValueError(f'stop_forget_acc must be None, a number or "original_test", got {target!r}')
    return ForgetAccuracyStop(forget, float(target))


def run_epochs(model: nn.Module, loader, opt: torch.optim.Optimizer, epochs: int,
               objective: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor],
               stop: Optional[ForgetAccuracyStop] = None, *, stop_every_step: bool = False) -> dict:
    """Up to ``epochs`` passes over ``loader``, one ``opt`` step per batch on ``objective(model, x, y, ids)``
    (a scalar the optimizer minimises, or maximises when built with ``maximize=True``), model in train
    mode. With ``stop``, the rule is checked before every epoch (``stop_every_step=True``: before every
    step — finer, at the cost of one evaluation pass over the forget set per step) and once at the end, so
    a model already at the target is left untouched. A non-finite objective (gradient ascent run too far)
    ends the run before that step, with ``diverged=True``. Returns ``{"epochs" (completed), "steps",
    "stopped_early", "diverged"[, "forget_acc", "target_forget_acc"]}``."""
    device = device_of(model)
    model.train()
    steps = done = 0
    stopped = diverged = False
    for _ in range(int(epochs)):
        if stop is not None and stop.reached(model):
            stopped = True
            break
        for i, (x, y, ids) in enumerate(batches(loader, device)):
            if stop_every_step and stop is not None and i > 0 and stop.reached(model):
                stopped = True  # (i == 0 was checked just above, before the epoch)
                break
            loss = objective(model, x, y, ids)
            if not torch.isfinite(loss):  # ascent can blow up: stop before a step writes Inf/NaN
                diverged = stopped = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        if stopped:
            break
        done += 1
    stats = {"epochs": done, "steps": steps, "stopped_early": stopped, "diverged": diverged}
    if stop is not None:
        if not stopped or diverged:
            stop.reached(model)
        stats.update(forget_acc=stop.last, target_forget_acc=stop.target)
    return stats


def finetune(model: nn.Module, data, train_config: Optional[TrainConfig], epochs: int,
             lr: Optional[float] = None) -> dict:
    """``epochs`` epochs of the training recipe (``train_config``'s optimizer, default Adam) on ``data``,
    at learning rate ``lr`` (default: the recipe's). Returns ``{"finetune_epochs", "finetune_steps"}``."""
    cfg = dataclasses.replace(train_config or TrainConfig(), epochs=int(epochs),
                              **({} if lr is None else {"lr": float(lr)}))
    train(model, data, cfg)
    return {"finetune_epochs": cfg.epochs, "finetune_steps": cfg.epochs * len(data)}

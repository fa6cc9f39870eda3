"""Loops and pieces shared by unlearning methods (reusable by any method family).

* :func:`device_of`, :func:`batches`, :func:`cycle`, :func:`sample_ids` — data plumbing for loaders of
  ``(x, y, sample_id)`` batches (anything else is a ``ValueError`` saying so: :func:`train.unpack_batch`).
* :func:`loader_positions`, :func:`dataset_of`, :func:`stored_per_sample`, :func:`batch_size_of` — a loader
  stands for the samples it yields: where a method reads the dataset behind a DataLoader (to re-batch it,
  or for its ids and labels without a pass) it honours the loader's sampler, and refuses one it cannot read.
* :func:`check_labels`, :func:`sample_labels`, :func:`output_width` — labels a method indexes by must lie
  in [0, K).
* :func:`make_sgd` — ``torch.optim.SGD`` for a naive method, :class:`~unlearn_ext.optim.PartialSGD` for
  its layer-wise partial variant, from one set of arguments.
* :class:`ForgetAccuracyStop` / :func:`stop_rule` — "stop when forget accuracy has fallen to a target"
  (a number, or the original model's accuracy on a test loader), checked before every epoch or step.
* :func:`run_epochs` — epochs of ``opt`` steps on a per-batch objective with optional stopping and a
  per-epoch hook (LR schedules); what every epoch-looping method is built from. :data:`STOP_HPARAMS` /
  :func:`forget_stop` give a method the stopping hyper-parameters.
* :func:`cross_entropy`, :func:`squared_distance`, :func:`gradient_masks` — objective pieces: the plain
  loss, the proximal term ‖θ − θ₀‖², the original codes' "multiply the gradient by a mask" before a plain
  optimizer step.
* :func:`finetune` — a few epochs of the training recipe on a loader (FT, naive amnesiac's fine-tune).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from numbers import Real
from typing import Callable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset,
                              SubsetRandomSampler)

from ..metrics import accuracy
from ..optim import PartialSGD
from ..train import TrainConfig, make_optimizer, unpack_batch
from . import hparams

Tensor = torch.Tensor


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def batches(loader, device) -> Iterator:
    """``(x, y, ids)`` of each batch with ``x`` and ``y`` on ``device`` (ids stay where they are)."""
    for batch in loader:
        x, y, ids = unpack_batch(batch)
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True), ids


def cycle(loader) -> Iterator:
    """Batches of ``loader`` without end: a new pass (a new shuffle) whenever one is exhausted."""
    return itertools.chain.from_iterable(iter(loader) for _ in itertools.count())


def loader_positions(method: str, role: str, loader) -> Optional[Tensor]:
    """The positions in ``loader.dataset`` of the samples a DataLoader yields, as an int64 tensor; None when
    that is the whole dataset (the default samplers: every item once per pass, shuffled or not) or when
    ``loader`` is no DataLoader over a map-style dataset (read by passing over it). Honoured: SequentialSampler,
    RandomSampler without replacement, SubsetRandomSampler, a sequence of positions, a BatchSampler over one
    of them, a batch sampler that is a list of position lists (``drop_last`` aside: the set is every sample
    the loader draws from). Any other sampler (with replacement, weighted, distributed, a custom class) draws
    a set that cannot be read without drawing it, or that changes from pass to pass: a ``ValueError``
    naming the method and ``role``."""
    positions, reason = _positions(loader)
    if reason is not None:
        raise ValueError(f"{method}: cannot tell which samples the {role} loader yields: {reason}; pass a "
                         "DataLoader over torch.utils.data.Subset(dataset, positions) instead")
    return positions


def _is_map_style(loader) -> bool:
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset)


_HONOURED = ("SequentialSampler, RandomSampler without replacement, SubsetRandomSampler, a sequence of positions "
             "or a BatchSampler over one")


def _positions(loader) -> Tuple[Optional[Tensor], Optional[str]]:
    """:func:`loader_positions` as ``(positions, None)``, or ``(None, why they cannot be read)``."""
    if not _is_map_style(loader):
        return None, None
    if loader.batch_sampler is None:
        return None, "automatic batching is disabled (batch_size=None), so it yields single samples"
    sampler, batched = loader.batch_sampler, True
    if type(sampler) is BatchSampler:  # exact types: a subclass may draw otherwise
        sampler, batched = sampler.sampler, False
    if type(sampler) is RandomSampler and (sampler.replacement or sampler.num_samples != len(sampler.data_source)):
        return None, ("its RandomSampler draws with replacement or a num_samples other than its data's size: "
                      "a different set every pass")
    if type(sampler) in (SequentialSampler, RandomSampler):
        if len(sampler.data_source) == len(loader.dataset):
            return None, None
        sampler = range(len(sampler.data_source))
    elif type(sampler) is SubsetRandomSampler:
        sampler = sampler.indices
    elif isinstance(sampler, str) or not isinstance(sampler, (Sequence, Tensor, np.ndarray)):
        kind = "batch sampler" if batched else "sampler"
        return None, f"its {kind} is a {type(sampler).__name__}, not a {_HONOURED}"
    try:
        parts = [torch.as_tensor(b).reshape(-1) for b in (sampler if batched else [sampler])]
    except (TypeError, ValueError, RuntimeError):
        return None, "its sampler does not hold integer positions"
    parts = [t for t in parts if t.numel()]
    if not parts:
        return torch.zeros(0, dtype=torch.int64), None
    positions = torch.cat(parts)
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        return None, f"its sampler holds {positions.dtype} values, not integer positions"
    n = len(loader.dataset)
    outside = positions[(positions < 0) | (positions >= n)]
    if outside.numel():
        return None, f"its sampler draws position {int(outside[0])}, outside its dataset of {n} samples"
    return positions.long(), None


def dataset_of(method: str, role: str, loader):
    """The samples ``loader`` yields as a map-style dataset, for a method that re-batches a set (e.g. D_f ∪
    D_r shuffled together): ``loader.dataset``, or a ``Subset`` of it at :func:`loader_positions`."""
    if not _is_map_style(loader):
        raise ValueError(f"{method}: {role} must be a torch DataLoader over a map-style dataset (this method "
                         f"re-batches its dataset), got {type(loader).__name__}")
    positions = loader_positions(method, role, loader)
    return loader.dataset if positions is None else Subset(loader.dataset, positions.tolist())


def batch_size_of(loader: DataLoader) -> int:
    """The batch size of a DataLoader, for re-batching its samples alike: its ``batch_size``, else (a batch
    sampler of its own) its batch sampler's, else its largest batch."""
    size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None)
    return int(size) if size else max((len(b) for b in loader.batch_sampler), default=1)


def _stored(dataset, attr: str) -> Optional[Tensor]:
    """The per-sample tensor ``attr`` ("ids", "y") a dataset keeps (an ``IndexedTensorDataset``, also inside
    a ``Subset``), or None."""
    if isinstance(dataset, Subset):
        inner = _stored(dataset.dataset, attr)
        return None if inner is None else inner[torch.as_tensor(dataset.indices, dtype=torch.int64)]
    value = getattr(dataset, attr, None)
    return value if isinstance(value, Tensor) and value.ndim == 1 and len(value) == len(dataset) else None


def stored_per_sample(loader, attr: str) -> Optional[Tensor]:
    """``attr`` ("ids", "y") of every sample ``loader`` yields, read off its dataset without a pass — when
    the dataset keeps it as a tensor and the sampler's positions are known (:func:`loader_positions`);
    else None."""
    if not _is_map_style(loader):
        return None
    stored = _stored(loader.dataset, attr)
    positions, reason = _positions(loader)
    if stored is None or reason is not None:
        return None
    return stored if positions is None else stored[positions]


def sample_ids(method: str, role: str, loader) -> Tensor:
    """All sample ids ``loader`` yields: read off its dataset when it keeps them (:func:`stored_per_sample`),
    else collected by one pass. The ids name the set to act on, so a sampler whose samples cannot be read
    is refused (:func:`loader_positions`) rather than taken at one random draw."""
    loader_positions(method, role, loader)
    ids = stored_per_sample(loader, "ids")
    if ids is not None:
        return ids
    return torch.cat([torch.as_tensor(unpack_batch(b)[2]).reshape(-1) for b in loader])


def check_labels(y: Tensor, num_classes: int) -> None:
    """Labels must be class indices of a model with ``num_classes`` outputs: a method that indexes by
    label (a flipped or random label, a gathered logit) would otherwise give a silent wrong answer."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        bad = int(y.max()) if int(y.max()) >= num_classes else int(y.min())
        raise ValueError(f"label {bad} is out of range for a model with {num_classes} outputs "
                         f"(labels must be in [0, {num_classes}))")


def sample_labels(loader) -> Tensor:
    """Every label ``loader`` yields: read off its dataset when it keeps them (:func:`stored_per_sample`),
    else collected by one pass (what the loader yields, whatever its sampler)."""
    y = stored_per_sample(loader, "y")
    if y is not None:
        return y
    return torch.cat([unpack_batch(b)[1].reshape(-1).cpu() for b in loader])


@torch.no_grad()
def output_width(model: nn.Module, loader) -> int:
    """The number of classes K the model predicts: its output width on the loader's first batch (eval mode,
    no gradient; the mode is restored)."""
    was_training = model.training
    model.eval()
    x, _, _ = next(batches(loader, device_of(model)))
    k = model(x).shape[1]
    model.train(was_training)
    return k


def make_sgd(params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, maximize: bool = False,
             keep_ratio: Optional[float] = None, selection: str = "magnitude", seed: int = 0
             ) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` when ``keep_ratio`` is None (naive: every coordinate moves), else
    :class:`PartialSGD` updating ``keep_count(nˡ, keep_ratio)`` coordinates per layer and step."""
    kw = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
    if keep_ratio is None:
        return torch.optim.SGD(params, **kw)
    return PartialSGD(params, keep_ratio=keep_ratio, selection=selection, seed=seed, **kw)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


@dataclasses.dataclass
class ForgetAccuracyStop:
    """Stop once accuracy on ``forget`` is at most ``target``.

    ``repair=True`` is the rule for a method that forgets by one change (re-initialised or transposed
    weights) and then repairs on D_r, so that forget accuracy rises as the run goes on: run every step and
    keep the most-repaired state whose forget accuracy is still at most ``target`` (:func:`run_epochs`)."""

    forget: object
    target: float
    last: Optional[float] = None  # the accuracy last measured
    repair: bool = False

    def reached(self, model: nn.Module) -> bool:
        self.last = accuracy(model, self.forget)
        return self.last <= self.target


def stop_rule(model: nn.Module, forget, target: Union[None, float, str], test_loader=None
              ) -> Optional[ForgetAccuracyStop]:
    """The stopping option shared by the methods with a strength knob: ``None`` (run every epoch), a number
    in [0, 1] (stop when forget accuracy ≤ it), or ``"original_test"`` (stop when forget accuracy ≤ the
    original model's accuracy on ``test_loader``, measured now, before unlearning — the paper's rule)."""
    if target is None:
        return None
    if isinstance(target, str):
        if target != "original_test":
            raise ValueError(f'stop_forget_acc must be None, a number or "original_test", got {target!r}')
        if test_loader is None:
            raise ValueError('stop_forget_acc="original_test" needs test_loader= (a loader of the test set)')
        target = accuracy(model, test_loader, what="test_loader")
    elif isinstance(target, bool) or not isinstance(target, Real) or not 0.0 <= float(target) <= 1.0:
        raise ValueError(f"stop_forget_acc must be an accuracy in [0, 1], got {target!r}")
    return ForgetAccuracyStop(forget, float(target))


#: The stopping hyper-parameters of a method with a strength knob (see :func:`stop_rule`, :func:`run_epochs`):
#: by default off, the original behaviour. A method that also takes ``test_loader`` accepts
#: ``stop_forget_acc="original_test"``.
STOP_HPARAMS = {"stop_forget_acc": None, "stop_every_step": False}


def forget_stop(method: str, model: nn.Module, forget, hp: dict, *, repair: bool = False
                ) -> Optional[ForgetAccuracyStop]:
    """The :func:`stop_rule` a method's :data:`STOP_HPARAMS` ask for (a bad value: ``ValueError`` naming the
    method); ``repair``: see :class:`ForgetAccuracyStop`."""
    target = hp["stop_forget_acc"]
    if isinstance(target, str) and "test_loader" not in hp:
        raise ValueError(f"{method}: stop_forget_acc must be None or an accuracy in [0, 1], got {target!r}")
    try:
        stop = stop_rule(model, forget, target, hp.get("test_loader"))
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None
    return None if stop is None else dataclasses.replace(stop, repair=repair)


def run_epochs(model: nn.Module, loader, opt: torch.optim.Optimizer, epochs: int,
               objective: Callable[[nn.Module, Tensor, Tensor, Tensor], Tensor],
               stop: Optional[ForgetAccuracyStop] = None, *, stop_every_step: bool = False,
               on_epoch: Optional[Callable[[int], None]] = None, train_mode: bool = True) -> dict:
    """Up to ``epochs`` passes over ``loader``, one ``opt`` step per batch on ``objective(model, x, y, ids)``
    (a scalar the optimizer minimises, or maximises when built with ``maximize=True``). The model is put in
    train mode (``train_mode=False``: eval mode, BatchNorm statistics frozen, as NG+ and CF-k run) before
    every epoch, after ``on_epoch(epoch)`` (0-based; per-epoch LR schedules, fresh iterators) has run.
    With ``stop``, the rule is checked before every epoch (``stop_every_step=True``: before every step —
    finer, at the cost of one evaluation pass over the forget set per step) and once at the end, so a model
    already at the target is left untouched. With a ``repair`` rule every epoch runs and the model ends at the
    last checked state whose forget accuracy was at most the target (``steps`` counts the steps up to it,
    ``steps_run`` all of them); if no check met it, at the end. A non-finite objective (gradient ascent run
    too far) ends the run before that step, with ``diverged=True``. Returns ``{"epochs" (completed),
    "steps", "stopped_early", "diverged"[, "forget_acc", "target_forget_acc"]}``."""
    device = device_of(model)
    steps = done = 0
    stopped = diverged = False
    kept = None  # repair: (state, steps, epochs, forget accuracy) of the last state within the target

    def reached() -> bool:
        nonlocal kept
        if not stop.reached(model):
            return False
        if not stop.repair:
            return True
        kept = ({k: v.detach().clone() for k, v in model.state_dict().items()}, steps, done, stop.last)
        return False

    for epoch in range(int(epochs)):
        if stop is not None and reached():
            stopped = True
            break
        if on_epoch is not None:
            on_epoch(epoch)
        model.train(train_mode)
        for i, (x, y, ids) in enumerate(batches(loader, device)):
            if stop_every_step and stop is not None and i > 0 and reached():
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
            reached()
        if stop.repair and kept is not None:
            state, kept_steps, kept_epochs, stop.last = kept
            model.load_state_dict(state)
            stats.update(steps=kept_steps, epochs=kept_epochs, steps_run=steps, stopped_early=kept_steps < steps)
        stats.update(forget_acc=stop.last, target_forget_acc=stop.target)
    return stats


def cross_entropy(model: nn.Module, x: Tensor, y: Tensor, ids) -> Tensor:
    """The plain objective of :func:`run_epochs`: mean cross-entropy of the batch."""
    return F.cross_entropy(model(x), y)


def squared_distance(params: Sequence[Tensor], start: Sequence[Tensor]) -> Tensor:
    """‖θ − θ₀‖² over a list of parameters (differentiable in θ)."""
    return sum((p - p0).pow(2).sum() for p, p0 in zip(params, start))


@contextlib.contextmanager
def gradient_masks(params: Sequence[Tensor], masks: Sequence[Tensor]):
    """Inside the block every gradient computed for ``params[i]`` is multiplied by ``masks[i]`` — the original
    codes' ``param.grad *= mask`` before a plain ``optimizer.step()``, under which weight decay and momentum
    still move the masked-out weights (SalUn, SFR-on; :class:`~unlearn_ext.optim.PartialSGD` with ``masks=``
    is the variant that freezes them)."""
    handles = [p.register_hook(lambda g, m=m: g * m) for p, m in zip(params, masks)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def finetune(model: nn.Module, data, train_config: Optional[TrainConfig], epochs: int,
             lr: Optional[float] = None, stop: Optional[ForgetAccuracyStop] = None,
             stop_every_step: bool = False) -> dict:
    """``epochs`` epochs of the training recipe (``train_config``'s optimizer, default Adam) on ``data``,
    at learning rate ``lr`` (default: the recipe's), stopping as ``stop`` asks (:func:`run_epochs`); the model
    is left in eval mode, as :func:`~unlearn_ext.train.train` leaves it. Returns ``{"finetune_epochs",
    "finetune_steps"}`` (completed epochs, steps taken) and, with ``stop``, :func:`run_epochs`' stopping
    stats."""
    epochs = hparams.integer("finetune", "epochs", epochs)
    extra = {} if lr is None else {"lr": hparams.real("finetune", "lr", lr, hparams.NONNEGATIVE)}
    cfg = dataclasses.replace(train_config or TrainConfig(), epochs=epochs, **extra)
    stats = run_epochs(model, data, make_optimizer(model.parameters(), cfg), cfg.epochs, cross_entropy, stop,
                       stop_every_step=stop_every_step)
    model.eval()
    out = {"finetune_epochs": stats.pop("epochs"), "finetune_steps": stats.pop("steps")}
    return {**out, **stats} if stop is not None else out

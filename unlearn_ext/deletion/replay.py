"""A recorded run as a fixed plan of batches, and the loop that runs it from any checkpoint: the exact tier's
training (``unlearn-ext train``, ``train --exclude-ids`` and the replay of ``forget --exact`` all run here).

**The plan.** A recipe's run is a list of T batches of training-set positions: epoch e's batches in the order
``data.loader(train, batch_size, shuffle=True, seed=seed)`` yields them (the same generator calls), so plan
step t is the run's optimizer step t, and the store records it as step t. A recipe with ``phases``
(``[[lo, hi, epochs], ...]``: e.g. pretraining on positions 0..49,999, then fine-tuning on 50,000..59,999)
runs each phase's plan over its positions in turn, phase i shuffled with ``seed + i``.

**The exact model for forgotten ids F** is the run of the same plan with every batch stripped of F's samples:

* a batch left empty is skipped — no optimizer step (Adam's step count does not advance), no record — and its
  position keeps counting: step numbers stay plan positions;
* the learning rate of plan step t is ``lr · schedule(t / T)`` (:func:`lr_at`), a function of the position,
  not of the steps taken, so a skipped batch does not shift the schedule;
* BatchNorm normalises a stripped batch by that batch's statistics and updates its running statistics from
  it — what training on that batch from scratch does (a batch stripped to one sample fails in a
  ``BatchNorm1d`` layer exactly as it would from scratch);
* weight decay is the optimizer's (in its state); randomness (dropout) draws from torch's CPU generator,
  whose state each checkpoint keeps.

``train --exclude-ids`` runs this from step 0. A replay runs it from a checkpoint taken at step c ≤ t_min, the
first step whose batch held a forgotten id: every batch before c is the same in both runs, so the state at c
is too, and the rest is the same computation. On the CPU with deterministic kernels and the recipe's thread
count, the two are bitwise equal (``python_tests/test_exact_replay.py``).

**Checkpoints** (``step-<t>.pt``, written atomically every K steps) hold the state before plan step t: the
model's ``state_dict``, the optimizer's ``state_dict`` (moments, step counts, weight decay) and torch's CPU
RNG state. With the recipe (seed, sizes, schedule) and the training data (its digest is in the recipe) that is
everything the rest of the run depends on: one batch per optimizer step (no gradient accumulation) and float32
without a GradScaler, so no step is skipped but the empty ones.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from typing import List, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import data
from ..durable import atomic_save
from ..train import TrainConfig, kernels, make_optimizer, train_step

Tensor = torch.Tensor
SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "sgd")


class _Positions(Dataset):
    """Positions 0..n-1: a data set whose loader yields the batches of positions the training loader yields."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def batch_plan(n: int, batch_size: int, epochs: int, seed: int) -> List[Tensor]:
    """The T batches (int64 positions into the training set) of a run over ``n`` samples (module docstring)."""
    loader = data.loader(_Positions(n), batch_size, shuffle=True, seed=seed)
    return [batch for _ in range(epochs) for batch in loader]


def run_plan_of(recipe: dict, n: int) -> List[Tensor]:
    """The plan of ``recipe``'s run over a training set of ``n`` samples: its phases' plans one after another."""
    phases = recipe.get("phases") or [[0, n, recipe["epochs"]]]
    return [batch + lo for i, (lo, hi, epochs) in enumerate(phases)
            for batch in batch_plan(hi - lo, recipe["batch_size"], epochs, recipe["seed"] + i)]


def parse_phases(text: str, n: int) -> List[List[int]]:
    """``--phases LO:HI:EPOCHS,...`` over a training set of ``n``: ranges of positions in [0, n), each non-empty,
    with at least one epoch; ``ValueError`` naming the flag otherwise."""
    phases = []
    for part in text.split(","):
        words = part.split(":")
        if len(words) != 3 or not all(w.isascii() and w.isdigit() for w in words):
            raise ValueError(f"--phases: {part!r} is not LO:HI:EPOCHS (three non-negative integers)")
        lo, hi, epochs = map(int, words)
        if not (0 <= lo < hi <= n and epochs >= 1):
            raise ValueError(f"--phases: {part!r} needs 0 <= LO < HI <= {n} (the training set's size) and EPOCHS >= 1")
        phases.append([lo, hi, epochs])
    return phases


def lr_at(recipe: dict, step: int, total: int) -> float:
    """The learning rate of plan step ``step`` of ``total``: ``constant``, or ``cosine`` from lr down to 0."""
    if recipe.get("lr_schedule", "constant") == "cosine":
        return recipe["lr"] * 0.5 * (1.0 + math.cos(math.pi * step / total))
    return recipe["lr"]


def make_run_optimizer(model: nn.Module, recipe: dict) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s parameters."""
    return make_optimizer(model.parameters(), TrainConfig(lr=recipe["lr"], optimizer=recipe.get("optimizer", "adam"),
                                                          weight_decay=recipe.get("weight_decay", 0.0)))


def data_digest(train_set: data.IndexedTensorDataset) -> str:
    """SHA-256 of a training set's samples, labels and ids: the recipe names the data it trained on by it."""
    h = hashlib.sha256()
    for t in (train_set.x, train_set.y, train_set.ids):
        t = t.contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def recipe_mode(recipe: dict):
    """Deterministic kernels (when the recipe asked for them) and the recipe's thread count, for the block."""
    return kernels(recipe["deterministic"], recipe.get("threads"))


class Checkpoints:
    """The checkpoints of one trajectory: ``folder/step-<t>.pt``, the state before plan step t (module docstring)."""

    PATTERN = re.compile(r"step-(\d{10})\.pt")

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step-{step:010d}.pt")

    def steps(self) -> List[int]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(int(m.group(1)) for m in map(self.PATTERN.fullmatch, os.listdir(self.folder)) if m)

    def latest_at_or_before(self, step: int) -> Optional[int]:
        return max((s for s in self.steps() if s <= step), default=None)

    def nbytes(self) -> int:
        return sum(os.path.getsize(self.path(s)) for s in self.steps())

    def save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        atomic_save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "rng": torch.get_rng_state()}, self.path(step))

    def load(self, step: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        """Put ``model``, ``opt`` and torch's CPU generator in the state before plan step ``step``."""
        saved = torch.load(self.path(step), map_location="cpu", weights_only=True)
        if saved.get("step") != step:
            raise ValueError(f"{self.path(step)} holds step {saved.get('step')}, not {step}: the checkpoint folder "
                             "was tampered with")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["rng"])

    def link_into(self, other: "Checkpoints", up_to: int) -> None:
        """Hard-link this trajectory's checkpoints at steps ≤ ``up_to`` into ``other``'s folder: a replay from
        ``up_to`` shares them (the two trajectories agree until there)."""
        for s in self.steps():
            if s <= up_to:
                try:
                    os.link(self.path(s), other.path(s))
                except OSError:  # a file system without hard links: a copy holds the same bytes
                    shutil.copyfile(self.path(s), other.path(s))


def run_plan(model: nn.Module, opt: torch.optim.Optimizer, train_set: data.IndexedTensorDataset, plan: List[Tensor],
             recipe: dict, *, start: int = 0, exclude: Optional[Tensor] = None, recorder=None,
             checkpoints: Optional[Checkpoints] = None, every: int = 0, progress: Optional[str] = None) -> int:
    """Run plan steps ``start``..T-1 on ``model`` and ``opt`` (in the state before step ``start``), each batch
    without the ids in ``exclude``; record step t as step t; checkpoint before every step t ≥ ``start`` that is
    a multiple of ``every`` (one already there is kept). Returns the optimizer steps taken."""
    ids, total, taken = train_set.ids, len(plan), 0
    recorders = [] if recorder is None else [recorder]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total - start, desc=progress, leave=False)
    model.train()
    for t in range(start, total):
        if checkpoints is not None and every and t % every == 0 and not os.path.exists(checkpoints.path(t)):
            checkpoints.save(t, model, opt)
        positions = plan[t]
        if exclude is not None:
            positions = positions[~torch.isin(ids[positions], exclude)]
        if positions.numel():
            for group in opt.param_groups:
                group["lr"] = lr_at(recipe, t, total)
            if recorder is not None:
                recorder.step_count = t  # records are numbered by plan position (an empty batch leaves a gap)
            train_step(model, opt, train_set.x[positions], train_set.y[positions], ids[positions], recorders)
            taken += 1
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return taken


__all__ = ["Checkpoints", "OPTIMIZERS", "SCHEDULES", "batch_plan", "parse_phases", "run_plan_of", "data_digest", "lr_at", "make_run_optimizer",
           "recipe_mode", "run_plan"]

"""The training recipe of a recorded run, and the run itself: what `unlearn-ext train` does and its log keeps.

A recipe (a JSON-friendly dict, stored in the request log's header) names everything that decides the trained
weights: data set (name, root, seeded subsample, and the digest of the samples trained on), model, seed
(initialisation and shuffle order), epochs (or phases: ranges of the training set trained in turn), batch size, the optimizer (Adam or SGD), its learning rate,
schedule and weight decay, the ids left out (``--exclude-ids``), the recording (keep ratio, value dtype),
whether deterministic kernels were required, and the thread count (results of the CPU kernels depend on it).
:func:`train_recorded` trains by it, as the plan of :mod:`.replay` says.
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch

from .. import data, models
from ..record import DiskStore, UpdateRecorder
from ..record.identity import VALUE_DTYPE_BY_NAME
from .replay import Checkpoints, data_digest, make_run_optimizer, recipe_mode, run_plan, run_plan_of

def make_recipe(splits: data.DataSplits, model: str, *, root: Optional[str] = None, train_size: Optional[int] = None,
                seed: int = 0, epochs: int = 8, batch_size: int = 128, lr: Optional[float] = None,
                optimizer: str = "adam", lr_schedule: str = "constant", weight_decay: float = 0.0,
                exclude_ids: Sequence[int] = (), phases: Optional[list] = None, keep_ratio: Optional[float] = 0.1, value_dtype: str = "float32",
                deterministic: bool = True) -> dict:
    """The recipe of a run on ``splits`` (module docstring); ``lr`` None: the model's recommended rate."""
    return {"dataset": splits.name, "root": root, "train_size": train_size, "data_sha256": data_digest(splits.train),
            "seed": seed, "model": model, "epochs": epochs, "batch_size": batch_size,
            "lr": lr if lr is not None else models.recommended_lr(model), "optimizer": optimizer,
            "lr_schedule": lr_schedule, "weight_decay": weight_decay, "exclude_ids": sorted(set(map(int, exclude_ids))),
            "phases": phases,
            "keep_ratio": keep_ratio, "value_dtype": value_dtype, "deterministic": deterministic,
            "threads": torch.get_num_threads(), "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes}


def train_recorded(splits: data.DataSplits, recipe: dict, store_path: Optional[str], progress: bool = False,
                   train_set: Optional[data.IndexedTensorDataset] = None, checkpoints: Optional[str] = None,
                   every: int = 0):
    """Train as ``recipe`` says on ``train_set`` (default: ``splits.train``), recording into a new DiskStore at
    ``store_path`` (None: no recording) and, with ``every`` > 0, checkpointing every ``every`` steps into the
    folder ``checkpoints`` (made here). Returns ``(model, store or None, seconds, optimizer steps)``."""
    train_set = splits.train if train_set is None else train_set
    with recipe_mode(recipe):
        torch.manual_seed(recipe["seed"])
        model = models.make_model(recipe["model"], splits.input_shape, splits.num_classes)
        opt = make_run_optimizer(model, recipe)
        store = None if store_path is None else DiskStore(store_path)
        recorder = None if store is None else UpdateRecorder(model, keep_ratio=recipe["keep_ratio"], store=store,
                                                             value_dtype=VALUE_DTYPE_BY_NAME[recipe["value_dtype"]])
        saved = None
        if every:
            os.mkdir(checkpoints)
            saved = Checkpoints(checkpoints)
        plan = run_plan_of(recipe, len(train_set))
        excluded = torch.tensor(recipe.get("exclude_ids", []), dtype=torch.int64)
        start = time.perf_counter()
        steps = run_plan(model, opt, train_set, plan, recipe, exclude=excluded if excluded.numel() else None,
                         recorder=recorder, checkpoints=saved, every=every, progress="train" if progress else None)
        if store is not None:
            store.close()
        return model, store, time.perf_counter() - start, steps


__all__ = ["make_recipe", "train_recorded"]

"""The training recipe of a recorded run, and the run itself: what `unlearn-ext train` does and its log keeps.

A recipe (a JSON-friendly dict, stored in the request log's header) names everything that decides the trained
weights: data set (name, root, seeded subsample), model, seed (initialisation and shuffle order), epochs, batch
size, Adam's learning rate, the recording (keep ratio, value dtype), whether deterministic kernels were
required, and the thread count (results of the CPU kernels depend on it). :func:`train_recorded` trains by it.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .. import data, models
from ..record import DiskStore, UpdateRecorder
from ..train import TrainConfig, train

VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def make_recipe(splits: data.DataSplits, model: str, *, root: Optional[str] = None, train_size: Optional[int] = None,
                seed: int = 0, epochs: int = 8, batch_size: int = 128, lr: Optional[float] = None,
                keep_ratio: Optional[float] = 0.1, value_dtype: str = "float32", deterministic: bool = True) -> dict:
    """The recipe of a run on ``splits`` (module docstring); ``lr`` None: the model's recommended rate."""
    return {"dataset": splits.name, "root": root, "train_size": train_size, "seed": seed, "model": model,
            "epochs": epochs, "batch_size": batch_size, "lr": lr if lr is not None else models.recommended_lr(model),
            "optimizer": "adam", "keep_ratio": keep_ratio, "value_dtype": value_dtype, "deterministic": deterministic,
            "threads": torch.get_num_threads(), "input_shape": list(splits.input_shape),
            "num_classes": splits.num_classes}


def train_recorded(splits: data.DataSplits, recipe: dict, store_path: Optional[str], progress: bool = False,
                   train_set: Optional[data.IndexedTensorDataset] = None):
    """Train as ``recipe`` says on ``train_set`` (default: ``splits.train``), recording into a new DiskStore at
    ``store_path`` (None: no recording). Returns ``(model, store or None, seconds)``."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(recipe["deterministic"] or was_deterministic)
    try:
        torch.manual_seed(recipe["seed"])
        model = models.make_model(recipe["model"], splits.input_shape, splits.num_classes)
        cfg = TrainConfig(epochs=recipe["epochs"], batch_size=recipe["batch_size"], lr=recipe["lr"],
                          seed=recipe["seed"])
        store = None if store_path is None else DiskStore(store_path)
        recorders = [] if store is None else [UpdateRecorder(model, keep_ratio=recipe["keep_ratio"], store=store,
                                                             value_dtype=VALUE_DTYPES[recipe["value_dtype"]])]
        loader = data.loader(splits.train if train_set is None else train_set, recipe["batch_size"], shuffle=True,
                             seed=recipe["seed"])
        start = time.perf_counter()
        train(model, loader, cfg, recorders=recorders, progress="train" if progress else None)
        if store is not None:
            store.close()
        return model, store, time.perf_counter() - start
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


__all__ = ["VALUE_DTYPES", "make_recipe", "train_recorded"]

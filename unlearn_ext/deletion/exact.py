"""The exact tier of a request log: generations of a recorded run, and the replay that makes the next one.

A log whose run was trained with checkpoints (``unlearn-ext train --checkpoint-every K``; the header's
``replay`` entry: checkpoint folder, K, the run's seconds and steps) can answer a request exactly: replay the
run from the last checkpoint at or before t_min — the first recorded step whose batch held an id forgotten by
this request or any earlier one — with every forgotten id stripped from every batch (:mod:`.replay`). The
result is bitwise the model ``train --exclude-ids`` trains with all those ids.

**Generations.** Generation 0 is the recorded run: its store, and its checkpoints in ``<folder>/gen-0000``. An
exact request makes generation g+1 in ``<folder>/gen-<g+1>``, holding:

* ``store.ulx`` — the records of the steps before the replay's start copied byte for byte from generation g
  (those steps are the same in both runs), then the replay's own records (step numbers stay plan positions);
* ``step-<t>.pt`` — generation g's checkpoints up to the start (hard links), then the replay's;
* ``model.pt`` — the replayed model (the request's output; kept so that a lost output can be redone cheaply).

The folder is built under ``gen-<g+1>.partial`` and renamed into place before the output is committed and the
receipt logged; a leftover of a killed request (either name, never logged) is removed by the next one, which
holds the log's lock. Later amnesiac requests undo steps of the newest generation's store, counting the guard
afresh from it (its steps hold none of the forgotten ids).
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Dict, List, NamedTuple, Optional

import torch

from .. import data, models
from ..durable import atomic_save, fsync_folder
from ..record import DiskStore, UpdateRecorder, UpdateStore
from ..record.identity import VALUE_DTYPE_BY_NAME
from .digest import recording_digest
from .replay import Checkpoints, data_digest, make_run_optimizer, recipe_mode, run_plan, run_plan_of

Tensor = torch.Tensor
STORE_NAME, MODEL_NAME = "store.ulx", "model.pt"


class ExactUnavailable(ValueError):
    """The exact tier was asked for a log that cannot replay (no checkpoints, a sharded run, no recipe)."""


class Generation(NamedTuple):
    """One trajectory of the run: its store, its checkpoints and the ids stripped from its batches."""

    index: int
    store: UpdateStore
    checkpoints: Checkpoints
    excluded: List[int]


def folder_of(log_path: str, header: dict) -> str:
    """The folder of the log's generations (the header names it relative to the log's folder)."""
    return os.path.join(os.path.dirname(os.path.abspath(log_path)), header["replay"]["folder"])


def generation_folder(log_path: str, header: dict, index: int) -> str:
    return os.path.join(folder_of(log_path, header), f"gen-{index:04d}")


def unavailable_reason(header: dict, stores: List[UpdateStore]) -> Optional[str]:
    """Why this log cannot replay, or None when it can."""
    if not header.get("replay"):
        return ("its run was trained without checkpoints (`unlearn-ext train --checkpoint-every K` keeps them)")
    if len(stores) > 1:
        return "a sharded run's stores cannot be replayed on one machine"
    return None


class Generations:
    """The generations of one log (module docstring): which is current after a log's entries, its store opened
    once and checked against the receipt that made it."""

    def __init__(self, log_path: str, stores: List[UpdateStore]) -> None:
        self.log_path, self.stores = log_path, stores
        self._opened: Dict[str, UpdateStore] = {}

    def current(self, header: dict, entries: List[dict]) -> Generation:
        """The newest generation after ``entries``: the one the last exact request made (else the recording)."""
        excluded = set((header.get("recipe") or {}).get("exclude_ids", []))
        made_by = max((i for i, e in enumerate(entries) if e.get("tier") == "exact"), default=None)
        index, store = 0, self.stores[0]
        if made_by is not None:
            for e in entries[:made_by + 1]:
                excluded.update(e["sample_ids"])
            index = entries[made_by]["generation"]
            store = self._open(generation_folder(self.log_path, header, index), entries[made_by])
        folder = generation_folder(self.log_path, header, index) if header.get("replay") else ""
        return Generation(index, store, Checkpoints(folder), sorted(excluded))

    def _open(self, folder: str, receipt: dict) -> UpdateStore:
        path = os.path.join(folder, STORE_NAME)
        if path not in self._opened:
            if not os.path.isfile(path):
                raise ValueError(f"{path} is missing: request {receipt['request_id']!r} replayed the run into it; "
                                 "restore the folder from a copy")
            store = DiskStore(path)
            if recording_digest(store) != receipt["recording_sha256"]:
                raise ValueError(f"{path} is not the recording request {receipt['request_id']!r} made (its steps or "
                                 "ids differ): restore the folder from a copy")
            self._opened[path] = store
        return self._opened[path]


def first_step(store: UpdateStore, forgotten: List[int]) -> Optional[int]:
    """t_min: the first recorded step whose batch held any of ``forgotten`` (None: no step holds one)."""
    steps = store.steps_containing(forgotten) if forgotten else []
    return steps[0] if steps else None


def estimate(header: dict, current: Generation, t_min: int) -> dict:
    """What replaying from t_min costs, against Retrain, from the run's own seconds per step."""
    start = current.checkpoints.latest_at_or_before(t_min)
    steps = current.store.steps()
    replay_steps = sum(1 for s in steps if s >= start)
    info = header["replay"]
    per_step = info["train_seconds"] / max(1, info["train_steps"])
    return {"t_min": t_min, "replay_from": start, "replay_steps": replay_steps, "retrain_steps": len(steps),
            "estimated_seconds": round(replay_steps * per_step, 3),
            "retrain_seconds": round(len(steps) * per_step, 3),
            "fraction_of_retrain": round(replay_steps / max(1, len(steps)), 4)}


def training_set(recipe: dict, given: Optional[data.IndexedTensorDataset], root: Optional[str]):
    """The training set the recipe trained on: ``given``, or loaded as the recipe says; refused when its digest
    is not the recipe's (other data would replay another run)."""
    if given is None:
        splits = data.load_dataset(recipe["dataset"], root or recipe.get("root"), train_size=recipe.get("train_size"),
                                   seed=recipe["seed"])
        given = splits.train
    if data_digest(given) != recipe["data_sha256"]:
        raise ValueError(f"training_data: not the data the run trained on (its digest differs from the recipe's "
                         f"{recipe['data_sha256'][:16]}…): give the recipe's {recipe['dataset']} split (--root)")
    return given


def check_plan(plan: List[Tensor], train_set, current: Generation) -> None:
    """Refuse a replay whose plan is not the recorded run's: each recorded step's ids must be its plan batch
    without the generation's excluded ids (another seed, batch size or data order would replay another run)."""
    excluded = torch.tensor(current.excluded, dtype=torch.int64)
    for step in current.store.steps():
        ids = train_set.ids[plan[step]] if step < len(plan) else None
        if ids is not None and excluded.numel():
            ids = ids[~torch.isin(ids, excluded)]
        if ids is None or not torch.equal(ids, current.store.sample_ids(step)):
            raise ValueError(f"the recipe's batch plan does not give recorded step {step}'s sample ids: this is not "
                             "the data, seed or order the run was trained with; nothing was done")


def replay(log_path: str, header: dict, current: Generation, forgotten: List[int], start: int,
           train_set) -> dict:
    """Build generation ``current.index + 1``: replay the run from the checkpoint at ``start`` without
    ``forgotten`` (module docstring). Returns ``{"state": the replayed state_dict, "store": its store,
    "facts": what the receipt says of the replay}``."""
    recipe, info = header["recipe"], header["replay"]
    began = time.perf_counter()
    plan = run_plan_of(recipe, len(train_set))
    check_plan(plan, train_set, current)
    index = current.index + 1
    final = generation_folder(log_path, header, index)
    partial = final + ".partial"
    for leftover in (partial, final):  # a killed request's, never logged (the log's lock is held)
        shutil.rmtree(leftover, ignore_errors=True)
    os.makedirs(partial)
    with recipe_mode(recipe):
        model = models.make_model(recipe["model"], recipe["input_shape"], recipe["num_classes"])
        opt = make_run_optimizer(model, recipe)
        current.checkpoints.load(start, model, opt)
        checkpoints = Checkpoints(partial)
        current.checkpoints.link_into(checkpoints, start)
        store = DiskStore(os.path.join(partial, STORE_NAME))
        copied = [s for s in current.store.steps() if s < start]
        store.copy_records(current.store, copied)
        recorder = UpdateRecorder(model, keep_ratio=recipe["keep_ratio"], store=store,
                                  value_dtype=VALUE_DTYPE_BY_NAME[recipe["value_dtype"]])
        taken = run_plan(model, opt, train_set, plan, recipe, start=start,
                         exclude=torch.tensor(sorted(forgotten), dtype=torch.int64), recorder=recorder,
                         checkpoints=checkpoints, every=info["every"])
        store.close()
    state = model.state_dict()
    atomic_save(state, os.path.join(partial, MODEL_NAME))
    fsync_folder(partial)
    os.rename(partial, final)
    fsync_folder(os.path.dirname(final))
    opened = DiskStore(os.path.join(final, STORE_NAME))
    return {"state": state, "store": opened,
            "facts": {"replay_from": start, "replayed_steps": taken, "copied_records": len(copied),
                      "forgotten_ids": len(forgotten), "seconds": round(time.perf_counter() - began, 3)}}


def replayed_model(log_path: str, header: dict, receipt: dict) -> Dict[str, Tensor]:
    """The output an exact request logged (its generation's ``model.pt``): to redo a lost output."""
    path = os.path.join(generation_folder(log_path, header, receipt["generation"]), MODEL_NAME)
    return torch.load(path, map_location="cpu", weights_only=True)


__all__ = ["ExactUnavailable", "Generation", "Generations", "MODEL_NAME", "STORE_NAME", "check_plan", "estimate",
           "first_step", "folder_of", "generation_folder", "replay", "replayed_model", "training_set",
           "unavailable_reason"]

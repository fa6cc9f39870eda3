"""UpdateRecorder: record each optimizer step's parameter update with the ids of its batch (SPEC §2).

Usage — one line around the optimizer step (this is what :func:`unlearn_ext.train.train` does)::

    rec = UpdateRecorder(model, keep_ratio=0.1, store=DiskStore("run.ulx"), value_dtype=torch.float16)
    for x, y, ids in loader:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        with rec.step(ids):
            opt.step()
    rec.store.close()

    # later: remove every step whose batch held a sample of forget_ids (one batched sparse_accumulate_)
    store = DiskStore("run.ulx", model=model)          # raises if the file records another model
    store.apply(model, store.steps_containing(forget_ids), alpha=-1.0)

Entering ``step`` copies θ into one preallocated flat buffer; leaving it records Δ = θ_after − θ_before:

* ``keep_ratio=None`` — the dense update (naive amnesiac);
* ``keep_ratio=r`` — the layer-wise top-k of |Δ| via ``ops.layerwise_topk(θ_after, r, subtract=θ_before)``,
  which selects on the difference without materialising it (partial amnesiac).

Only the entries that changed are stored: exact zeros of Δ (a layer without gradient, a frozen row, an
entry the optimizer left alone) are dropped wherever that makes the record smaller, so an unchanged layer
is a zero-length segment (a dense layer with only a few zeros stays dense: a bitmask would cost more).
The layers are the trainable parameters (``requires_grad``) in ``named_parameters`` order; they must
share one dtype and device (mixed-precision training keeps fp32 master weights, which is what is
recorded). If the optimizer step raises, nothing is recorded and the step count does not advance.

Steps are numbered by optimizer step (counting the ones not recorded); a recorder on a non-empty store
continues at ``store.next_step``. With ``only_ids`` (the samples declared deletable), only batches that
hold one of them are recorded, as amnesiac ML does.

Distributed data parallel: after DDP's all-reduce every rank applies the same update, so it is recorded
once, on rank 0. The recorders of the other ranks store nothing; they only contribute their batch's
sample ids (one ``all_gather_object`` per step, which every rank must make), because the update of a
step is made by the samples of *all* ranks; rank 0 stores them in rank order. Give every rank the same
code (``UpdateRecorder(ddp_model, ..., store=DiskStore(path))``): a DiskStore is created and written only
by the rank that records into it, so the other ranks' paths stay untouched. Tested with two gloo
processes on the CPU: rank 0's store equals the one a single process records on the whole batches.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..ops import checks
from .identity import Manifest, unwrap_model
from .store import MemoryStore, UpdateStore
from .validation import as_id_tensor

Tensor = torch.Tensor


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class UpdateRecorder:
    """Records ``θ_after − θ_before`` of every optimizer step wrapped in :meth:`step` into ``store``
    (a :class:`MemoryStore` by default) with the batch's sample ids. See the module docstring."""

    def __init__(self, model: nn.Module, keep_ratio: Optional[float] = None, store: Optional[UpdateStore] = None,
                 value_dtype: torch.dtype = torch.float32, only_ids=None) -> None:
        if keep_ratio is not None:
            keep_ratio = checks.ratio("keep_ratio", keep_ratio)
        self.manifest = Manifest.from_model(model, keep_ratio, value_dtype)
        self.keep_ratio = keep_ratio
        self.store = MemoryStore() if store is None else store
        named = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
        self._params: List[Tensor] = [p for _, p in named]
        p0 = self._params[0]
        for name, p in named:
            if p.dtype != p0.dtype or p.device != p0.device:
                raise ValueError(f"trainable parameters must share one dtype and device: {name} is "
                                 f"{p.dtype} on {p.device}, {named[0][0]} is {p0.dtype} on {p0.device}")
        self.only_ids = None if only_ids is None else torch.unique(as_id_tensor(only_ids))
        rank = dist.get_rank() if _world() > 1 else 0
        self.enabled = rank == 0
        if self.enabled:
            self.store.bind(self.manifest)
        self.step_count = self.store.next_step if self.enabled else 0
        numels = self._numels = [p.numel() for p in self._params]
        self._offsets = torch.tensor([0] + numels, dtype=torch.int64, device=p0.device).cumsum(0)
        self._before: Optional[Tensor] = None
        self._before_views: List[Tensor] = []

    @contextlib.contextmanager
    def step(self, sample_ids) -> Iterator[None]:
        """Wrap one optimizer step taken on the batch of ``sample_ids``; on normal exit its update is
        recorded as step ``self.step_count`` (if this batch is to be recorded) and the count advances."""
        ids = as_id_tensor(sample_ids)
        if _world() > 1:
            gathered: list = [None] * _world()
            dist.all_gather_object(gathered, ids)
            ids = torch.cat(gathered)
        take = self.enabled and (self.only_ids is None or bool(torch.isin(ids, self.only_ids).any()))
        if take:
            self._snapshot()
        yield
        if take:
            self._record(ids)
        self.step_count += 1

    def _snapshot(self) -> None:
        with torch.no_grad():
            if self._before is None:
                p0 = self._params[0]
                self._before = torch.empty(int(self._offsets[-1]), dtype=p0.dtype, device=p0.device)
                self._before_views = [v.view(p.shape) for v, p in
                                      zip(self._before.split([p.numel() for p in self._params]), self._params)]
            torch.cat([p.detach().reshape(-1) for p in self._params], out=self._before)

    def _record(self, ids: Tensor) -> None:
        with torch.no_grad():
            if self.keep_ratio is None:
                # Δ = θ_after − θ_before written layer by layer into one flat tensor (one pass).
                values = torch.empty_like(self._before)
                for p, b, out in zip(self._params, self._before_views, values.split(self._numels)):
                    torch.sub(p.detach().reshape(-1), b.reshape(-1), out=out)
                indices, offsets = None, self._offsets
            else:
                values, indices, offsets = ops.layerwise_topk([p.detach() for p in self._params], self.keep_ratio,
                                                              subtract=self._before_views)
            # layerwise_topk's output is well-formed: the store skips the structural checks
            # (values are still checked finite); it drops exact zeros where that is smaller.
            self.store.append(self.step_count, ids, values, indices, offsets, validate=False)


__all__ = ["UpdateRecorder"]

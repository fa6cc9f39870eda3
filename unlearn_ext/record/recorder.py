"""UpdateRecorder: record each optimizer step's parameter update with the ids of its batch
(docs/store-format.md#what-is-recorded).

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
The layers are the trainable parameters (``requires_grad``) in ``named_parameters`` order, named as in
the plain model (a ``torch.compile``d or DDP-wrapped model records the same manifest and fingerprint as
the plain one, :mod:`.identity`); they must share one dtype and device. Under autocast (bf16/fp16
mixed precision) the parameters stay fp32 and are what is recorded: the update of the fp32 weights.
A parameter in another memory order (``channels_last``) is recorded in logical order.

Which samples made a step. The ids given to ``step`` — plus those added by :meth:`UpdateRecorder.add_ids`
since the last step, in order — are the step's batch: with gradient accumulation, call ``add_ids`` for
each micro-batch and ``step()`` around the one optimizer step.

A step that raises. If the parameters moved before the exception (a logging line or a NaN guard after
``opt.step()``), the update happened: it is recorded with this step's ids, the count advances, and the
exception goes on. Otherwise (an exception before or inside the optimizer's step that changed nothing)
nothing is recorded, the count stays, and the ids stay pending for the next step (its gradients are
still there; attributing a sample to one step too many only makes its removal take that step too).
"Moved" is the step hook's count (``optimizer=``) or any parameter differing from the copy taken on
entry — which also records the part of an update an optimizer made before raising. A step whose batch
is not recorded (``only_ids``) takes no copy: without ``optimizer=`` it counts as not taken. An update
that moved but cannot be stored (NaN or infinite values) raises the store's ``ValueError`` instead.

Skipped steps. Given ``optimizer=``, the recorder sees whether the optimizer really stepped inside
``step`` (a step post-hook): a step that a ``torch.amp.GradScaler`` skips for inf/NaN gradients records
nothing, does not advance the count, and its ids are dropped — that batch changed nothing. Without
``optimizer=`` such a step is recorded as an empty update holding its ids.

Steps taken outside ``step``. Given ``optimizer=``, each optimizer step taken outside ``step`` warns
(``RuntimeWarning``, at that ``opt.step()`` line, with the count so far in
:attr:`UpdateRecorder.unrecorded_steps`): its update is in the model and in no store, so it can never be
removed. A warning, not an error: the step is already taken, and the steps recorded stay removable.
:meth:`UpdateRecorder.close` (or dropping the recorder) stops the watching, e.g. when another recorder
takes over the optimizer.

Parameters trained but not recorded. The recorded layers are fixed when the recorder is built (the
store's manifest names them). Every ``step`` first checks that nothing else is trained now: a parameter
frozen then and trainable now (stage-2 fine-tuning) — with ``optimizer=``, only if that optimizer holds
it — or a parameter of a group added later with ``add_param_group`` raises ``ValueError`` naming it,
before the optimizer steps; train such a stage with a new recorder and store (:meth:`close` this one).
(Recording the frozen parameters too would copy and compare all of them at every step — the whole
backbone for a fine-tuned head — to store empty segments.) The check reads the frozen parameters'
``requires_grad`` flags and the optimizer's group sizes, not the data. A recorded layer frozen later is
fine: it stops moving and records empty segments. A parameter added to the model later, without
``optimizer=``, is not seen by the check; it changes the model's fingerprint, which the store then refuses.

Steps are numbered by optimizer step (counting the ones not recorded, those taken outside ``step`` with
``optimizer=`` included); a recorder on a non-empty store continues at ``store.next_step``. With
``only_ids`` (the samples declared deletable), only batches that hold one of them are recorded, as
amnesiac ML does.

What can be recorded is checked when the recorder is built (:meth:`.Manifest.from_model`), before a
store is written: the recorded parameters must be float32, float16 or bfloat16 (the dtypes
:func:`unlearn_ext.ops.sparse_accumulate_` applies updates to) and hold at most 2**31 − 1 elements each.

Distributed data parallel: after DDP's all-reduce every rank applies the same update, so it is recorded
once, on rank 0. The recorders of the other ranks store nothing; they only contribute their batch's
sample ids (one ``all_gather_object`` per step, which every rank must make), because the update of a
step is made by the samples of *all* ranks; rank 0 stores them in rank order. Give every rank the same
code (``UpdateRecorder(ddp_model, ..., store=DiskStore(path))``): a DiskStore is created and written only
by the rank that records into it, so the other ranks' paths stay untouched. Tested with two gloo
processes on the CPU: rank 0's store equals the one a single process records on the whole batches.

Sharded training (FSDP2's ``fully_shard``, :mod:`.sharding`): no rank holds a whole parameter, so every
rank records the update of its own blocks into its own store (give each rank its own path), with the
ids of all ranks' samples; the manifest records the blocks and the mesh. ``keep_ratio=r`` then keeps
the top ⌈r·nˢ⌉ entries of each block of nˢ elements — per-shard top-k, not the top ⌈r·n⌉ of the whole
layer: the same number of entries up to rounding, chosen per block. On an HSDP mesh only the first
replica of each block records.
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..ops import checks
from .identity import Manifest, named_parameters, trainable_parameters
from .sharding import local_tensor
from .store import MemoryStore, UpdateStore
from .validation import as_id_tensor

Tensor = torch.Tensor


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _group_sizes(optimizer: torch.optim.Optimizer) -> Tuple[int, ...]:
    return tuple(len(group["params"]) for group in optimizer.param_groups)


class _StepCounter:
    """An optimizer step post-hook counting the steps the optimizer really took, and those taken outside
    the recorder's ``step`` (each warned about where it is taken: its update is not recorded)."""

    def __init__(self) -> None:
        self.steps = 0
        self.outside = 0
        self.inside = False

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if not self.inside:
            self.outside += 1
            # stacklevel 3: past this hook and the optimizer's step wrapper, at the caller's opt.step()
            warnings.warn(f"UpdateRecorder: an optimizer step was taken outside rec.step() ({self.outside} such "
                          "step(s) so far): its update is not recorded and can never be removed; wrap every "
                          "optimizer step in `with rec.step(ids):` (or rec.close() the recorder when its "
                          "recording ends)", RuntimeWarning, stacklevel=3)


class UpdateRecorder:
    """Records ``θ_after − θ_before`` of every optimizer step wrapped in :meth:`step` into ``store``
    (a :class:`MemoryStore` by default) with the batch's sample ids. See the module docstring."""

    def __init__(self, model: nn.Module, keep_ratio: Optional[float] = None, store: Optional[UpdateStore] = None,
                 value_dtype: torch.dtype = torch.float32, only_ids=None,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if keep_ratio is not None:
            keep_ratio = checks.ratio("keep_ratio", keep_ratio)
        self.manifest = Manifest.from_model(model, keep_ratio, value_dtype)
        self.keep_ratio = keep_ratio
        self.store = MemoryStore() if store is None else store
        named = trainable_parameters(model)
        self._params: List[Tensor] = [p for _, p in named]
        self._sharded = self.manifest.shards is not None
        tensors = self._tensors()
        p0 = tensors[0]
        for (name, _), p in zip(named, tensors):
            if p.dtype != p0.dtype or p.device != p0.device:
                raise ValueError(f"trainable parameters must share one dtype and device: {name} is "
                                 f"{p.dtype} on {p.device}, {named[0][0]} is {p0.dtype} on {p0.device}")
        self._model = model
        recorded = {id(p) for p in self._params}
        # (how an error names it, parameter): what may be trained later without being recorded
        self._unrecorded: List[Tuple[str, Tensor]] = [(repr(n), p) for n, p in named_parameters(model)
                                                      if id(p) not in recorded]
        self._optimizer = optimizer
        self._optimized: Set[int] = set()
        self._group_sizes: Tuple[int, ...] = ()
        self._counter: Optional[_StepCounter] = None
        if optimizer is not None:
            self._counter = self._watch(optimizer, named)
            self._optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self._group_sizes = _group_sizes(optimizer)
        self.only_ids = None if only_ids is None else torch.unique(as_id_tensor(only_ids))
        if self._sharded:
            self.enabled = self.manifest.shards.records()
        else:
            self.enabled = (dist.get_rank() if _world() > 1 else 0) == 0
        if self.enabled:
            self.store.bind(self.manifest)
        self.step_count = self.store.next_step if self.enabled else 0
        self.skipped_steps = 0
        self._outside_counted = 0
        self._closed = False
        self._open = False  # inside step(): steps do not nest
        self._pending: List[Tensor] = []
        numels = self._numels = [p.numel() for p in tensors]
        self._offsets = torch.tensor([0] + numels, dtype=torch.int64, device=p0.device).cumsum(0)
        self._before: Optional[Tensor] = None
        self._before_views: List[Tensor] = []

    def _watch(self, optimizer, named) -> _StepCounter:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in named if id(p) not in stepped]
        if missing:
            raise ValueError(f"optimizer does not update the trainable parameter {missing[0]!r} "
                             f"({len(missing)} such): pass the optimizer that steps the recorded model")
        counter = _StepCounter()
        # the hook goes with the recorder: a dropped recorder no longer counts nor warns
        self._unwatch = weakref.finalize(self, optimizer.register_step_post_hook(counter).remove)
        return counter

    @property
    def unrecorded_steps(self) -> int:
        """Optimizer steps taken outside :meth:`step` (seen only with ``optimizer=``; 0 without)."""
        return 0 if self._counter is None else self._counter.outside

    def close(self) -> None:
        """End this recording: stop watching the optimizer (its later steps are another recording's) and
        close the store. A closed recorder's ``step`` raises."""
        self._closed = True
        if self._counter is not None:
            self._unwatch()
        self.store.close()

    def _tensors(self) -> List[Tensor]:
        """The recorded tensors: the parameters, or this rank's blocks of them."""
        return [local_tensor(p) for p in self._params] if self._sharded else self._params

    def add_ids(self, sample_ids) -> None:
        """Add the ids of a micro-batch whose gradients the next optimizer step applies (gradient
        accumulation): they are recorded with that step, before any ids given to :meth:`step`."""
        self._pending.append(as_id_tensor(sample_ids))

    @contextlib.contextmanager
    def step(self, sample_ids=None) -> Iterator[None]:
        """Wrap one optimizer step taken on the batch of ``sample_ids`` (and of the micro-batches given to
        :meth:`add_ids` since the last step); its update is recorded as step ``self.step_count`` (if this
        batch is to be recorded) and the count advances — unless the optimizer given to the recorder did
        not step, or the step raised before anything moved (module docstring)."""
        if self._closed:
            raise ValueError("step() on a closed UpdateRecorder: its recording has ended; record further steps "
                             "with a new UpdateRecorder")
        if self._open:
            raise ValueError("step() inside another step() of this recorder: steps do not nest (one optimizer step "
                             "per step(); call add_ids() for the micro-batches of an accumulated step)")
        self._refuse_unrecorded_training()
        parts = self._pending + ([] if sample_ids is None else [as_id_tensor(sample_ids)])
        if not parts:
            raise ValueError("sample_ids: step() got no sample ids; pass the batch's ids, or call add_ids() for "
                             "each micro-batch of the step")
        self._pending = []
        local = ids = parts[0] if len(parts) == 1 else torch.cat(parts)
        if _world() > 1:
            gathered: list = [None] * _world()
            dist.all_gather_object(gathered, ids)
            ids = torch.cat(gathered)
        take = self.enabled and (self.only_ids is None or bool(torch.isin(ids, self.only_ids).any()))
        if take:
            self._snapshot()
        counter = self._counter
        taken = None
        if counter is not None:
            self.step_count += counter.outside - self._outside_counted  # numbered by optimizer step
            self._outside_counted = counter.outside
            taken = counter.steps
            counter.inside = True
        self._open = True
        try:
            yield
        except BaseException:
            if not self._moved(taken, take):
                self._pending.insert(0, local)
                raise
            self._finish(ids, take)  # the update happened before the exception: record it, then re-raise
            raise
        finally:
            self._open = False
            if counter is not None:
                counter.inside = False
        if taken is not None and counter.steps == taken:
            self.skipped_steps += 1
            return
        self._finish(ids, take)

    def _finish(self, ids: Tensor, take: bool) -> None:
        if take:
            self._record(ids)
        self.step_count += 1

    def _moved(self, taken: Optional[int], take: bool) -> bool:
        """Whether a step that raised changed the parameters: the optimizer stepped (its hook ran), or
        a parameter differs from the copy taken on entry (when one was taken)."""
        if taken is not None and self._counter.steps != taken:
            return True
        return take and any(not torch.equal(p, b) for p, b in zip(self._tensors(), self._before_views))

    def _refuse_unrecorded_training(self) -> None:
        """Raise if a parameter the recorder does not record is trained now (module docstring)."""
        opt = self._optimizer
        if opt is not None and _group_sizes(opt) != self._group_sizes:
            self._adopt_new_groups(opt)
        trained = [label for label, p in self._unrecorded
                   if p.requires_grad and (opt is None or id(p) in self._optimized)]
        if trained:
            raise ValueError(f"{trained[0]} is trained now but the recorder does not record it ({len(trained)} "
                             "such): it was frozen or outside the optimizer when the recorder was built, so its "
                             "updates could never be removed. Record this training stage with a new "
                             "UpdateRecorder and a new store (close() this one), or freeze it again")

    def _adopt_new_groups(self, opt: torch.optim.Optimizer) -> None:
        """Note the parameters of param groups added since the last step: those neither recorded nor
        already known join the unrecorded ones (named as in the model when they belong to it)."""
        names: Dict[int, str] = {id(p): repr(n) for n, p in named_parameters(self._model)}
        known = {id(p) for p in self._params} | {id(p) for _, p in self._unrecorded} | self._optimized
        for g, group in enumerate(opt.param_groups):
            for p in group["params"]:
                if id(p) not in known:
                    self._unrecorded.append((names.get(id(p), f"a parameter of shape {tuple(p.shape)} in "
                                                                f"param_groups[{g}]"), p))
                self._optimized.add(id(p))
        self._group_sizes = _group_sizes(opt)

    def _snapshot(self) -> None:
        with torch.no_grad():
            tensors = self._tensors()
            if self._before is None:
                p0 = tensors[0]
                self._before = torch.empty(int(self._offsets[-1]), dtype=p0.dtype, device=p0.device)
                self._before_views = [v.view(p.shape) for v, p in zip(self._before.split(self._numels), tensors)]
            torch.cat([p.detach().reshape(-1) for p in tensors], out=self._before)

    def _record(self, ids: Tensor) -> None:
        with torch.no_grad():
            tensors = self._tensors()
            if self.keep_ratio is None:
                # Δ = θ_after − θ_before written layer by layer into one flat tensor (one pass).
                values = torch.empty_like(self._before)
                for p, b, out in zip(tensors, self._before_views, values.split(self._numels)):
                    torch.sub(p.detach().reshape(-1), b.reshape(-1), out=out)
                indices, offsets = None, self._offsets
            else:
                values, indices, offsets = ops.layerwise_topk([p.detach() for p in tensors], self.keep_ratio,
                                                              subtract=self._before_views)
            # layerwise_topk's output is well-formed: the store skips the structural checks
            # (values are still checked finite); it drops exact zeros where that is smaller.
            self.store.append(self.step_count, ids, values, indices, offsets, validate=False)


__all__ = ["UpdateRecorder"]

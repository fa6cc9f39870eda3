"""The store API shared by :class:`MemoryStore` and :class:`~unlearn_ext.record.DiskStore`
(docs/store-format.md).

A store holds a :class:`~unlearn_ext.record.Manifest` (the recorded layers' names, shapes and dtypes, the
keep ratio, the value dtype and the model fingerprint) and one record per recorded optimizer step: the
step number, the ids of the batch's samples and the update's segments in their smallest encoding
(:mod:`.encoding`). Both stores answer the same queries — :meth:`~UpdateStore.steps_containing`,
:meth:`~UpdateStore.records`, :meth:`~UpdateStore.load_batch` (B records as one ``(values, indices,
offsets)`` batch with B·L+1 offsets), :meth:`~UpdateStore.apply` (batched
:func:`unlearn_ext.ops.sparse_accumulate_` calls) and the byte accounting :meth:`~UpdateStore.nbytes` /
:meth:`~UpdateStore.encoding_nbytes` / :meth:`~UpdateStore.dense_equivalent_nbytes`, which count the
bytes of the on-disk format (:mod:`.disk_format`) for both stores.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import ops
from ..durable import deferred_interrupts
from . import encoding, sharding
from .disk_format import file_overhead, record_overhead
from .encoding import KIND_NAMES, Encoded
from .identity import Manifest, describe_difference, dtype_name, model_fingerprint, model_layers, named_parameters
from .validation import MAX_IDS_PER_STEP, as_id_tensor, as_step, check_update

Tensor = torch.Tensor


class StoredUpdate(NamedTuple):
    """One record, decoded: its update as ``(values, indices, offsets)`` with L+1 offsets."""

    step: int
    sample_ids: Tensor
    values: Tensor
    indices: Tensor
    offsets: Tensor


@dataclass
class RecordInfo:
    """What a store keeps in memory about each record (its payload lives in the store's medium)."""

    step: int
    ids: Tensor
    entries: int
    nbytes: Dict[str, int]  # per encoding kind, plus "metadata" (header, ids, counts, kinds)
    finite: bool = True  # False only for a record read from a file holding NaN or infinity

    @classmethod
    def of(cls, step: int, ids: Tensor, kinds: Sequence[int], counts: Sequence[int], manifest: Manifest,
           finite: bool = True) -> "RecordInfo":
        sizes = encoding.nbytes_by_kind(kinds, counts, manifest.numels, manifest.torch_value_dtype.itemsize)
        sizes["metadata"] = record_overhead(ids.numel(), len(kinds))
        return cls(step, ids, sum(counts), sizes, finite)


class UpdateStore:
    """The API shared by :class:`MemoryStore` and :class:`DiskStore`. Not thread-safe: append and query
    from one thread (DiskStore's own writer thread is internal)."""

    def __init__(self) -> None:
        self.manifest: Optional[Manifest] = None
        self._recs: List[RecordInfo] = []
        self._pos: Dict[int, int] = {}
        self._id_index: Optional[Tuple[Tensor, Tensor]] = None

    # -- subclasses -------------------------------------------------------------------------------
    def _create(self, manifest: Manifest) -> None:
        """Called once, when an empty store receives its manifest."""

    def _submit(self, step: int, ids: Tensor, enc: Encoded) -> None:
        raise NotImplementedError

    def _payloads(self, positions: Sequence[int]) -> List[Encoded]:
        raise NotImplementedError

    def flush(self) -> None:
        """Make every appended record readable (and, for DiskStore, written to the OS)."""

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------------
    def bind(self, manifest: Manifest) -> None:
        """Attach a recorder's manifest: adopted by an empty store, checked against a non-empty one."""
        if self.manifest is None:
            self._create(manifest)
            self.manifest = manifest
            return
        if manifest.fingerprint != self.manifest.fingerprint:
            self._fingerprint_error(manifest.fingerprint, describe_difference(
                self.manifest, list(zip(manifest.names, manifest.global_shapes, manifest.dtypes))))
        for attr in ("names", "keep_ratio", "value_dtype"):
            mine, theirs = getattr(self.manifest, attr), getattr(manifest, attr)
            if mine != theirs:
                raise ValueError(f"{self!r} was recorded with {attr}={mine!r}; the recorder uses {theirs!r}")
        if (self.manifest.shapes, _blocks(self.manifest)) != (manifest.shapes, _blocks(manifest)):
            raise ValueError(f"{self!r} holds other blocks of the parameters than this rank records "
                             f"({_where(self.manifest)} in the store, {_where(manifest)} here): give each rank the "
                             "store it recorded")

    def append(self, step: int, sample_ids, values: Tensor, indices: Optional[Tensor], offsets: Tensor,
               validate: bool = True) -> None:
        """Append the update of optimizer step ``step`` (greater than every stored step) made by the
        samples ``sample_ids``: segments as :func:`unlearn_ext.ops.layerwise_topk` returns them (L+1
        offsets), or ``indices=None`` for a dense update holding every entry of every layer.
        Entries exactly zero are left out wherever that makes the record smaller.

        Everything is checked before anything is stored: a refused call (``ValueError``) writes nothing.
        ``validate=False`` skips the structural checks of input known to be well-formed (the recorder
        passes ``layerwise_topk``'s output); the step, ids and finiteness are still checked."""
        m = self._manifest()
        step = as_step(step)
        if self._recs and step <= self._recs[-1].step:
            raise ValueError(f"steps must increase: got {step} after {self._recs[-1].step}")
        ids = as_id_tensor(sample_ids)
        if ids.numel() > MAX_IDS_PER_STEP:
            raise ValueError(f"sample_ids: {ids.numel():,} ids in one step; a record holds at most {MAX_IDS_PER_STEP:,}")
        if validate:
            values, indices, offsets = check_update(m.numels, values, indices, offsets)
        enc = encoding.encode(values, indices, offsets, m.numels, m.torch_value_dtype, drop_zeros=True)
        if not encoding.all_finite(enc.values):  # one pass: NaN/inf given, or overflow by the cast
            if not encoding.all_finite(values):
                raise ValueError("values hold NaN or infinity: such an update cannot be removed later")
            raise ValueError(f"the update overflows the store's value dtype {m.value_dtype} "
                             f"(largest |value| {float(values.abs().max()):.4g})")
        enc = enc.to("cpu")
        info = RecordInfo.of(step, ids, enc.kinds.tolist(), enc.counts.tolist(), m)
        self._submit(step, ids, enc)
        self._add(info)

    def copy_records(self, source: "UpdateStore", steps: Iterable[int], chunk: int = 64) -> None:
        """Append ``source``'s records of ``steps`` (increasing, after every step stored here) as they are
        encoded: no decoding, the same payload bytes. The stores must record the same model the same way
        (an empty store adopts ``source``'s manifest)."""
        self.bind(source._manifest())
        steps = [as_step(s) for s in steps]
        last = self._recs[-1].step if self._recs else -1
        for step in steps:
            if step <= last:
                raise ValueError(f"steps must increase: got {step} after {last}")
            last = step
        positions = [source._position(s) for s in steps]
        for lo in range(0, len(positions), chunk):
            part = positions[lo:lo + chunk]
            for pos, enc in zip(part, source._payloads(part)):
                info = source._recs[pos]
                self._submit(info.step, info.ids, enc)
                self._add(info)

    def _add(self, info: RecordInfo) -> None:
        self._pos[info.step] = len(self._recs)
        self._recs.append(info)
        self._id_index = None

    # -- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._recs)

    def steps(self) -> List[int]:
        return [r.step for r in self._recs]

    @property
    def next_step(self) -> int:
        """One past the last stored step (0 for an empty store): where a resumed recorder continues."""
        return self._recs[-1].step + 1 if self._recs else 0

    def steps_containing(self, sample_ids) -> List[int]:
        """Sorted steps whose batch held any of ``sample_ids``."""
        if self._id_index is None:
            ids = [r.ids for r in self._recs]
            steps = torch.tensor([r.step for r in self._recs], dtype=torch.int64)
            lens = torch.tensor([len(i) for i in ids], dtype=torch.int64)
            self._id_index = (torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64),
                              torch.repeat_interleave(steps, lens))
        all_ids, step_of = self._id_index
        return torch.unique(step_of[torch.isin(all_ids, as_id_tensor(sample_ids))]).tolist()

    def ids_not_recorded(self, sample_ids) -> Tensor:
        """The ``sample_ids`` that no stored step holds: their influence cannot be removed from this store
        (ids outside the training set, or outside ``only_ids`` of the recording)."""
        ids = as_id_tensor(sample_ids)
        self.steps_containing(ids[:0])  # builds the id index
        return ids[~torch.isin(ids, self._id_index[0])]

    def sample_ids(self, step: int) -> Tensor:
        return self._recs[self._position(step)].ids

    def records(self, steps: Optional[Iterable[int]] = None) -> Iterator[StoredUpdate]:
        """The stored updates of ``steps`` (default: all), decoded one by one, in the order given."""
        m = self._manifest()
        for step in self.steps() if steps is None else steps:
            pos = self._position(step)
            values, indices, offsets = encoding.decode(self._payloads([pos])[0], m.numels)
            yield StoredUpdate(int(step), self._recs[pos].ids, values, indices, offsets)

    def load_batch(self, steps: Iterable[int], device=None) -> Tuple[Tensor, Tensor, Tensor]:
        """The updates of ``steps`` (in that order) as one ``(values, int32 indices, int64 offsets)``
        batch with B·L+1 offsets — the arguments of one :func:`unlearn_ext.ops.sparse_accumulate_` call.
        Decoded on ``device`` (default CPU); values keep the store's value dtype."""
        m = self._manifest()
        positions = [self._position(s) for s in steps]
        if not positions:
            return (torch.zeros(0, dtype=m.torch_value_dtype, device=device),
                    torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int64, device=device))
        enc = Encoded.cat(self._payloads(positions))
        return encoding.decode(enc.to(device) if device is not None else enc, m.numels)

    def apply(self, model: nn.Module, steps: Optional[Iterable[int]] = None, alpha: float = -1.0,
              max_batch_entries: int = 1 << 24) -> dict:
        """``θ += alpha · Σ Δ̂_step`` over ``steps`` (default: all) in place — ``alpha=-1`` removes them.

        The model must have this store's fingerprint; its parameters are found by the manifest's names and
        updated by :meth:`apply_to` (all or nothing: see there). Returns ``{"steps", "entries", "calls"}``."""
        self.check_model(model)
        return self.apply_to(dict(named_parameters(model)), steps, alpha, max_batch_entries)

    def apply_to(self, tensors: Mapping[str, Tensor], steps: Optional[Iterable[int]] = None, alpha: float = -1.0,
                 max_batch_entries: int = 1 << 24) -> dict:
        """``t += alpha · Σ Δ̂_step`` over ``steps`` (default: all) for the tensors of the manifest's layers,
        found by name in ``tensors`` (a model's named parameters, or a ``state_dict`` loaded from a
        checkpoint: every recorded layer must be there with its whole shape and dtype, else ``ValueError``
        naming the first that is not).

        All or nothing. Every step is checked first — a step given twice (``ValueError``: a step can be
        undone once), a step not in the store, a record holding NaN or infinity (only a file can: appending
        refuses them) — and the tensors change only after every record has been read and its checksums
        verified, or not at all: when the records hold more than ``max_batch_entries`` entries they are
        applied in consecutive groups (one ``sparse_accumulate_`` call each, the same order), and a failure in
        a later group — a record damaged since the store was opened, a read error, Ctrl-C — puts every tensor
        back as it was (from a copy taken first, only in that case) before the error is raised.

        The bound caps the transient memory of decoding: 8 bytes an entry for the batch itself, but about 40
        at the peak on the CPU (bitmask positions are unpacked as int64); at the default 2^24 entries that is
        under 1 GB (measured: a 1 GB dense LeNet store applied with 2^27 peaked 5 GB above the store, with
        2^24 0.8 GB, in the same time).

        Stored indices count in a layer's logical (row-major) order; a tensor stored in another memory order
        (``channels_last``) is updated through a contiguous copy written back at the end. A sharded recording
        (:mod:`.sharding`) applies to this rank's blocks of a sharded model (the blocks it recorded, else
        ``ValueError``), or to its blocks of the whole parameters of an unsharded one. Returns
        ``{"steps", "entries", "calls"}``."""
        m = self._manifest()
        steps = self._steps_to_apply(steps)
        self.check_tensors(tensors)
        targets = [sharding.target(name, tensors[name], m.shards, i, shape)
                   for i, (name, shape) in enumerate(zip(m.names, m.shapes))]
        _refuse_overlap(m.names, targets)
        dense = [t if t.is_contiguous() else t.contiguous() for t in targets]
        groups: List[List[int]] = []
        size = 0
        for s in steps:
            n = self._recs[self._pos[s]].entries
            if not groups or size + n > max_batch_entries:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += n
        # One group is read and verified whole before its one call changes anything; with several, a later
        # group can fail after an earlier one was applied, so the tensors are copied first.
        with torch.no_grad():
            with restored_on_failure(targets, copy=len(groups) > 1):
                for group in groups:
                    values, indices, offsets = self.load_batch(group, device=dense[0].device)
                    ops.sparse_accumulate_(dense, values, indices, offsets, alpha)
            with deferred_interrupts():
                for t, d in zip(targets, dense):
                    if d is not t:
                        t.copy_(d)
        return {"steps": len(steps), "entries": sum(self._recs[self._pos[s]].entries for s in steps),
                "calls": len(groups)}

    def _steps_to_apply(self, steps: Optional[Iterable[int]]) -> List[int]:
        """``steps`` as ints (default: all), each stored, finite and given once — else ``ValueError``."""
        if steps is None:
            steps = self.steps()
        else:
            steps = [as_step(s) for s in steps]
            seen = set()
            for s in steps:
                if s in seen:
                    raise ValueError(f"steps: step {s} is given more than once; a recorded step can be undone only "
                                     "once (pass each step once), so nothing was applied")
                seen.add(s)
                self._position(s)
        broken = [s for s in steps if not self._recs[self._pos[s]].finite]
        if broken:
            raise ValueError(f"{self!r}: the stored update of step {broken[0]} holds NaN or infinity "
                             f"({len(broken)} such step(s) among those to apply); applying it would turn the "
                             "model's parameters to NaN, so nothing was applied")
        return steps

    # -- accounting -------------------------------------------------------------------------------
    def encoding_nbytes(self) -> Dict[str, int]:
        """Bytes per encoding (values + structure of the segments stored that way) and ``metadata``
        (the file header with the manifest, the closing trailer, and each record's header, step, ids,
        kinds and counts). They sum to :meth:`nbytes`."""
        out = dict.fromkeys(KIND_NAMES[1:], 0)
        out["metadata"] = 0
        if self.manifest is not None:
            out["metadata"] = file_overhead(self.manifest)
        for r in self._recs:
            for k, v in r.nbytes.items():
                if k in out:
                    out[k] += v
        return out

    def nbytes(self) -> int:
        """Bytes the store holds, in the on-disk format (a DiskStore's file size once closed)."""
        return sum(self.encoding_nbytes().values())

    def record_nbytes(self) -> List[int]:
        """Bytes of each record in the on-disk format (header, step, ids, kinds, counts and payload);
        with the file header, manifest and trailer they sum to :meth:`nbytes`."""
        return [sum(r.nbytes.values()) for r in self._recs]

    def dense_equivalent_nbytes(self) -> int:
        """Bytes the same records would take as dense updates in the layers' dtypes (naive amnesiac)."""
        return len(self._recs) * self.manifest.dense_nbytes() if self.manifest is not None else 0

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` — naming this store, both fingerprints and the first layer that differs —
        unless ``model`` is the model recorded here (same parameter names, shapes and dtypes)."""
        fingerprint = model_fingerprint(model)
        if fingerprint != self._manifest().fingerprint:
            self._fingerprint_error(fingerprint, describe_difference(self.manifest, model_layers(model)))

    def check_tensors(self, tensors: Mapping[str, Tensor]) -> None:
        """Raise ``ValueError`` naming the first recorded layer that ``tensors`` (name → tensor, e.g. a
        checkpoint's ``state_dict``) lacks or holds with another shape or dtype than the manifest's."""
        m = self._manifest()
        for name, shape, dtype in zip(m.names, m.global_shapes, m.dtypes):
            t = tensors.get(name)
            if t is None:
                raise ValueError(f"{self!r} recorded layer {name!r}, which the given tensors lack (they have "
                                 f"{len(tensors)} entries{', e.g. ' + repr(next(iter(tensors))) if tensors else ''})")
            got = tuple(t.shape)  # a DTensor reports its whole shape
            if got != tuple(shape) or dtype_name(t.dtype) != dtype:
                raise ValueError(f"{self!r} recorded layer {name!r} as {dtype} of shape {tuple(shape)}; the given "
                                 f"tensor is {dtype_name(t.dtype)} of shape {got}")

    # -- helpers ----------------------------------------------------------------------------------
    def _fingerprint_error(self, fingerprint: str, difference: str) -> None:
        m = self.manifest
        raise ValueError(f"{self!r} holds the updates of another model: it was recorded for a model with "
                         f"fingerprint {m.fingerprint} ({len(m.names)} trainable layers, first {m.names[0]!r}), "
                         f"but this model's fingerprint is {fingerprint}: its parameter names, shapes or "
                         f"dtypes differ{difference}")

    def _manifest(self) -> Manifest:
        if self.manifest is None:
            raise ValueError(f"{self!r} has no manifest yet: bind it to a recorder (or a Manifest) first")
        return self.manifest

    def _position(self, step) -> int:
        try:
            return self._pos[int(step)]
        except KeyError:
            raise ValueError(f"step {step} is not in {self!r}") from None


@contextlib.contextmanager
def restored_on_failure(tensors: Iterable[Tensor], copy: bool = True) -> Iterator[None]:
    """Run the block over ``tensors``; if it raises (Ctrl-C included), put every tensor back as it was before
    the block — from a copy taken on entry (``copy=False``: no copy, for a block that cannot fail after it
    changed them) — and re-raise. The putting back is not cut short by a second Ctrl-C."""
    tensors = list(tensors)
    backup = [t.clone() for t in tensors] if copy else None
    try:
        yield
    except BaseException:
        if backup is not None:
            with deferred_interrupts(), torch.no_grad():
                for t, b in zip(tensors, backup):
                    t.copy_(b)
        raise


def _refuse_overlap(names: Sequence[str], targets: Sequence[Tensor]) -> None:
    """``ValueError`` when two layers' tensors reach into the same bytes: the op sees only the contiguous copies
    of strided ones, and writing them back would overwrite one layer with the other. Strided views are judged by
    their extent, so two interleaved views of one buffer are refused too."""
    spans: Dict[int, List[Tuple[str, int, int]]] = {}
    for name, t in zip(names, targets):
        if t.numel() == 0:
            continue
        lo = t.storage_offset() * t.element_size()
        hi = lo + (1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))) * t.element_size()
        key = t.untyped_storage().data_ptr()
        for other, olo, ohi in spans.get(key, []):
            if lo < ohi and olo < hi:
                raise ValueError(f"the tensors of layers {other!r} and {name!r} share memory: applying to one would "
                                 "overwrite the other; give each layer its own tensor (nothing was applied)")
        spans.setdefault(key, []).append((name, lo, hi))


def _blocks(m: Manifest):
    return None if m.shards is None else m.shards.blocks


def _where(m: Manifest) -> str:
    if m.shards is None:
        return "whole layers"
    return (f"rank {m.shards.rank}'s blocks, mesh coordinate {list(m.shards.coordinate)} of "
            f"{list(m.shards.mesh_shape)}")


class MemoryStore(UpdateStore):
    """Records kept as CPU tensors in this process.

    No per-record checksum is computed: nothing can tear a record in process memory, and hashing every
    step on the training thread would cost time for no protection. Byte accounting is that of the
    on-disk format, so a MemoryStore and a DiskStore of the same records report the same sizes."""

    def __init__(self) -> None:
        super().__init__()
        self._encoded: List[Encoded] = []

    def _submit(self, step, ids, enc) -> None:
        self._encoded.append(enc)

    def _payloads(self, positions):
        return [self._encoded[p] for p in positions]

    def __repr__(self) -> str:
        return f"MemoryStore({len(self)} records)"


__all__ = ["MemoryStore", "RecordInfo", "StoredUpdate", "UpdateStore", "restored_on_failure"]

"""Append-only stores of recorded parameter updates: :class:`MemoryStore` and :class:`DiskStore` (SPEC §2).

A store holds a :class:`Manifest` (the recorded layers' names, shapes and dtypes, the keep ratio, the value
dtype and the model fingerprint) and one record per recorded optimizer step: the step number, the ids of
the batch's samples and the update's segments in their smallest encoding (:mod:`.encoding`). Both stores
answer the same queries — :meth:`~UpdateStore.steps_containing`, :meth:`~UpdateStore.records`,
:meth:`~UpdateStore.load_batch` (B records as one ``(values, indices, offsets)`` batch with B·L+1 offsets),
:meth:`~UpdateStore.apply` (one :func:`unlearn_ext.ops.sparse_accumulate_` call) and the byte accounting
:meth:`~UpdateStore.nbytes` / :meth:`~UpdateStore.encoding_nbytes` / :meth:`~UpdateStore.dense_equivalent_nbytes`,
which count the bytes of the on-disk format for both stores.

DiskStore file format (little-endian)::

    file    := b"ULXSTORE" u32 version u32 manifest_len u32 crc32(manifest) manifest(JSON) record*
    record  := b"ULXR" u64 body_len u32 crc32(body) u32 crc32(the 16 bytes before) body
    body    := i64 step u32 n_ids u32 L | u8 kind[L] (zero-padded to 8) | i64 count[L] | i64 ids[n_ids]
               | i32 index[...] | values[...] (value dtype) | u8 mask[...]

The file with its manifest is created atomically (written aside, fsynced, renamed), so a store is either
absent or has a whole manifest. Records are written in order by one background thread, so after a kill the
file is a prefix of the appended records plus at most one torn record (a kill stops a write part-way, it
never reorders it). Every record carries two checksums (of its 16 header bytes and of its body).

On open every record is verified. A record that fails (a torn tail, a flipped byte, a zeroed block) is
dropped and every intact record around it is kept: a damaged header is skipped by searching for the next
record whose header and body checksums both hold. What was dropped is reported in
:attr:`DiskStore.dropped` (a :class:`DroppedRecords`: byte ranges, reasons and the intact steps on either
side) and, for damage other than a torn tail, by a ``RuntimeWarning`` — the update of a dropped record
can no longer be removed, so the caller must know. ``DiskStore(path, strict=True)`` raises ``ValueError``
instead of dropping anything but a torn tail.
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import mmap
import operator
import os
import queue
import struct
import sys
import threading
import warnings
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import ops
from . import encoding
from .encoding import KIND_NAMES, Encoded

Tensor = torch.Tensor
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_FILE_HEADER = struct.Struct("<8sIII")  # magic, version, manifest length, manifest crc32
_FILE_MAGIC, _VERSION = b"ULXSTORE", 1
_REC_HEADER = struct.Struct("<4sQII")  # magic, body length, body crc32, crc32 of the 16 bytes before
_REC_MAGIC = b"ULXR"
_BODY_FIXED = struct.Struct("<qII")  # step, number of sample ids, number of layers


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel (their parameter names carry ``module.``)."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of every parameter's name, shape and dtype, in named_parameters order.

    Frozen parameters count too, so freezing a layer after training does not change the fingerprint."""
    h = hashlib.sha256()
    for name, p in unwrap_model(model).named_parameters():
        h.update(f"{name}:{tuple(p.shape)}:{_dtype_name(p.dtype)}\n".encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Manifest:
    """What a store's records mean: the recorded (trainable) layers in named_parameters order."""

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]
    dtypes: Tuple[str, ...]
    keep_ratio: Optional[float]
    value_dtype: str
    fingerprint: str

    @classmethod
    def from_model(cls, model: nn.Module, keep_ratio: Optional[float] = None,
                   value_dtype: torch.dtype = torch.float32) -> "Manifest":
        if value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {', '.join(map(str, VALUE_DTYPES))}, got {value_dtype}")
        named = [(n, p) for n, p in unwrap_model(model).named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters to record")
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named),
                   tuple(_dtype_name(p.dtype) for _, p in named),
                   None if keep_ratio is None else float(keep_ratio), _dtype_name(value_dtype),
                   model_fingerprint(model))

    @property
    def numels(self) -> List[int]:
        out = []
        for shape in self.shapes:
            n = 1
            for d in shape:
                n *= d
            out.append(n)
        return out

    @property
    def torch_value_dtype(self) -> torch.dtype:
        return getattr(torch, self.value_dtype)

    def dense_nbytes(self) -> int:
        """Bytes of one dense update in the layers' own dtypes (what naive recording would keep)."""
        return sum(n * getattr(torch, d).itemsize for n, d in zip(self.numels, self.dtypes))

    def to_json(self) -> bytes:
        layers = [{"name": n, "shape": list(s), "dtype": d} for n, s, d in zip(self.names, self.shapes, self.dtypes)]
        return json.dumps({"layers": layers, "keep_ratio": self.keep_ratio, "value_dtype": self.value_dtype,
                           "fingerprint": self.fingerprint}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Manifest":
        d = json.loads(raw)
        layers = d["layers"]
        return cls(tuple(x["name"] for x in layers), tuple(tuple(x["shape"]) for x in layers),
                   tuple(x["dtype"] for x in layers), d["keep_ratio"], d["value_dtype"], d["fingerprint"])


class StoredUpdate(NamedTuple):
    """One record, decoded: its update as ``(values, indices, offsets)`` with L+1 offsets."""

    step: int
    sample_ids: Tensor
    values: Tensor
    indices: Tensor
    offsets: Tensor


@dataclass(frozen=True)
class DroppedRegion:
    """A byte range of a store file that opening it dropped: ``reason`` says why (``"torn tail"``,
    ``"checksum mismatch"``, ``"damaged record header"``, ``"malformed record"``, ...). The region
    held at least one record; its steps lie strictly between ``after_step`` and ``before_step``, the
    intact steps around it (None: no intact record on that side). ``tail``: it reaches the end of
    the file (what a kill during a write leaves)."""

    offset: int
    nbytes: int
    reason: str
    after_step: Optional[int]
    before_step: Optional[int]
    tail: bool

    def __str__(self) -> str:
        where = (f"after step {self.after_step}" if self.after_step is not None else "before any intact record")
        if self.before_step is not None:
            where += f" and before step {self.before_step}"
        return f"{self.nbytes} bytes at offset {self.offset} ({self.reason}, {where})"


@dataclass
class DroppedRecords:
    """What opening a DiskStore dropped: one :class:`DroppedRegion` per damaged byte range, in file
    order. ``count`` regions, ``nbytes`` bytes in all, ``offset`` of the first (None when nothing was
    dropped); ``torn_tail`` when the last region reaches the end of the file; ``damaged`` the regions
    that are not a torn tail (their records' updates are lost although later records survived)."""

    regions: List[DroppedRegion] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.regions)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.regions)

    @property
    def offset(self) -> Optional[int]:
        return self.regions[0].offset if self.regions else None

    @property
    def torn_tail(self) -> bool:
        return bool(self.regions) and self.regions[-1].tail

    @property
    def damaged(self) -> List[DroppedRegion]:
        return [r for r in self.regions if not (r.tail and r.reason == "torn tail")]

    def __bool__(self) -> bool:
        return bool(self.regions)

    def __str__(self) -> str:
        return "; ".join(map(str, self.regions)) if self.regions else "nothing dropped"


DroppedTail = DroppedRecords  # the earlier name


@dataclass
class _RecordInfo:
    step: int
    ids: Tensor
    entries: int
    nbytes: Dict[str, int]  # per encoding kind, plus "metadata" (header, ids, counts, kinds)


def _record_overhead(n_ids: int, n_layers: int) -> int:
    return _REC_HEADER.size + _BODY_FIXED.size + _pad8(n_layers) + 8 * n_layers + 8 * n_ids


def as_id_tensor(sample_ids, what: str = "sample_ids") -> Tensor:
    """``sample_ids`` (a tensor, array, sequence or int of integer ids) as a flat int64 CPU tensor.
    Floating, boolean or complex ids raise ``ValueError`` (a float id would be truncated silently)."""
    if isinstance(sample_ids, Tensor):
        t = sample_ids.detach()
    else:
        try:
            t = torch.as_tensor(sample_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{what} must be integer sample ids, got {type(sample_ids).__name__} ({e})") from None
        if t.numel() == 0:
            t = t.to(torch.int64)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{what} must have an integer dtype, got {t.dtype}")
    return t.to("cpu", torch.int64).reshape(-1)


def _as_step(step) -> int:
    if isinstance(step, bool) or (isinstance(step, Tensor) and (step.numel() != 1 or step.is_floating_point())):
        raise ValueError(f"step must be a non-negative integer, got {step!r}")
    try:
        step = operator.index(step.item() if isinstance(step, Tensor) else step)
    except TypeError:
        raise ValueError(f"step must be a non-negative integer, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be a non-negative integer, got {step}")
    return step


def check_update(numels: Sequence[int], values: Tensor, indices: Optional[Tensor],
                 offsets: Tensor, check_finite: bool = True) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Validate an update of ``len(numels)`` layers in the format of :func:`unlearn_ext.ops.layerwise_topk`
    (or ``indices=None``: dense) and return it with int32 indices and int64 offsets; ``ValueError``
    naming the first problem otherwise."""
    L = len(numels)
    for name, t in (("values", values), ("offsets", offsets)) + ((("indices", indices),) if indices is not None
                                                                  else ()):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if t.device != values.device:
            raise ValueError(f"{name} is on {t.device} but values is on {values.device}")
    if not values.is_floating_point():
        raise ValueError(f"values must be floating point, got {values.dtype}")
    if offsets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"offsets must be int64, got {offsets.dtype}")
    if offsets.numel() != L + 1:
        raise ValueError(f"offsets has {offsets.numel()} entries; the manifest has {L} layers (expected {L + 1})")
    offsets = offsets.to(torch.int64)
    counts = offsets.diff()
    off = offsets.tolist()
    if off[0] != 0 or off[-1] != values.numel() or bool((counts < 0).any()):
        raise ValueError(f"offsets must rise from 0 to the number of values ({values.numel()}), got "
                         f"{off[0]}..{off[-1]}{' (decreasing somewhere)' if bool((counts < 0).any()) else ''}")
    numels_t = torch.tensor(list(numels), dtype=torch.int64, device=values.device)
    if bool((counts > numels_t).any()):
        l = int((counts > numels_t).nonzero()[0])
        raise ValueError(f"layer {l} has {int(counts[l])} entries but only {numels[l]} elements")
    if indices is None:
        if not torch.equal(counts, numels_t):
            raise ValueError("a dense update (indices=None) must hold every element of every layer: "
                             f"offsets {off} do not match the layer sizes {list(numels)}")
    else:
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be int32, got {indices.dtype}")
        if indices.numel() != values.numel():
            raise ValueError(f"values has {values.numel()} entries but indices has {indices.numel()}")
        if indices.numel():
            seg = torch.repeat_interleave(torch.arange(L, device=values.device), counts,
                                          output_size=indices.numel())
            idx = indices.to(torch.int64)
            if bool(((idx < 0) | (idx >= numels_t[seg])).any()):
                raise ValueError("indices out of range of their layer")
            if bool(((idx[1:] <= idx[:-1]) & (seg[1:] == seg[:-1])).any()):
                raise ValueError("indices must be strictly ascending within each layer")
        indices = indices.to(torch.int32)
    if check_finite and not encoding.all_finite(values):
        raise ValueError("values hold NaN or infinity: such an update cannot be removed later")
    return values, indices, offsets


def _describe_difference(m: Manifest, layers: Sequence[Tuple[str, Tuple[int, ...], str]]) -> str:
    """``" (first difference: ...)"`` between a manifest's layers and another model's ``(name, shape,
    dtype)`` list (all its parameters, or a manifest's trainable ones)."""
    theirs = {n: (tuple(s), d) for n, s, d in layers}
    for name, shape, dtype in zip(m.names, m.shapes, m.dtypes):
        if name not in theirs:
            return f" (first difference: the store's layer {name!r} is not a parameter of this model)"
        if theirs[name] != (tuple(shape), dtype):
            s, d = theirs[name]
            return f" (first difference: layer {name!r} is {tuple(shape)} {dtype} in the store, {s} {d} in this model)"
    extra = [n for n, _, _ in layers if n not in set(m.names)]
    if extra:
        return f" (first difference: this model has the parameter {extra[0]!r}, which the store does not record)"
    return " (a frozen parameter differs)"


def _model_layers(model: nn.Module) -> List[Tuple[str, Tuple[int, ...], str]]:
    return [(n, tuple(p.shape), _dtype_name(p.dtype)) for n, p in unwrap_model(model).named_parameters()]


class UpdateStore:
    """The API shared by :class:`MemoryStore` and :class:`DiskStore`. Not thread-safe: append and query
    from one thread (DiskStore's own writer thread is internal)."""

    def __init__(self) -> None:
        self.manifest: Optional[Manifest] = None
        self._recs: List[_RecordInfo] = []
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
            self._fingerprint_error(manifest.fingerprint, _describe_difference(
                self.manifest, list(zip(manifest.names, manifest.shapes, manifest.dtypes))))
        for attr in ("names", "keep_ratio", "value_dtype"):
            mine, theirs = getattr(self.manifest, attr), getattr(manifest, attr)
            if mine != theirs:
                raise ValueError(f"{self!r} was recorded with {attr}={mine!r}; the recorder uses {theirs!r}")

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
        step = _as_step(step)
        if self._recs and step <= self._recs[-1].step:
            raise ValueError(f"steps must increase: got {step} after {self._recs[-1].step}")
        ids = as_id_tensor(sample_ids)
        if validate:
            values, indices, offsets = check_update(m.numels, values, indices, offsets, check_finite=False)
        enc = encoding.encode(values, indices, offsets, m.numels, m.torch_value_dtype, drop_zeros=True)
        if not encoding.all_finite(enc.values):  # one pass: NaN/inf given, or overflow by the cast
            if not encoding.all_finite(values):
                raise ValueError("values hold NaN or infinity: such an update cannot be removed later")
            raise ValueError(f"the update overflows the store's value dtype {m.value_dtype} "
                             f"(largest |value| {float(values.abs().max()):.4g})")
        enc = enc.to("cpu")
        kinds, counts = enc.kinds.tolist(), enc.counts.tolist()
        sizes = encoding.nbytes_by_kind(kinds, counts, m.numels, enc.values.element_size())
        sizes["metadata"] = _record_overhead(ids.numel(), len(kinds))
        self._submit(step, ids, enc)
        self._pos[step] = len(self._recs)
        self._recs.append(_RecordInfo(step, ids, sum(counts), sizes))
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

        The model must have this store's fingerprint; its parameters are found by the manifest's names.
        The stored updates go through one ``sparse_accumulate_`` call, or — when they hold more than
        ``max_batch_entries`` entries — one call per consecutive group of records, which applies them in
        the same order. The bound caps the transient memory of decoding: 8 bytes an entry for the batch
        itself, but about 40 at the peak on the CPU (bitmask positions are unpacked as int64); at the
        default 2^24 entries that is under 1 GB (measured: a 1 GB dense LeNet store applied with 2^27
        peaked 5 GB above the store, with 2^24 0.8 GB, in the same time).
        Returns ``{"steps", "entries", "calls"}``."""
        self.check_model(model)
        m = self._manifest()
        params = dict(unwrap_model(model).named_parameters())
        dense = [params[name].detach() for name in m.names]
        steps = self.steps() if steps is None else [int(s) for s in steps]
        groups: List[List[int]] = []
        size = 0
        for s in steps:
            n = self._recs[self._position(s)].entries
            if not groups or size + n > max_batch_entries:
                groups.append([])
                size = 0
            groups[-1].append(s)
            size += n
        with torch.no_grad():
            for group in groups:
                values, indices, offsets = self.load_batch(group, device=dense[0].device)
                ops.sparse_accumulate_(dense, values, indices, offsets, alpha)
        return {"steps": len(steps), "entries": sum(self._recs[self._pos[s]].entries for s in steps),
                "calls": len(groups)}

    # -- accounting -------------------------------------------------------------------------------
    def encoding_nbytes(self) -> Dict[str, int]:
        """Bytes per encoding (values + structure of the segments stored that way) and ``metadata``
        (the file header with the manifest, and each record's header, step, ids, kinds and counts).
        They sum to :meth:`nbytes`."""
        out = dict.fromkeys(KIND_NAMES[1:], 0)
        out["metadata"] = 0
        if self.manifest is not None:
            out["metadata"] = _FILE_HEADER.size + len(self.manifest.to_json())
        for r in self._recs:
            for k, v in r.nbytes.items():
                if k in out:
                    out[k] += v
        return out

    def nbytes(self) -> int:
        """Bytes the store holds, in the on-disk format (a DiskStore's file size once flushed)."""
        return sum(self.encoding_nbytes().values())

    def record_nbytes(self) -> List[int]:
        """Bytes of each record in the on-disk format (header, step, ids, kinds, counts and payload);
        with the file header and manifest they sum to :meth:`nbytes`."""
        return [sum(r.nbytes.values()) for r in self._recs]

    def dense_equivalent_nbytes(self) -> int:
        """Bytes the same records would take as dense updates in the layers' dtypes (naive amnesiac)."""
        return len(self._recs) * self.manifest.dense_nbytes() if self.manifest is not None else 0

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` — naming this store, both fingerprints and the first layer that differs —
        unless ``model`` is the model recorded here (same parameter names, shapes and dtypes)."""
        fingerprint = model_fingerprint(model)
        if fingerprint != self._manifest().fingerprint:
            self._fingerprint_error(fingerprint, _describe_difference(self.manifest, _model_layers(model)))

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


def _tensor_bytes(t: Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def _read_exact(fd: int, size: int, offset: int) -> bytearray:
    buf = bytearray(size)
    view, done = memoryview(buf), 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ValueError(f"unexpected end of file at byte {offset + done}")
        done += n
    return buf


def _frombuffer(buf: bytearray, dtype: torch.dtype, count: int, offset: int) -> Tensor:
    if count == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


def _close_at_exit(ref) -> None:
    store = ref()
    if store is not None:
        try:
            store.close()
        except OSError as e:
            # Raised by close() itself only when no earlier call reported it (see _raise_if_failed).
            print(f"unlearn_ext: {e}", file=sys.stderr)


class DiskStore(UpdateStore):
    """Records appended to the file ``path`` by a background thread (SPEC §2).

    ``append`` checks and encodes on the caller's thread and queues the record; one writer thread
    serialises, checksums and writes it, so training does not wait on I/O. The queue holds at most
    ``max_pending`` records: a full queue blocks ``append`` (back-pressure, not unbounded memory).
    ``flush()`` returns once every queued record is written to the OS, ``flush(durable=True)`` and
    ``close()`` (or leaving the ``with`` block) also fsync.

    Crash safety: a process killed at any moment leaves every record whose write had finished readable;
    the one being written is torn and dropped (and cut off) on the next open. Records still *queued*
    — appended but not yet written, at most ``max_pending`` — die with the process; call ``flush()`` where
    a step must be on disk before going on. (Written means handed to the OS: a killed process loses
    nothing the kernel holds; surviving a power cut needs ``flush(durable=True)``.)

    Opening an existing file reads the manifest and verifies every record's checksums; damaged records
    are dropped and reported (:attr:`dropped`, see the module docstring), ``strict=True`` raises on
    damage that is not a torn tail. Pass ``model=`` to check the fingerprint at once. A write error (a
    full disk: ``ENOSPC``, a file-size limit: ``EFBIG``) stops the writer: the next ``append``, ``flush``
    or ``close`` raises ``OSError`` with the errno, naming the step that failed; the records written before
    it stay readable, and the failed record and those after it are not in the store (``len(store)``
    shrinks to what is on disk). An error nobody was told of by exit is printed to stderr then. One
    process may write a store at a time (an exclusive ``flock``); readers may open it meanwhile.
    """

    def __init__(self, path, model: Optional[nn.Module] = None, *, max_pending: int = 16,
                 strict: bool = False) -> None:
        super().__init__()
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.path = os.fspath(path)
        self.max_pending = int(max_pending)
        self.strict = bool(strict)
        self.dropped = DroppedRecords()
        self._where: List[Tuple[int, int]] = []  # (file offset, size) of each written record
        self._end = 0  # end of the last intact record
        self._seen_size = 0
        self._file = None
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._error: Optional[Tuple[int, OSError]] = None
        self._error_reported = False
        self._closed = False
        if os.path.exists(self.path):
            self._load()
        if model is not None:
            self.check_model(model)

    def __repr__(self) -> str:
        return f"DiskStore({self.path!r}, {len(self)} records)"

    # -- opening ----------------------------------------------------------------------------------
    def _load(self) -> None:
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_FILE_HEADER.size)
            if len(head) < _FILE_HEADER.size:
                raise ValueError(f"{self.path} is not an update store (only {size} bytes)")
            magic, version, mlen, mcrc = _FILE_HEADER.unpack(head)
            if magic != _FILE_MAGIC:
                raise ValueError(f"{self.path} is not an update store (bad magic {magic!r})")
            if version != _VERSION:
                raise ValueError(f"{self.path} has store format version {version}; this code reads {_VERSION}")
            raw = f.read(mlen)
            if len(raw) != mlen or zlib.crc32(raw) != mcrc:
                raise ValueError(f"{self.path}: the manifest is damaged (checksum mismatch); no record can "
                                 "be interpreted without it")
            self.manifest = Manifest.from_json(raw)
            start = _FILE_HEADER.size + mlen
            self._end = self._seen_size = start
            if size > start:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                try:
                    self._scan(mm, start, size)
                finally:
                    mm.close()
            self._seen_size = size
        damaged = self.dropped.damaged
        if damaged:
            if self.strict:
                raise ValueError(f"{self.path} is damaged: {'; '.join(map(str, damaged))}")
            warnings.warn(f"{self.path}: dropped {len(damaged)} damaged region(s) and kept the "
                          f"{len(self._recs)} intact records: {'; '.join(map(str, damaged))}. The updates of "
                          "the dropped records are lost and can no longer be removed.", RuntimeWarning,
                          stacklevel=3)

    def _scan(self, mm: mmap.mmap, start: int, size: int) -> None:
        """Index every intact record of ``mm[start:size]``; record the damaged ranges in between."""
        bad: List[Tuple[int, int, str, int]] = []  # (offset, end, reason, number of intact records before)
        offset = start
        with memoryview(mm) as mv:
            while offset < size:
                n, reason, hint = self._check_record(mv, offset, size)
                if n is not None:
                    reason = self._index_record(mv, offset, n)
                    if reason is None:
                        offset += n
                        self._end = offset
                        continue
                    hint = offset + n  # intact bytes, unusable contents: skip exactly this record
                nxt = self._resync(mm, mv, offset, size, hint)
                end = size if nxt is None else nxt
                if bad and bad[-1][1] == offset and bad[-1][3] == len(self._recs):
                    bad[-1] = (bad[-1][0], end, bad[-1][2], bad[-1][3])  # merge adjacent damage
                else:
                    bad.append((offset, end, reason, len(self._recs)))
                offset = end
        steps = [r.step for r in self._recs]
        regions = []
        for lo, hi, reason, before in bad:
            tail = hi == size and before == len(steps)
            if tail and reason in ("cut short", "header cut short"):
                reason = "torn tail"
            regions.append(DroppedRegion(lo, hi - lo, reason, steps[before - 1] if before else None,
                                         steps[before] if before < len(steps) else None, tail))
        self.dropped = DroppedRecords(regions)

    @staticmethod
    def _check_record(mv: memoryview, offset: int, size: int) -> Tuple[Optional[int], Optional[str], Optional[int]]:
        """``(record size, None, None)`` for a record whose checksums hold, else ``(None, reason,
        where the next record should start if the header is intact)``."""
        if size - offset < _REC_HEADER.size:
            return None, "header cut short", None
        magic, body_len, body_crc, head_crc = _REC_HEADER.unpack_from(mv, offset)
        if magic != _REC_MAGIC or zlib.crc32(mv[offset:offset + 16]) != head_crc:
            return None, "damaged record header", None
        end = offset + _REC_HEADER.size + body_len
        if end > size:
            return None, "cut short", None
        if zlib.crc32(mv[offset + _REC_HEADER.size:end]) != body_crc:
            return None, "checksum mismatch", end
        return end - offset, None, None

    def _resync(self, mm: mmap.mmap, mv: memoryview, offset: int, size: int, hint: Optional[int]) -> Optional[int]:
        """The start of the first intact record after the damaged one at ``offset`` (None: none)."""
        if hint is not None and hint < size and self._check_record(mv, hint, size)[0] is not None:
            return hint
        pos = mm.find(_REC_MAGIC, offset + 1)
        while pos >= 0:
            if self._check_record(mv, pos, size)[0] is not None:
                return pos
            pos = mm.find(_REC_MAGIC, pos + 1)
        return None

    def _index_record(self, mv: memoryview, offset: int, n: int) -> Optional[str]:
        """Index the intact record at ``offset``; a reason string if its contents are unusable."""
        body_len = n - _REC_HEADER.size
        o = offset + _REC_HEADER.size
        if body_len < _BODY_FIXED.size:
            return "malformed record"
        _, n_ids, n_layers = _BODY_FIXED.unpack_from(mv, o)
        meta_len = _BODY_FIXED.size + _pad8(n_layers) + 8 * n_layers + 8 * n_ids
        if meta_len > body_len:
            return "malformed record"
        try:
            step, ids, enc = self._parse(bytearray(mv[o:o + meta_len]), offset, with_payload=False,
                                         body_len=body_len)
        except ValueError:
            return "malformed record"
        if self._recs and step <= self._recs[-1].step:
            return f"record out of order (step {step})"
        m = self.manifest
        sizes = encoding.nbytes_by_kind(enc.kinds.tolist(), enc.counts.tolist(), m.numels,
                                        m.torch_value_dtype.itemsize)
        sizes["metadata"] = _record_overhead(ids.numel(), len(m.names))
        self._pos[step] = len(self._recs)
        self._recs.append(_RecordInfo(step, ids.clone(), int(enc.counts.sum()), sizes))
        self._where.append((offset, n))
        return None

    def _parse(self, body, offset: int, with_payload: bool = True,
               body_len: Optional[int] = None) -> Tuple[int, Tensor, Encoded]:
        """(step, ids, Encoded) of a record body; kinds and counts are checked against the manifest.
        Without the payload ``body`` may be just its leading metadata, the body being ``body_len`` long."""
        m = self.manifest
        L = len(m.names)
        step, n_ids, n_layers = _BODY_FIXED.unpack_from(body, 0)
        bad = f"{self.path}: the record at byte {offset} (step {step}) is malformed"
        if n_layers != L:
            raise ValueError(f"{bad}: {n_layers} layers, the manifest has {L}")
        o = _BODY_FIXED.size
        kinds = _frombuffer(body, torch.uint8, L, o)
        o += _pad8(L)
        counts = _frombuffer(body, torch.int64, L, o)
        o += 8 * L
        ids = _frombuffer(body, torch.int64, n_ids, o)
        o += 8 * n_ids
        kl, cl = kinds.tolist(), counts.tolist()
        if any(c < 0 or c > n or k != encoding.choose_kind(c, n) for k, c, n in zip(kl, cl, m.numels)):
            raise ValueError(f"{bad}: its kinds and counts do not fit the layers")
        n_index = sum(c for k, c in zip(kl, cl) if k == encoding.INDEX)
        n_mask = sum(encoding.mask_nbytes(n) for k, n in zip(kl, m.numels) if k == encoding.BITMASK)
        vdt = m.torch_value_dtype
        if (len(body) if body_len is None else body_len) != o + 4 * n_index + vdt.itemsize * sum(cl) + n_mask:
            raise ValueError(f"{bad}: its length does not match its counts")
        index = values = mask = None
        if with_payload:
            index = _frombuffer(body, torch.int32, n_index, o)
            o += 4 * n_index
            values = _frombuffer(body, vdt, sum(cl), o)
            o += vdt.itemsize * sum(cl)
            mask = _frombuffer(body, torch.uint8, n_mask, o)
        return step, ids, Encoded(kinds, counts, values, index, mask)

    # -- writing ----------------------------------------------------------------------------------
    def _create(self, manifest: Manifest) -> None:
        raw = manifest.to_json()
        tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(_FILE_HEADER.pack(_FILE_MAGIC, _VERSION, len(raw), zlib.crc32(raw)) + raw)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(self.path):
                raise FileExistsError(f"{self.path} was created by someone else since this store was opened")
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._end = self._seen_size = _FILE_HEADER.size + len(raw)

    def _open_writer(self):
        """The append handle: locked, positioned at the end of the last intact record (cutting off a
        torn tail)."""
        f = open(self.path, "r+b", buffering=0)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RuntimeError(f"{self.path} is being written by another process") from None
        if os.fstat(f.fileno()).st_size != self._seen_size:
            f.close()
            raise RuntimeError(f"{self.path} changed since it was opened; open it again before appending")
        f.truncate(self._end)
        f.seek(self._end)
        return f

    def _submit(self, step, ids, enc) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        self._raise_if_failed()
        if self._thread is None:
            self._file = self._open_writer()
            self._queue = queue.Queue(self.max_pending)
            self._thread = threading.Thread(target=self._write_loop, name=f"DiskStore writer {self.path}",
                                            daemon=True)
            self._thread.start()
            self._atexit = lambda ref=weakref.ref(self): _close_at_exit(ref)
            atexit.register(self._atexit)
        self._queue.put((step, ids, enc))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            if self._error is not None:
                continue  # the store has failed: drop what is still queued
            step = item[0]
            try:
                size = self._write_record(*item)
            except Exception as e:  # noqa: BLE001  (any failure must reach the caller, never hang flush)
                self._error = (step, e if isinstance(e, OSError) else OSError(None, repr(e)))
                try:
                    self._file.truncate(self._end)
                except OSError:
                    pass  # the torn record is dropped on the next open anyway
                continue
            self._where.append((self._end, size))
            self._end += size

    def _write_record(self, step: int, ids: Tensor, enc: Encoded) -> int:
        L = len(enc.kinds)
        meta = (_BODY_FIXED.pack(step, ids.numel(), L) + enc.kinds.numpy().tobytes() + bytes(_pad8(L) - L)
                + enc.counts.numpy().tobytes() + ids.numpy().tobytes())
        pieces = [meta] + [_tensor_bytes(t) for t in (enc.index, enc.values, enc.mask)]
        crc = 0
        for p in pieces:
            crc = zlib.crc32(p, crc)
        body_len = sum(len(p) for p in pieces)
        head16 = struct.pack("<4sQI", _REC_MAGIC, body_len, crc)
        pieces[0] = head16 + struct.pack("<I", zlib.crc32(head16)) + meta
        for p in pieces:
            view, done = memoryview(p).cast("B"), 0
            while done < len(view):
                done += self._file.write(view[done:])
        return _REC_HEADER.size + body_len

    def _raise_if_failed(self) -> None:
        if self._error is None:
            return
        step, e = self._error
        n = len(self._where)
        if len(self._recs) > n:  # forget the records that never reached the file
            for r in self._recs[n:]:
                del self._pos[r.step]
            del self._recs[n:]
            self._id_index = None
        first = not self._error_reported
        self._error_reported = True
        if not first and self._closed:
            return  # close() after the error was reported: nothing new to say
        raise OSError(e.errno, f"{self!r}: writing the record of step {step} failed ({e.strerror or e}); "
                               f"the {n} record(s) before it are on disk and readable, it and any later "
                               "ones are not stored") from e

    def flush(self, durable: bool = False) -> None:
        """Wait until every appended record is written to the OS (``durable=True``: and fsynced)."""
        if self._thread is not None and self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            done.wait()
        self._raise_if_failed()
        if durable and self._file is not None:
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Write what is queued, fsync, stop the writer and release the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                atexit.unregister(self._atexit)
                if self._error is None:
                    os.fsync(self._file.fileno())
            self._raise_if_failed()
        finally:
            if self._file is not None:
                self._file.close()

    # -- reading ----------------------------------------------------------------------------------
    def _payloads(self, positions):
        if not self._closed:
            self.flush()
        out = []
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for p in positions:
                offset, size = self._where[p]
                buf = memoryview(_read_exact(fd, size, offset))
                _, _, body_crc, head_crc = _REC_HEADER.unpack_from(buf, 0)
                body = buf[_REC_HEADER.size:]
                if zlib.crc32(buf[:16]) != head_crc or zlib.crc32(body) != body_crc:
                    raise ValueError(f"{self.path}: the record at byte {offset} (step {self._recs[p].step}) "
                                     "fails its checksum: the file was damaged after it was opened")
                out.append(self._parse(body, offset)[2])
        finally:
            os.close(fd)
        return out


__all__ = ["Manifest", "UpdateStore", "MemoryStore", "DiskStore", "StoredUpdate", "DroppedRecords", "DroppedRegion",
           "DroppedTail", "check_update",
           "model_fingerprint", "unwrap_model", "VALUE_DTYPES"]

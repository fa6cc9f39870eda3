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
absent or has a whole manifest. Records are written in order by one background thread, so the file is
always a prefix of the appended records plus at most one torn record (a kill stops a write part-way, it
never reorders it). On open, a tail record that is cut short or fails its checksum is dropped and
reported in :attr:`DiskStore.dropped`; a damaged record *followed by* intact ones is corruption, not a
torn write, and raises ``ValueError`` (dropping it silently would leave its update un-removable).
"""
from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import queue
import struct
import threading
import weakref
import zlib
from dataclasses import dataclass
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


@dataclass
class DroppedTail:
    """What opening a DiskStore dropped: ``count`` torn/corrupt tail records (0 or 1) found at byte
    ``offset``, ``nbytes`` bytes in all."""

    count: int = 0
    offset: Optional[int] = None
    nbytes: int = 0


@dataclass
class _RecordInfo:
    step: int
    ids: Tensor
    entries: int
    nbytes: Dict[str, int]  # per encoding kind, plus "metadata" (header, ids, counts, kinds)


def _record_overhead(n_ids: int, n_layers: int) -> int:
    return _REC_HEADER.size + _BODY_FIXED.size + _pad8(n_layers) + 8 * n_layers + 8 * n_ids


def as_id_tensor(sample_ids) -> Tensor:
    return torch.as_tensor(sample_ids).detach().to("cpu", torch.int64).reshape(-1)


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
        self._check_fingerprint(manifest.fingerprint)
        for field in ("names", "keep_ratio", "value_dtype"):
            mine, theirs = getattr(self.manifest, field), getattr(manifest, field)
            if mine != theirs:
                raise ValueError(f"{self!r} was recorded with {field}={mine!r}; the recorder uses {theirs!r}")

    def append(self, step: int, sample_ids, values: Tensor, indices: Optional[Tensor], offsets: Tensor) -> None:
        """Append the update of optimizer step ``step`` (greater than every stored step) made by the
        samples ``sample_ids``: segments as :func:`unlearn_ext.ops.layerwise_topk` returns them (L+1
        offsets), or ``indices=None`` for a dense update holding every entry of every layer."""
        m = self._manifest()
        step = int(step)
        if self._recs and step <= self._recs[-1].step:
            raise ValueError(f"steps must increase: got {step} after {self._recs[-1].step}")
        if offsets.numel() != len(m.names) + 1:
            raise ValueError(f"offsets has {offsets.numel()} entries; the manifest has {len(m.names)} layers "
                             f"(expected {len(m.names) + 1})")
        ids = as_id_tensor(sample_ids)
        enc = encoding.encode(values, indices, offsets, m.numels, m.torch_value_dtype).to("cpu")
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
              max_batch_entries: int = 1 << 27) -> dict:
        """``θ += alpha · Σ Δ̂_step`` over ``steps`` (default: all) in place — ``alpha=-1`` removes them.

        The model must have this store's fingerprint; its parameters are found by the manifest's names.
        The stored updates go through one ``sparse_accumulate_`` call, or — when they hold more than
        ``max_batch_entries`` entries, to bound the decoded batch's memory (about 8 bytes an entry) —
        one call per consecutive group of records, which applies them in the same order.
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

    def dense_equivalent_nbytes(self) -> int:
        """Bytes the same records would take as dense updates in the layers' dtypes (naive amnesiac)."""
        return len(self._recs) * self.manifest.dense_nbytes() if self.manifest is not None else 0

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` (naming both fingerprints) unless ``model`` is the model recorded here."""
        self._check_fingerprint(model_fingerprint(model))

    # -- helpers ----------------------------------------------------------------------------------
    def _check_fingerprint(self, fingerprint: str) -> None:
        m = self._manifest()
        if fingerprint != m.fingerprint:
            raise ValueError(f"{self!r} was recorded for a model with fingerprint {m.fingerprint} "
                             f"({len(m.names)} trainable layers, first {m.names[0]!r}), but this model's "
                             f"fingerprint is {fingerprint}: its parameter names, shapes or dtypes differ")

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
        except OSError:
            pass  # already reported to the caller of append/flush; nothing more to do at exit


class DiskStore(UpdateStore):
    """Records appended to the file ``path`` by a background thread (SPEC §2).

    ``append`` encodes on the caller's thread and queues the record; one writer thread serialises,
    checksums and writes it, so training does not wait on I/O. The queue holds at most ``max_pending``
    records: a full queue blocks ``append`` (back-pressure, not unbounded memory). ``flush()`` returns
    once every queued record is written to the OS, ``close()`` (or leaving the ``with`` block) also
    fsyncs. A record still queued when the process dies is lost with any later one; one being written
    is torn and dropped on the next open; every record written before it stays readable.

    Opening an existing file reads the manifest and verifies every record's checksum; pass ``model=`` to
    check the fingerprint at once. A write error (a full disk: ``ENOSPC``) stops the writer: ``append``,
    ``flush`` and ``close`` raise ``OSError`` with the errno, the records written before it stay
    readable, and the failed record and those after it are not in the store. One process may write a
    store at a time (an exclusive ``flock``); readers may open it meanwhile.
    """

    def __init__(self, path, model: Optional[nn.Module] = None, *, max_pending: int = 16) -> None:
        super().__init__()
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.path = os.fspath(path)
        self.max_pending = int(max_pending)
        self.dropped = DroppedTail()
        self._where: List[Tuple[int, int]] = []  # (file offset, size) of each written record
        self._end = 0  # end of the last intact record
        self._seen_size = 0
        self._file = None
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._error: Optional[Tuple[int, OSError]] = None
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
                raise ValueError(f"{self.path}: the manifest is damaged (checksum mismatch)")
            self.manifest = Manifest.from_json(raw)
            offset = _FILE_HEADER.size + mlen
            while offset < size:
                got = self._scan_record(f, offset, size)
                if got is None:
                    self.dropped = DroppedTail(1, offset, size - offset)
                    break
                offset += got
            self._end, self._seen_size = offset, size

    def _scan_record(self, f, offset: int, size: int) -> Optional[int]:
        """Index the record at ``offset`` and return its size, or None for a torn/corrupt tail record."""
        f.seek(offset)
        head = f.read(_REC_HEADER.size)
        if len(head) < _REC_HEADER.size:
            return None
        magic, body_len, body_crc, head_crc = _REC_HEADER.unpack(head)
        if magic != _REC_MAGIC or zlib.crc32(head[:16]) != head_crc:
            if self._intact_header_after(f, offset + 1):
                raise ValueError(f"{self.path}: the record header at byte {offset} is damaged and intact "
                                 "records follow it (corruption, not a torn write)")
            return None
        end = offset + _REC_HEADER.size + body_len
        if end > size:
            return None
        body = bytearray(body_len)
        f.readinto(body)
        if zlib.crc32(body) != body_crc:
            if end < size:
                raise ValueError(f"{self.path}: the record at byte {offset} fails its checksum and "
                                 f"{size - end} bytes of records follow it (corruption, not a torn write)")
            return None
        step, ids, enc = self._parse(body, offset, with_payload=False)
        m = self.manifest
        sizes = encoding.nbytes_by_kind(enc.kinds.tolist(), enc.counts.tolist(), m.numels,
                                        m.torch_value_dtype.itemsize)
        sizes["metadata"] = _record_overhead(ids.numel(), len(m.names))
        if self._recs and step <= self._recs[-1].step:
            raise ValueError(f"{self.path}: record at byte {offset} has step {step} after step "
                             f"{self._recs[-1].step}")
        self._pos[step] = len(self._recs)
        self._recs.append(_RecordInfo(step, ids.clone(), int(enc.counts.sum()), sizes))
        self._where.append((offset, end - offset))
        return end - offset

    def _intact_header_after(self, f, start: int) -> bool:
        f.seek(start)
        rest = f.read()
        i = rest.find(_REC_MAGIC)
        while i >= 0:
            head = rest[i:i + _REC_HEADER.size]
            if len(head) == _REC_HEADER.size and zlib.crc32(head[:16]) == _REC_HEADER.unpack(head)[3]:
                return True
            i = rest.find(_REC_MAGIC, i + 1)
        return False

    def _parse(self, body, offset: int, with_payload: bool = True) -> Tuple[int, Tensor, Encoded]:
        """(step, ids, Encoded) of a record body; kinds and counts are checked against the manifest."""
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
        if any(k != encoding.choose_kind(c, n) or c > n for k, c, n in zip(kl, cl, m.numels)):
            raise ValueError(f"{bad}: its kinds and counts do not fit the layers")
        n_index = sum(c for k, c in zip(kl, cl) if k == encoding.INDEX)
        n_mask = sum(encoding.mask_nbytes(n) for k, n in zip(kl, m.numels) if k == encoding.BITMASK)
        vdt = m.torch_value_dtype
        if len(body) != o + 4 * n_index + vdt.itemsize * sum(cl) + n_mask:
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
        with open(tmp, "wb") as f:
            f.write(_FILE_HEADER.pack(_FILE_MAGIC, _VERSION, len(raw), zlib.crc32(raw)) + raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
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
            except OSError as e:
                self._error = (step, e)
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
        raise OSError(e.errno, f"{self!r}: writing the record of step {step} failed ({e.strerror or e}); "
                               f"the {n} records before it are on disk and readable, it and any later "
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


__all__ = ["Manifest", "UpdateStore", "MemoryStore", "DiskStore", "StoredUpdate", "DroppedTail",
           "model_fingerprint", "unwrap_model", "VALUE_DTYPES"]

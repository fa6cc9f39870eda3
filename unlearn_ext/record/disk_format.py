"""The bytes of a :class:`~unlearn_ext.record.DiskStore` file and how a file is read back
(docs/store-format.md#file-format).

File format (little-endian)::

    file     := header manifest record* trailer?
    header   := b"ULXSTORE" u32 version u32 manifest_len u32 crc32(manifest)
    manifest := JSON (Manifest.to_json)
    record   := b"ULXR" u64 body_len u32 crc32(body) u32 crc32(the 16 bytes before) body
    body     := i64 step u32 n_ids u32 L | u8 kind[L] (zero-padded to 8) | i64 count[L] | i64 ids[n_ids]
                | i32 index[...] | values[...] (value dtype) | u8 mask[...]
    trailer  := b"ULXT" u64 record_count u32 crc32(the 12 bytes before)

Records follow in increasing step order; every record carries two checksums (of its 16 header bytes
and of its body).

The trailer (format version 2) says the file was closed cleanly. A new file is created with one
(``record_count`` 0), a writer cuts it off before appending its first record and writes a new one
when it is closed, so a file that ends in a valid trailer holds every record its writer appended —
``record_count`` of them. A file without one was not closed: its writer was killed, crashed or failed
to write, is still writing, or the file was cut, perhaps exactly at a record boundary, which no
checksum can see. The trailer is shorter than a record header, so a torn or damaged trailer is never
taken for a lost record. Version 1 files (before the trailer) are read as before, nothing being said
about how they were closed; appending to one rewrites its version to 2 first.

Reading back (:func:`scan`): every record is verified. A record that fails (a torn tail, a flipped byte,
a zeroed block) is dropped and every intact record around it is kept: a damaged header is skipped by
searching for the next record whose header and body checksums both hold. What was dropped is reported
as :class:`DroppedRecords`: byte ranges, reasons and the intact steps on either side, whether the file
lacks its trailer and whether the trailer's count disagrees with the intact records.
"""
from __future__ import annotations

import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, List, Optional, Tuple, Union

import numpy as np
import torch

from . import encoding
from .encoding import Encoded
from .identity import Manifest

Tensor = torch.Tensor

FILE_HEADER = struct.Struct("<8sIII")  # magic, version, manifest length, manifest crc32
FILE_MAGIC, VERSION, READABLE_VERSIONS = b"ULXSTORE", 2, (1, 2)
VERSION_OFFSET = len(FILE_MAGIC)
REC_HEADER = struct.Struct("<4sQII")  # magic, body length, body crc32, crc32 of the 16 bytes before
REC_MAGIC = b"ULXR"
BODY_FIXED = struct.Struct("<qII")  # step, number of sample ids, number of layers
TRAILER = struct.Struct("<4sQI")  # magic, record count, crc32 of the 12 bytes before
TRAILER_MAGIC = b"ULXT"
# Reasons of a region at the end of the records that lost no whole record (no damage to report).
TAIL_REASONS = ("torn tail", "damaged trailer")
# Bit patterns of infinity/NaN: every exponent bit set.
_EXPONENT_BITS = {torch.float32: (np.uint32, 0x7F800000), torch.float16: (np.uint16, 0x7C00),
                  torch.bfloat16: (np.uint16, 0x7F80)}


def pad8(n: int) -> int:
    return (n + 7) & ~7


def record_overhead(n_ids: int, n_layers: int) -> int:
    """Bytes of a record beside its payload: header, step, ids, kinds and counts."""
    return REC_HEADER.size + BODY_FIXED.size + pad8(n_layers) + 8 * n_layers + 8 * n_ids


def file_overhead(manifest: Manifest) -> int:
    """Bytes of a closed file beside its records: header, manifest and trailer."""
    return FILE_HEADER.size + len(manifest.to_json()) + TRAILER.size


def file_start(manifest: Manifest) -> bytes:
    raw = manifest.to_json()
    return FILE_HEADER.pack(FILE_MAGIC, VERSION, len(raw), zlib.crc32(raw)) + raw


def trailer(record_count: int) -> bytes:
    head = struct.pack("<4sQ", TRAILER_MAGIC, record_count)
    return head + struct.pack("<I", zlib.crc32(head))


def _tensor_bytes(t: Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).numpy())


def record_pieces(step: int, ids: Tensor, enc: Encoded) -> List[Union[bytes, memoryview]]:
    """A record's bytes in pieces (header with metadata, index, values, mask), to write in order."""
    L = len(enc.kinds)
    meta = (BODY_FIXED.pack(step, ids.numel(), L) + enc.kinds.numpy().tobytes() + bytes(pad8(L) - L)
            + enc.counts.numpy().tobytes() + ids.numpy().tobytes())
    pieces = [meta] + [_tensor_bytes(t) for t in (enc.index, enc.values, enc.mask)]
    crc = 0
    for p in pieces:
        crc = zlib.crc32(p, crc)
    pieces[0] = frame_header(REC_MAGIC, sum(len(p) for p in pieces), crc) + meta
    return pieces


def frame_header(magic: bytes, body_len: int, body_crc: int) -> bytes:
    """The 20-byte header framing a checksummed body (``REC_HEADER``): ``magic u64 body_len u32 crc32(body)
    u32 crc32(the 16 bytes before)``. Store records and request-log entries share it."""
    head16 = struct.pack("<4sQI", magic, body_len, body_crc)
    return head16 + struct.pack("<I", zlib.crc32(head16))


# -- reading ----------------------------------------------------------------------------------------

def read_start(f: BinaryIO, path: str) -> Tuple[int, Manifest, int]:
    """``(version, manifest, offset of the first record)`` of the open file ``f``; ``ValueError``
    naming ``path`` if it is no store, a version this code cannot read, or its manifest is damaged."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(FILE_HEADER.size)
    if len(head) < FILE_HEADER.size:
        raise ValueError(f"{path} is not an update store (only {size} bytes)")
    magic, version, mlen, mcrc = FILE_HEADER.unpack(head)
    if magic != FILE_MAGIC:
        raise ValueError(f"{path} is not an update store (bad magic {magic!r})")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{path} has store format version {version}; this code reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    raw = f.read(mlen)
    if len(raw) != mlen or zlib.crc32(raw) != mcrc:
        raise ValueError(f"{path}: the manifest is damaged (checksum mismatch); no record can be interpreted "
                         "without it")
    return version, Manifest.from_json(raw, path), FILE_HEADER.size + mlen


def read_record(fd: int, offset: int, size: int, manifest: Manifest, path: str, step: int) -> Encoded:
    """The payload of the record at ``offset``, its checksums verified again and its step compared with
    ``step``, the one indexed there (the file may have changed since it was scanned)."""
    buf = bytearray(size)
    view, done = memoryview(buf), 0
    while done < size:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ValueError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n
    _, _, body_crc, head_crc = REC_HEADER.unpack_from(view, 0)
    body = view[REC_HEADER.size:]
    if zlib.crc32(view[:16]) != head_crc or zlib.crc32(body) != body_crc:
        raise ValueError(f"{path}: the record at byte {offset} (step {step}) fails its checksum: the file was "
                         "damaged after it was opened")
    found, _, enc = parse_body(body, offset, manifest, path)
    if found != step:
        raise ValueError(f"{path}: the record at byte {offset} holds step {found} where this handle indexed step "
                         f"{step}: the file was rewritten since it was opened (by another run?)")
    return enc


def _frombuffer(buf, dtype: torch.dtype, count: int, offset: int) -> Tensor:
    if count == 0:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset)


@dataclass
class RecordMeta:
    """A record body's metadata, checked against the manifest: where its payload starts (``payload``, an
    offset into the body) and how many index entries, values and mask bytes it holds."""

    step: int
    ids: Tensor
    kinds: List[int]
    counts: List[int]
    payload: int
    n_index: int
    n_values: int
    n_mask: int


def parse_meta(body, offset: int, manifest: Manifest, path: str, body_len: int) -> RecordMeta:
    """The metadata of the record body ``body`` (a buffer that holds at least it; the body is ``body_len``
    long); ``ValueError`` naming ``path`` and the record's ``offset`` when it does not fit the manifest."""
    numels = manifest.numels
    L = len(numels)
    step, n_ids, n_layers = BODY_FIXED.unpack_from(body, 0)
    bad = f"{path}: the record at byte {offset} (step {step}) is malformed"
    if n_layers != L:
        raise ValueError(f"{bad}: {n_layers} layers, the manifest has {L}")
    o = BODY_FIXED.size
    kinds = list(struct.unpack_from(f"<{L}B", body, o))
    o += pad8(L)
    counts = list(struct.unpack_from(f"<{L}q", body, o))
    o += 8 * L
    ids = torch.from_numpy(np.frombuffer(body, dtype=np.int64, count=n_ids, offset=o).copy())
    o += 8 * n_ids
    n_index = n_mask = 0
    for k, c, n in zip(kinds, counts, numels):
        if c < 0 or c > n or k != encoding.choose_kind(c, n):
            raise ValueError(f"{bad}: its kinds and counts do not fit the layers")
        if k == encoding.INDEX:
            n_index += c
        elif k == encoding.BITMASK:
            n_mask += encoding.mask_nbytes(n)
    n_values = sum(counts)
    if body_len != o + 4 * n_index + manifest.torch_value_dtype.itemsize * n_values + n_mask:
        raise ValueError(f"{bad}: its length does not match its counts")
    return RecordMeta(step, ids, kinds, counts, o, n_index, n_values, n_mask)


def parse_body(body, offset: int, manifest: Manifest, path: str) -> Tuple[int, Tensor, Encoded]:
    """(step, ids, Encoded) of a whole record body (a writable buffer, which the payload tensors view)."""
    meta = parse_meta(body, offset, manifest, path, len(body))
    o, vdt = meta.payload, manifest.torch_value_dtype
    index = _frombuffer(body, torch.int32, meta.n_index, o)
    o += 4 * meta.n_index
    values = _frombuffer(body, vdt, meta.n_values, o)
    o += vdt.itemsize * meta.n_values
    mask = _frombuffer(body, torch.uint8, meta.n_mask, o)
    kinds = torch.tensor(meta.kinds, dtype=torch.uint8)
    counts = torch.tensor(meta.counts, dtype=torch.int64)
    return meta.step, meta.ids, Encoded(kinds, counts, values, index, mask)


@dataclass(frozen=True)
class DroppedRegion:
    """A byte range of a store file that opening it dropped: ``reason`` says why (``"torn tail"``,
    ``"damaged trailer"``, ``"checksum mismatch"``, ``"damaged record header"``, ``"malformed record"``,
    ...). The region held at least one record — unless its reason is one of :data:`TAIL_REASONS`: an
    end of the file too short for a record header. Its records' steps lie strictly between
    ``after_step`` and ``before_step``, the intact steps around it (None: no intact record on that
    side). ``tail``: it reaches the end of the file, and no valid trailer follows (what a kill during a
    write leaves)."""

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
    """What opening a DiskStore dropped or could not vouch for.

    ``regions``: one :class:`DroppedRegion` per damaged byte range, in file order (``count`` of them,
    ``nbytes`` bytes in all, ``offset`` of the first); ``torn_tail`` when the last one is the end of
    a file that was not closed; ``damaged`` the regions whose records' updates are lost although
    later records survived (or whose loss a trailer proves). ``unclean``: the file (format 2) has no
    valid trailer, so it was not closed cleanly — records its writer appended after the last intact
    one may be missing without a trace. ``expected``: the record count its trailer states (None
    without one), ``kept``: the intact records found; ``count_mismatch`` when they differ.
    A ``DroppedRecords`` is true when it has anything to report."""

    regions: List[DroppedRegion] = field(default_factory=list)
    unclean: bool = False
    expected: Optional[int] = None
    kept: int = 0

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
        return [r for r in self.regions if not (r.tail and r.reason in TAIL_REASONS)]

    @property
    def count_mismatch(self) -> bool:
        return self.expected is not None and self.expected != self.kept

    def __bool__(self) -> bool:
        return bool(self.regions) or self.unclean or self.count_mismatch

    def __str__(self) -> str:
        parts = list(map(str, self.regions))
        if self.count_mismatch:
            parts.append(f"its trailer counts {self.expected} records but {self.kept} are intact")
        if self.unclean:
            parts.append("not closed cleanly (no valid trailer)")
        return "; ".join(parts) if parts else "nothing dropped"


@dataclass
class ScannedRecord:
    """An intact record found by :func:`scan`: where it is, what it holds, whether its values are finite."""

    offset: int
    size: int
    step: int
    ids: Tensor
    kinds: List[int]
    counts: List[int]
    finite: bool


def scan(mm: mmap.mmap, start: int, version: int, manifest: Manifest,
         path: str) -> Tuple[List[ScannedRecord], DroppedRecords]:
    """Every intact record of the file mapped by ``mm`` (its records begin at ``start``) and what was
    dropped (module docstring)."""
    return _Scanner(mm, manifest, path).run(start, version)


class _Scanner:
    def __init__(self, mm: mmap.mmap, manifest: Manifest, path: str) -> None:
        self.mm, self.manifest, self.path = mm, manifest, path
        self.records: List[ScannedRecord] = []

    def run(self, start: int, version: int) -> Tuple[List[ScannedRecord], DroppedRecords]:
        size = len(self.mm)
        expected = self._trailer_count(start, size) if version >= 2 else None
        end = size - TRAILER.size if expected is not None else size
        bad: List[Tuple[int, int, str, int]] = []  # (offset, end, reason, number of intact records before)
        offset = start
        with memoryview(self.mm) as mv:
            while offset < end:
                n, reason, hint = check_frame(mv, offset, end)
                if n is not None:
                    reason = self._index(mv, offset, n)
                    if reason is None:
                        offset += n
                        continue
                    hint = offset + n  # intact bytes, unusable contents: skip exactly this record
                nxt = self._resync(mv, offset, end, hint)
                stop = end if nxt is None else nxt
                if bad and bad[-1][1] == offset and bad[-1][3] == len(self.records):
                    bad[-1] = (bad[-1][0], stop, bad[-1][2], bad[-1][3])  # merge adjacent damage
                else:
                    bad.append((offset, stop, reason, len(self.records)))
                offset = stop
        steps = [r.step for r in self.records]
        regions = []
        for lo, hi, reason, before in bad:
            tail = hi == size and before == len(steps)
            if tail and reason in ("cut short", "header cut short"):
                reason = "torn tail"
                if hi - lo == TRAILER.size and self.mm[lo:lo + len(TRAILER_MAGIC)] == TRAILER_MAGIC:
                    reason = "damaged trailer"
            regions.append(DroppedRegion(lo, hi - lo, reason, steps[before - 1] if before else None,
                                         steps[before] if before < len(steps) else None, tail))
        dropped = DroppedRecords(regions, unclean=version >= 2 and expected is None, expected=expected,
                                 kept=len(steps))
        return self.records, dropped

    def _trailer_count(self, start: int, size: int) -> Optional[int]:
        """The record count of a valid trailer ending the file, else None."""
        if size - start < TRAILER.size:
            return None
        magic, count, crc = TRAILER.unpack_from(self.mm, size - TRAILER.size)
        if magic != TRAILER_MAGIC or zlib.crc32(self.mm[size - TRAILER.size:size - 4]) != crc:
            return None
        return count

    def _resync(self, mv: memoryview, offset: int, end: int, hint: Optional[int]) -> Optional[int]:
        """The start of the first intact record after the damaged one at ``offset`` (None: none)."""
        if hint is not None and hint < end and check_frame(mv, hint, end)[0] is not None:
            return hint
        pos = self.mm.find(REC_MAGIC, offset + 1, end)
        while pos >= 0:
            if check_frame(mv, pos, end)[0] is not None:
                return pos
            pos = self.mm.find(REC_MAGIC, pos + 1, end)
        return None

    def _index(self, mv: memoryview, offset: int, n: int) -> Optional[str]:
        """Index the intact record at ``offset``; a reason string if its contents are unusable."""
        body_len = n - REC_HEADER.size
        o = offset + REC_HEADER.size
        if body_len < BODY_FIXED.size:
            return "malformed record"
        _, n_ids, n_layers = BODY_FIXED.unpack_from(mv, o)
        if BODY_FIXED.size + pad8(n_layers) + 8 * n_layers + 8 * n_ids > body_len:
            return "malformed record"
        try:
            meta = parse_meta(mv[o:o + body_len], offset, self.manifest, self.path, body_len)
        except ValueError:
            return "malformed record"
        if self.records and meta.step <= self.records[-1].step:
            return f"record out of order (step {meta.step})"
        finite = _finite(mv, o + meta.payload + 4 * meta.n_index, meta.n_values, self.manifest.torch_value_dtype)
        self.records.append(ScannedRecord(offset, n, meta.step, meta.ids, meta.kinds, meta.counts, finite))
        return None


def check_frame(mv: memoryview, offset: int, end: int,
                magic_expected: bytes = REC_MAGIC) -> Tuple[Optional[int], Optional[str], Optional[int]]:
    """``(frame size, None, None)`` for a frame (:func:`frame_header` + body) whose checksums hold within
    ``mv[:end]``, else ``(None, reason, where the next frame should start if the header is intact)``."""
    if end - offset < REC_HEADER.size:
        return None, "header cut short", None
    magic, body_len, body_crc, head_crc = REC_HEADER.unpack_from(mv, offset)
    if magic != magic_expected or zlib.crc32(mv[offset:offset + 16]) != head_crc:
        return None, "damaged record header", None
    stop = offset + REC_HEADER.size + body_len
    if stop > end:
        return None, "cut short", None
    if zlib.crc32(mv[offset + REC_HEADER.size:stop]) != body_crc:
        return None, "checksum mismatch", stop
    return stop - offset, None, None


def _finite(mv: memoryview, offset: int, count: int, dtype: torch.dtype) -> bool:
    """No infinity or NaN among the ``count`` values of ``dtype`` at ``offset`` (read in place)."""
    if count == 0:
        return True
    bits, exponent = _EXPONENT_BITS[dtype]
    return int((np.frombuffer(mv, dtype=bits, count=count, offset=offset) & exponent).max()) != exponent


def set_version(fd: int, version: int) -> None:
    os.pwrite(fd, struct.pack("<I", version), VERSION_OFFSET)


__all__ = ["DroppedRecords", "DroppedRegion", "REC_HEADER", "RecordMeta", "ScannedRecord", "TAIL_REASONS", "VERSION",
           "check_frame", "file_overhead", "file_start", "frame_header", "parse_body", "parse_meta", "read_record",
           "read_start", "record_overhead", "record_pieces", "scan", "set_version", "trailer"]

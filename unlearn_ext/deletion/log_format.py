"""The bytes of a request log and how a log file is read back.

File format (little-endian)::

    file   := header entry*
    header := b"ULXRQLOG" u32 version u32 json_len u32 crc32(json) json
    entry  := b"ULXQ" u64 body_len u32 crc32(body) u32 crc32(the 16 bytes before) body
    body   := JSON (UTF-8): one served request's receipt

The header's JSON binds the log to one recording (its model fingerprint, keep ratio, value dtype and
:func:`~.digest.recording_digest`) and names the state requests start from (``genesis_sha256``); the
recipe that trained it, when ``unlearn-ext train`` made it. Entries are framed like the store's records
(:func:`unlearn_ext.record.disk_format.frame_header`): two checksums each.

What a log file promises:

* Creation is atomic and never replaces a log (:func:`unlearn_ext.durable.create_whole`): a log is absent
  or has its whole header.
* An entry is appended by one ``write`` after the request's output is durable, then fsynced; a kill during
  it leaves at most one torn entry — a prefix of it — at the end. Reading back drops a torn end (cut short)
  and reports it: that request was not acknowledged, and running it again serves it (its output is
  recomputed, bitwise the same). The next append cuts the torn end off first.
* Any other damage — an entry followed by intact ones, or a whole last entry that fails its checksum (a kill
  writes a prefix, never wrong bytes: it may be an acknowledged request) — means the log no longer says which
  steps were undone: reading it raises ``ValueError`` naming the byte offset, and no request is served from it.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..record.disk_format import REC_HEADER, check_frame, frame_header

LOG_HEADER = struct.Struct("<8sIII")  # magic, version, JSON length, crc32 of the JSON
LOG_MAGIC, LOG_VERSION = b"ULXRQLOG", 1
ENTRY_MAGIC = b"ULXQ"
#: Why an entry at the end may fail that only a write stopped part-way explains (a kill writes a prefix).
TORN = ("header cut short", "cut short")


def header_bytes(header: dict) -> bytes:
    raw = json.dumps(header, sort_keys=True).encode()
    return LOG_HEADER.pack(LOG_MAGIC, LOG_VERSION, len(raw), zlib.crc32(raw)) + raw


def entry_bytes(entry: dict) -> bytes:
    body = json.dumps(entry, sort_keys=True).encode()
    return frame_header(ENTRY_MAGIC, len(body), zlib.crc32(body)) + body


@dataclass
class LogContents:
    """A log file read back: its header, its intact entries in order, where they end, and the torn end that
    was dropped (``(offset, nbytes)``, or None)."""

    header: dict
    entries: List[dict]
    end: int
    torn: Optional[Tuple[int, int]]


def read_log(fd: int, path: str) -> LogContents:
    """Read the whole log open at ``fd`` (module docstring); ``ValueError`` naming ``path`` if it is no log, its
    header is damaged, or an entry other than the last is."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    while len(data) < size:
        more = os.pread(fd, size - len(data), len(data))
        if not more:
            break
        data += more
    if len(data) < LOG_HEADER.size:
        raise ValueError(f"{path} is not a request log (only {len(data)} bytes)")
    magic, version, n, crc = LOG_HEADER.unpack_from(data, 0)
    if magic != LOG_MAGIC:
        raise ValueError(f"{path} is not a request log (bad magic {magic!r})")
    if version != LOG_VERSION:
        raise ValueError(f"{path} has request-log format version {version}; this code reads {LOG_VERSION}")
    raw = data[LOG_HEADER.size:LOG_HEADER.size + n]
    if len(raw) != n or zlib.crc32(raw) != crc:
        raise ValueError(f"{path}: the log's header is damaged (checksum mismatch)")
    header = _json_object(raw)
    if header is None:
        raise ValueError(f"{path}: the log's header is not a JSON object")
    entries: List[dict] = []
    offset = LOG_HEADER.size + n
    mv = memoryview(data)
    while offset < len(data):
        frame, reason, _ = check_frame(mv, offset, len(data), ENTRY_MAGIC)
        entry = None if frame is None else _json_object(data[offset + REC_HEADER.size:offset + frame])
        if entry is None:
            later = _next_intact(data, offset + 1)
            if later is None and reason in TORN:
                return LogContents(header, entries, offset, (offset, len(data) - offset))
            why = (f"an intact one follows at byte {later}" if later is not None else
                   "it is whole but fails its checksum, so it is no torn write and may be an acknowledged request")
            raise ValueError(f"{path}: the log entry at byte {offset} is damaged ({reason or 'not a JSON object'}) "
                             f"and {why}: the log no longer says which steps were undone, so no request can be "
                             "served from it; restore it from a copy")
        entries.append(entry)
        offset += frame
    return LogContents(header, entries, offset, None)


def _next_intact(data: bytes, start: int) -> Optional[int]:
    """The offset of the first intact entry at or after ``start`` (None: none)."""
    mv = memoryview(data)
    pos = data.find(ENTRY_MAGIC, start)
    while pos >= 0:
        frame = check_frame(mv, pos, len(data), ENTRY_MAGIC)[0]
        if frame is not None and _json_object(data[pos + REC_HEADER.size:pos + frame]) is not None:
            return pos
        pos = data.find(ENTRY_MAGIC, pos + 1)
    return None


def _json_object(raw: bytes) -> Optional[dict]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


__all__ = ["ENTRY_MAGIC", "LOG_MAGIC", "LogContents", "entry_bytes", "header_bytes", "read_log"]

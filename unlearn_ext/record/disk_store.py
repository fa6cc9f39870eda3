"""DiskStore: an update store in a crash-safe file, written by a background thread
(docs/store-format.md#crash-promises).

The bytes are those of :mod:`.disk_format`. What the file promises:

* Creation is atomic and never replaces a file (:func:`~unlearn_ext.durable.create_whole`): the header,
  manifest and an empty trailer are written aside, fsynced and hard-linked to the path, so a store is
  either absent or has a whole manifest, and of two processes (or handles) creating the same path one wins
  and the other raises ``FileExistsError``. On a file system without hard links the file is created
  exclusively (``O_EXCL``) in place instead — a kill during those few bytes then leaves a file that opens
  with a ``ValueError``.
* Records are written in order by one thread, so after a kill the file is a prefix of the appended
  records plus at most one torn record (a kill stops a write part-way, it never reorders it).
* ``close()`` writes the trailer with the record count; a file without it was not closed cleanly, and
  opening it says so (``dropped.unclean`` and a warning).
* One handle writes a file at a time (an exclusive ``flock``, taken by the first append); readers may
  open it meanwhile (they find no trailer yet, and report it as not closed cleanly).
* A handle reads only the file it opened: it keeps that file's descriptor, so when the path is later
  replaced (another run creating a store of the same name) it goes on reading its own records, says so
  once (``RuntimeWarning``), and refuses to append to the new file. Each record read back must hold the
  step the handle indexed at that offset: a file rewritten in place with other records whose checksums
  hold is refused (``ValueError``), never applied.
* It warns before it outgrows the disk: a ``RuntimeWarning`` (once per handle) when the free space of
  its file system is less than what it still needs — the rest of ``expected_nbytes`` (the size
  :func:`~unlearn_ext.record.planner.plan_storage` gives) or room for ``LOW_SPACE_RECORDS`` more
  records like the last one, whichever is more; checked at creation and after an append — skipped when
  the last check, under ``SPACE_RECHECK_SECONDS`` ago, left room for twice that beyond what was appended
  since (a ``statvfs`` costs about as much as encoding a small model's update).
"""
from __future__ import annotations

import atexit
import fcntl
import mmap
import os
import queue
import shutil
import sys
import threading
import time
import warnings
import weakref
from typing import List, Optional, Tuple

from torch import nn

from ..durable import create_whole
from . import disk_format as fmt
from .disk_format import DroppedRecords
from .encoding import Encoded
from .identity import Manifest
from .store import RecordInfo, UpdateStore

# The handles of this process that are appending, by (device, inode) of their file: a second handle
# that cannot lock the file is told it is open here, not in another process.
_APPENDING: "weakref.WeakValueDictionary[Tuple[int, int], DiskStore]" = weakref.WeakValueDictionary()
LOW_SPACE_RECORDS = 100  # warn when the disk has room for fewer records than this (module docstring)
SPACE_RECHECK_SECONDS = 1.0  # how long a free-space check with a wide margin stands (module docstring)


def _close_at_exit(ref) -> None:
    store = ref()
    if store is not None:
        try:
            store.close()
        except OSError as e:
            # Raised by close() itself only when no earlier call reported it (see _raise_if_failed).
            print(f"unlearn_ext: {e}", file=sys.stderr)


def _write_all(f, pieces) -> None:
    for p in pieces:
        view, done = memoryview(p).cast("B"), 0
        while done < len(view):
            done += f.write(view[done:])


class DiskStore(UpdateStore):
    """Records appended to the file ``path`` by a background thread.

    ``append`` checks and encodes on the caller's thread and queues the record; one writer thread
    serialises, checksums and writes it, so training does not wait on I/O. The queue holds at most
    ``max_pending`` records: a full queue blocks ``append`` (back-pressure, not unbounded memory).
    ``flush()`` returns once every queued record is written to the OS, ``flush(durable=True)`` and
    ``close()`` (or leaving the ``with`` block) also fsync; ``close()`` then writes the trailer.

    Crash safety: a process killed at any moment leaves every record whose write had finished readable;
    the one being written is torn and dropped (and cut off) on the next open. Records still *queued*
    — appended but not yet written, at most ``max_pending`` — die with the process; call ``flush()`` where
    a step must be on disk before going on. (Written means handed to the OS: a killed process loses
    nothing the kernel holds; surviving a power cut needs ``flush(durable=True)``.)

    Opening an existing file reads the manifest (every field checked) and verifies every record's
    checksums; damaged records are dropped and reported in :attr:`dropped` (a
    :class:`~unlearn_ext.record.DroppedRecords`: byte ranges, reasons, the intact steps on either side,
    a missing trailer, a trailer count that disagrees) with a ``RuntimeWarning`` whenever there is
    anything to report — the update of a dropped record can no longer be removed, so the caller must
    know. ``strict=True`` raises ``ValueError`` instead for damage (anything but a torn tail or a
    missing trailer). Pass ``model=`` to check the fingerprint at once; ``expected_nbytes`` (the
    planned size) makes the free-space warning (module docstring) look that far ahead. A write error (a full disk:
    ``ENOSPC``, a file-size limit: ``EFBIG``) stops the writer: the next ``append``, ``flush`` or
    ``close`` raises ``OSError`` with the errno, naming the step that failed; the records written before
    it stay readable, and the failed record and those after it are not in the store (``len(store)``
    shrinks to what is on disk). An error nobody was told of by exit is printed to stderr then.
    """

    def __init__(self, path, model: Optional[nn.Module] = None, *, max_pending: int = 16,
                 strict: bool = False, expected_nbytes: Optional[int] = None) -> None:
        super().__init__()
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if expected_nbytes is not None and (isinstance(expected_nbytes, bool) or not isinstance(expected_nbytes, int)
                                            or expected_nbytes < 0):
            raise ValueError(f"expected_nbytes must be None or an integer >= 0, got {expected_nbytes!r}")
        self.expected_nbytes = expected_nbytes
        self._size = 0  # of the file once every appended record is written (and the trailer)
        self._space_warned = False
        self._space_checked: Optional[Tuple[float, int, int]] = None  # (monotonic time, free bytes, _size)
        self.path = os.fspath(path)
        self.max_pending = int(max_pending)
        self.strict = bool(strict)
        self.dropped = DroppedRecords()
        self._version = fmt.VERSION
        self._where: List[Tuple[int, int]] = []  # (file offset, size) of each written record
        self._end = 0  # end of the last intact record
        self._seen_size = 0
        self._file = None
        self._file_key: Optional[Tuple[int, int]] = None
        self._fd: Optional[int] = None  # the file this handle opened or created, read through to the end
        self._key: Optional[Tuple[int, int]] = None  # its (device, inode)
        self._path_warned = False
        self._thread: Optional[threading.Thread] = None
        self._queue: Optional[queue.Queue] = None
        self._error: Optional[Tuple[int, OSError]] = None
        self._error_reported = False
        self._closed = False
        if os.path.exists(self.path):
            self._load()
        elif not os.path.isdir(self._folder()):
            raise FileNotFoundError(f"cannot create the store {self.path}: its folder {self._folder()} does not "
                                    "exist")
        if model is not None:
            self.check_model(model)

    def __repr__(self) -> str:
        return f"DiskStore({self.path!r}, {len(self)} records)"

    def _folder(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))

    # -- opening ----------------------------------------------------------------------------------
    def _adopt(self, fd: int) -> None:
        """Read through ``fd`` (this handle's file) from now on; it is closed when the handle is collected."""
        st = os.fstat(fd)
        self._fd, self._key = fd, (st.st_dev, st.st_ino)
        weakref.finalize(self, os.close, fd)

    def _load(self) -> None:
        with open(self.path, "rb") as f:
            self._adopt(os.dup(f.fileno()))
            self._version, self.manifest, start = fmt.read_start(f, self.path)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                records, self.dropped = fmt.scan(mm, start, self._version, self.manifest, self.path)
                self._seen_size = len(mm)
        for r in records:
            self._add(RecordInfo.of(r.step, r.ids, r.kinds, r.counts, self.manifest, r.finite))
            self._where.append((r.offset, r.size))
        self._end = records[-1].offset + records[-1].size if records else start
        self._size = self.nbytes()
        d = self.dropped
        if self.strict and (d.damaged or d.count_mismatch):
            raise ValueError(f"{self.path} is damaged: {d}")
        if d:
            warnings.warn(self._report(), RuntimeWarning, stacklevel=3)

    def _report(self) -> str:
        d = self.dropped
        last = f"the last at step {self._recs[-1].step}" if self._recs else "none"
        parts = [f"{self.path}: kept {len(self._recs)} intact records ({last})"]
        if d.damaged:
            parts.append(f"Dropped {len(d.damaged)} damaged region(s): {'; '.join(map(str, d.damaged))}; the "
                         "updates of the dropped records are lost and can no longer be removed")
        if d.count_mismatch:
            parts.append(f"Its trailer says it holds {d.expected} records, so {abs(d.expected - d.kept)} "
                         f"record(s) are {'missing' if d.expected > d.kept else 'unaccounted for'}")
        if d.torn_tail:
            parts.append(f"Its torn end was dropped ({d.regions[-1]})")
        if d.unclean:
            parts.append("It was not closed cleanly (no valid trailer): its writer was killed, crashed or "
                         "failed to write, or is still writing, or the file was cut; records appended after "
                         "the last intact one that had not reached the file are not in it")
        return ". ".join(parts) + "."

    # -- writing ----------------------------------------------------------------------------------
    def _create(self, manifest: Manifest) -> None:
        data = fmt.file_start(manifest) + fmt.trailer(0)
        self._adopt(create_whole(self.path, data, self._lost_creation))
        self._end = len(data) - fmt.TRAILER.size
        self._seen_size = self._size = len(data)
        self._warn_if_disk_short(0)

    def _lost_creation(self) -> FileExistsError:
        return FileExistsError(f"{self.path} was created by another process or store handle while this one was "
                               "creating it; nothing was written to it. Open it again (DiskStore(path)) to "
                               "append to the store that is there")

    def _open_writer(self):
        """The append handle: locked, positioned at the end of the last intact record (cutting off the
        trailer or a torn tail)."""
        f = open(self.path, "r+b", buffering=0)
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino)
        if key != self._key:
            f.close()
            raise RuntimeError(f"{self.path} now holds another file than the one {self!r} opened; nothing was "
                               "appended: open the path again (DiskStore(path)) to append to the file that is there")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            if key in _APPENDING:
                raise RuntimeError(f"{self.path} is already open for appending in this process, by "
                                   f"{_APPENDING[key]!r}: append through that handle, or close it first") from None
            raise RuntimeError(f"{self.path} is being written by another process") from None
        if st.st_size != self._seen_size:
            f.close()
            raise RuntimeError(f"{self.path} changed since it was opened; open it again before appending")
        if self._version != fmt.VERSION:  # an older file: from now on it has (or lacks) a trailer
            fmt.set_version(f.fileno(), fmt.VERSION)
            self._version = fmt.VERSION
        f.truncate(self._end)
        f.seek(self._end)
        self._file_key = key
        _APPENDING[key] = self
        return f

    def append(self, *args, **kwargs) -> None:
        super().append(*args, **kwargs)
        last = sum(self._recs[-1].nbytes.values())
        self._size += last
        self._warn_if_disk_short(last)

    def _warn_if_disk_short(self, last_record: int) -> None:
        """Warn (once) if the free space is less than the store still needs (module docstring)."""
        planned = 0 if self.expected_nbytes is None else self.expected_nbytes - self._size
        need = max(planned, LOW_SPACE_RECORDS * last_record)
        if self._space_warned or need <= 0:
            return
        if self._space_checked is not None:
            when, free_then, size_then = self._space_checked
            if (time.monotonic() - when < SPACE_RECHECK_SECONDS
                    and free_then - (self._size - size_then) >= 2 * need):
                return
        free = shutil.disk_usage(self._folder()).free
        self._space_checked = (time.monotonic(), free, self._size)
        if free < need:
            self._space_warned = True
            what = (f"to reach its expected size of {self.expected_nbytes:,} bytes" if need == planned else
                    f"for {LOW_SPACE_RECORDS} more records like the last ({last_record:,} bytes each)")
            warnings.warn(f"{self.path}: its disk has {free:,} bytes free, but the store needs {need:,} more {what}. "
                          "When the disk is full the next write fails (OSError, ENOSPC; the records written before "
                          "it stay readable): free space or put the store elsewhere (`unlearn-ext plan` gives a "
                          "run's size beforehand)", RuntimeWarning, stacklevel=3)

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
                pieces = fmt.record_pieces(*item)
                _write_all(self._file, pieces)
            except Exception as e:  # noqa: BLE001  (any failure must reach the caller, never hang flush)
                self._error = (step, e if isinstance(e, OSError) else OSError(None, repr(e)))
                try:
                    self._file.truncate(self._end)
                except OSError:
                    pass  # the torn record is dropped on the next open anyway
                continue
            size = sum(memoryview(p).nbytes for p in pieces)
            self._where.append((self._end, size))
            self._end += size

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
        """Write what is queued and the trailer, fsync, stop the writer and release the file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
                atexit.unregister(self._atexit)
                if self._error is None:
                    self._write_trailer()
            self._raise_if_failed()
        finally:
            if self._file is not None:
                self._file.close()
                if _APPENDING.get(self._file_key) is self:
                    del _APPENDING[self._file_key]

    def _write_trailer(self) -> None:
        try:
            _write_all(self._file, [fmt.trailer(len(self._where))])
            os.fsync(self._file.fileno())
        except OSError as e:
            try:
                self._file.truncate(self._end)  # no torn trailer: the file just lacks one
            except OSError:
                pass
            raise OSError(e.errno, f"{self!r}: writing the trailer at close failed ({e.strerror or e}); all "
                                   f"{len(self._where)} records are on disk and readable, but the file will "
                                   "open as not closed cleanly") from e

    # -- reading ----------------------------------------------------------------------------------
    def _payloads(self, positions) -> List[Encoded]:
        if not self._closed:
            self.flush()
        self._warn_if_path_replaced()
        return [fmt.read_record(self._fd, *self._where[p], self.manifest, self.path, self._recs[p].step)
                for p in positions]

    def _warn_if_path_replaced(self) -> None:
        """Say once that the path no longer names this handle's file (module docstring)."""
        if self._path_warned:
            return
        try:
            st = os.stat(self.path)
            now = (st.st_dev, st.st_ino)
        except OSError:
            now = None
        if now != self._key:
            self._path_warned = True
            what = "no longer exists" if now is None else f"now holds another file than the one {self!r} opened"
            warnings.warn(f"{self.path} {what} (another run may have replaced it); this handle goes on reading the "
                          "records of the file it opened", RuntimeWarning, stacklevel=4)


__all__ = ["DiskStore"]

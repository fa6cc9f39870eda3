"""Files that are never seen half-written, and folders one run at a time.

* :func:`atomic_write` / :func:`atomic_save` — write a temporary file beside the target, fsync it, rename it
  over the target and fsync the folder. A reader (or a process started after a crash) finds either the old
  file or the whole new one, never a torn one; a failed write (a full disk) leaves the old file as it was and
  removes the temporary one.
* :class:`FolderLock` — an exclusive ``flock`` on ``<folder>/.unlearn-ext.lock``, held for as long as a run
  writes into the folder; a second run asking for the same folder is refused at once with
  :class:`FolderInUse` naming the process that holds it. The kernel drops the lock when its holder dies
  (even by ``kill -9``), so a folder is never left locked by a dead run.
* :func:`deferred_interrupts` — a block that a Ctrl-C does not cut in two: SIGINT arriving inside it is
  raised when the block ends (for the few lines that put a model back as it was).
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import signal
import threading
from typing import Callable, Iterator, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".unlearn-ext.lock"
_TEMP_IDS = itertools.count()


def fsync_folder(folder: PathLike) -> None:
    """Make a rename or creation inside ``folder`` durable."""
    fd = os.open(os.fspath(folder) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Union[bytes, Callable[[object], None]]) -> None:
    """Replace ``path`` by a file holding ``write`` (bytes, or a function writing to a binary file object),
    atomically and durably (module docstring)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}.{next(_TEMP_IDS)}")
    try:
        with open(tmp, "xb") as f:
            if isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or already renamed
        raise
    fsync_folder(folder)


def atomic_save(obj, path: PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


class FolderInUse(RuntimeError):
    """Another live process holds the folder's :class:`FolderLock`."""


class FolderLock:
    """Exclusive use of ``folder`` by this process while held (module docstring). ``what`` names the folder's
    role in messages (e.g. ``"--out"``). Use as a context manager, or :meth:`acquire` / :meth:`release`."""

    def __init__(self, folder: PathLike, what: str = "folder") -> None:
        self.folder = os.fspath(folder)
        self.what = what
        self._fd: Optional[int] = None

    @property
    def path(self) -> str:
        return os.path.join(self.folder, LOCK_NAME)

    def acquire(self) -> "FolderLock":
        if self._fd is not None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderInUse(f"{self.what}: {self.folder} is in use by a live run ({holder}); wait for it to "
                              "finish or choose another folder") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT back until the block ends, then raise it (``KeyboardInterrupt``, or whatever the previous
    handler does). Only the main thread receives signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(signal.SIGINT, received[0])
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


__all__ = ["FolderInUse", "deferred_interrupts", "FolderLock", "atomic_save", "atomic_write", "fsync_folder"]

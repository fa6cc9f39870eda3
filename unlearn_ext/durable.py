"""Files that are never seen half-written, and folders one run at a time.

* :func:`atomic_write` / :func:`atomic_save` — write a temporary file beside the target, fsync it, rename it
  over the target and fsync the folder. A reader (or a process started after a crash) finds either the old
  file or the whole new one, never a torn one; a failed write (a full disk) leaves the old file as it was and
  removes the temporary one. The temporary files of the same target left by processes that died (killed
  before they could rename) are removed by the next write.
* :func:`create_whole` — create a file that did not exist with its first bytes, never replacing one that does:
  the bytes are written aside, fsynced and hard-linked to the path, so the file is either absent or whole, and
  of two processes creating the same path one wins and the other gets ``FileExistsError``. On a file system
  without hard links the path is created exclusively (``O_EXCL``) and written in place — a kill during those
  few bytes then leaves a short file.
* :class:`FolderLock` — an exclusive ``flock`` on ``<folder>/.unlearn-ext.lock``, held for as long as a run
  writes into the folder; a second run (another process) asking for the same folder is refused at once with
  :class:`FolderInUse` naming the process that holds it. The kernel drops the lock when its holder dies
  (even by ``kill -9``), so a folder is never left locked by a dead run.
* :func:`crash_point` — where the kill tests stop a process: with ``UNLEARN_EXT_CRASH_AT=<name>`` in its
  environment a process SIGKILLs itself on reaching the point of that name (never set in normal use).
* :func:`deferred_interrupts` — a block that a Ctrl-C does not cut in two: SIGINT arriving inside it is
  raised when the block ends (for the few lines that put a model back as it was).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import signal
import threading
from typing import Callable, Dict, Iterator, List, Optional, Union

import torch

PathLike = Union[str, os.PathLike]
LOCK_NAME = ".unlearn-ext.lock"
_HELD: Dict[str, List] = {}  # the folders this process holds: realpath → [lock file descriptor, holders]
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
    prefix = f".{os.path.basename(path)}.tmp"
    _remove_dead_temps(folder, prefix)
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}.{next(_TEMP_IDS)}")
    try:
        with open(tmp, "xb") as f:
            if isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        crash_point("atomic-write-before-rename")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # never created, or already renamed
        raise
    fsync_folder(folder)


def _remove_dead_temps(folder: str, prefix: str) -> None:
    """Remove ``<prefix><pid>.<n>`` files of ``folder`` whose writer process no longer exists."""
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            pid = name[len(prefix):].split(".")[0]
            if not (name.startswith(prefix) and pid.isdigit()) or _alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def create_whole(path: PathLike, data: bytes, lost: Callable[[], Exception]) -> int:
    """Create ``path`` holding ``data`` (module docstring) and return a read-write descriptor of it (the
    caller closes it). ``lost()`` is the exception to raise when the path exists already or appears meanwhile;
    any other failure raises ``OSError`` naming the path."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}.{next(_TEMP_IDS)}"  # unique to this call
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise type(e)(e.errno, f"cannot create {path}: {e.strerror}") from None
    try:
        _write_synced(fd, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise lost() from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            os.close(fd)
            fd = -1
            try:  # no hard links on this file system: create the path exclusively and write it in place
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                raise lost() from None
            _write_synced(fd, data)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # the link failed and took nothing, or the file is in place: the name is not needed
    fsync_folder(os.path.dirname(os.path.abspath(path)))
    return fd


def _write_synced(fd: int, data: bytes) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.write(fd, view[done:])
    os.fsync(fd)


def atomic_save(obj, path: PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


class FolderInUse(RuntimeError):
    """Another live process holds the folder's :class:`FolderLock`."""


class FolderLock:
    """Exclusive use of ``folder`` by this process while held (module docstring). ``what`` names the folder's
    role in messages (e.g. ``"--out"``). Use as a context manager, or :meth:`acquire` / :meth:`release`.

    ``join=True`` shares a hold this process already has on the folder (the command line locks the store
    folder, and the experiment it runs locks it again); the folder is free once every holder has released it.
    Without it a second hold is refused like another process's (two runs in one process)."""

    def __init__(self, folder: PathLike, what: str = "folder", join: bool = False) -> None:
        self.folder = os.fspath(folder)
        self.what = what
        self.join = join
        self._key: Optional[str] = None

    @property
    def path(self) -> str:
        return os.path.join(self.folder, LOCK_NAME)

    def acquire(self) -> "FolderLock":
        if self._key is not None:
            return self
        os.makedirs(self.folder, exist_ok=True)
        key = os.path.realpath(self.folder)
        if key in _HELD:
            if not self.join:
                raise FolderInUse(f"{self.what}: {self.folder} is in use by a live run (pid {os.getpid()}, this "
                                  "process); wait for it to finish or choose another folder")
            _HELD[key][1] += 1
        else:
            _HELD[key] = [self._lock_file(), 1]
        self._key = key
        return self

    def _lock_file(self) -> int:
        """A descriptor of the folder's lock file, locked. A holder that removes the file while it holds it
        (to leave an empty folder behind) makes a file opened meanwhile stale: then open the path again."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                    current = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
                except FileNotFoundError:
                    current = False
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise FolderInUse(f"{self.what}: {self.folder} is in use by a live run ({holder}); wait for it to "
                                  "finish or choose another folder") from None
            except BaseException:
                os.close(fd)
                raise
            if current:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
                return fd
            os.close(fd)

    def release(self, remove_empty_folder: bool = False) -> None:
        """Release this hold; the last holder of the process drops the lock — removing the lock file and the
        folder first when ``remove_empty_folder`` and nothing else is in it."""
        if self._key is None:
            return
        key, self._key = self._key, None
        entry = _HELD[key]
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[key]
        if remove_empty_folder:
            with contextlib.suppress(OSError):
                if os.listdir(self.folder) == [LOCK_NAME]:
                    os.unlink(self.path)  # while held: a run that opened it meanwhile finds it stale
                    os.rmdir(self.folder)
        os.close(entry[0])  # closing drops the flock

    @property
    def held(self) -> bool:
        return self._key is not None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


CRASH_ENV = "UNLEARN_EXT_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process here if the environment names this point (module docstring)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def crash_budget(name: str, size: int) -> Optional[int]:
    """``n`` when the environment says ``<name>:<n>``: the test wants the process killed after ``n`` of the
    ``size`` bytes of the write named ``name`` (a torn write; a negative ``n`` counts from the end); else None."""
    point, _, n = os.environ.get(CRASH_ENV, "").partition(":")
    if point != name or not n.lstrip("-").isdigit():
        return None
    return int(n) % size if int(n) < 0 else min(int(n), size)


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


__all__ = ["CRASH_ENV", "FolderInUse", "FolderLock", "atomic_save", "atomic_write", "crash_budget", "crash_point",
           "create_whole", "deferred_interrupts", "fsync_folder"]

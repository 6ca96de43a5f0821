"""The index folder's write lock: one writer at a time, released by the OS if the writer dies; readers probe it."""

from __future__ import annotations

import os

from ..clock import now_utc
from ..errors import IndexLockedError
from .files import LOCK


class FolderLock:
    """An exclusive lock on the index folder that the OS releases if the holder dies."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK)
        self.handle = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise IndexLockedError(f"{os.path.dirname(self.path)}: the index is being written by {holder}; "
                                   "wait for it to finish (only one writer at a time)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else 'this machine'} "
                     f"since {now_utc()}")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the lock
            self.handle = None


def writer_active(folder: str) -> bool:
    """Whether some process holds the folder's write lock now (probed without creating the lock file)."""
    path = os.path.join(folder, LOCK)
    if not os.path.exists(path):
        return False
    if os.name == "nt":
        return True  # cannot probe without taking it; assume the writer that left the file is alive
    import fcntl

    try:
        handle = open(path)
    except OSError:
        return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        handle.close()

"""The spool directory's lock: one sidecar per spool.

Taken when the spool opens, before recovery reads anything, and held until
it closes. The directory itself is locked (``flock`` on its own
descriptor), so no file anyone could delete holds the lock; where a
filesystem cannot lock directories, a lock file in the spool is the
fallback. Only the real disk is locked: a ``MemoryFileLayer`` belongs to
one process anyway.
"""

from __future__ import annotations

import errno
import fcntl
import os
import posixpath
from typing import Final

_LOCK_NAME: Final = "lock"
# flock on a directory descriptor fails with these where a filesystem (NFS)
# cannot lock directories: a lock file is the fallback there.
_NO_DIR_LOCK: Final = frozenset({errno.EBADF, errno.EINVAL, errno.ENOLCK, errno.EOPNOTSUPP})


def lock_directory(directory: str) -> int:
    """Take an exclusive flock on ``directory``; return the descriptor that holds it.

    A lock file could be unlinked while held, letting a second sidecar
    lock a new one; the directory cannot be, short of removing the spool.
    Closing the descriptor releases the lock.

    Raises:
        OSError: EBUSY (naming the directory) when another sidecar holds it;
            whatever opening or locking the directory raised otherwise.
    """
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _flock(fd, directory)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in _NO_DIR_LOCK:
            raise
        fd = os.open(posixpath.join(directory, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _flock(fd, directory)
        except OSError:
            os.close(fd)
            raise
    return fd


def _flock(fd: int, directory: str) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, "in use by another sidecar process", directory) from None

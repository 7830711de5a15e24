"""The file layer under the spool: the one seam between the spool and the disk.

The spool does all its I/O through a ``FileLayer`` so tests can replace the
disk: ``MemoryFileLayer`` (``predtrace.sidecar.spool``) keeps what was fsynced
apart from what was only written, and a simulated power loss drops the rest
(RELIABILITY row 9). ``FaultPoints`` names the places where a crash is most
dangerous; tests arm one to crash there (row 13).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Final, Protocol

FAULTS_ENV: Final = "PREDTRACE_SIDECAR_FAULTS"

#: errnos of a write that failed for lack of room: a full disk, a quota, a file-size limit.
NO_ROOM: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

#: Every named crash point, in the order a write passes them.
FAULT_POINTS: Final = (
    "append.after_write",  # records written, not fsynced, not acknowledged
    "append.after_fsync",  # records durable, not yet acknowledged
    "rotate.after_create",  # a new segment exists, the index does not list it
    "state.after_write",  # new high-water mark durable, segments not yet unlinked
    "release.after_unlink",  # an acknowledged segment unlinked, index not rewritten
    "index.before_rename",  # a new index written to its temporary file only
    "shipper.before_send",  # a batch planned and persisted, not yet sent
    "shipper.after_ack",  # the collector acknowledged, the state not yet written
)


class FileLayer(Protocol):
    """File operations the spool needs; paths are plain strings."""

    def makedirs(self, path: str) -> None:
        """Create a directory and its parents; fine if it exists."""
        ...

    def listdir(self, path: str) -> list[str]:
        """Names in a directory."""
        ...

    def exists(self, path: str) -> bool:
        """Whether a file exists."""
        ...

    def open(self, path: str, *, create: bool) -> int:
        """Open a file for reading and writing; return a handle."""
        ...

    def close(self, handle: int) -> None:
        """Close a handle."""
        ...

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (raises OSError, e.g. ENOSPC)."""
        ...

    def fsync(self, handle: int) -> None:
        """Make the file's data durable."""
        ...

    def truncate(self, handle: int, size: int) -> None:
        """Cut the file to ``size`` bytes."""
        ...

    def size(self, path: str) -> int:
        """Current size of a file."""
        ...

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Read up to ``size`` bytes at ``offset``."""
        ...

    def unlink(self, path: str) -> None:
        """Remove a file (its directory entry is durable after ``fsync_dir``)."""
        ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` with ``src``."""
        ...

    def fsync_dir(self, path: str) -> None:
        """Make the directory's entries (creates, renames, unlinks) durable."""
        ...


def write_whole(files: FileLayer, path: str, data: bytes) -> None:
    """Make ``data`` the whole content of ``path`` (created if missing) and fsync it.

    The directory entry is not synced: callers that create or rename
    follow with ``fsync_dir``.
    """
    handle = files.open(path, create=True)
    try:
        files.truncate(handle, 0)
        files.pwrite(handle, data, 0)
        files.fsync(handle)
    finally:
        files.close(handle)


class OsFileLayer:
    """The real disk."""

    def makedirs(self, path: str) -> None:
        """os.makedirs(exist_ok=True)."""
        os.makedirs(path, exist_ok=True)

    def listdir(self, path: str) -> list[str]:
        """os.listdir."""
        return os.listdir(path)

    def exists(self, path: str) -> bool:
        """os.path.exists."""
        return os.path.exists(path)

    def open(self, path: str, *, create: bool) -> int:
        """os.open read-write (created with mode 0600 when asked)."""
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_CLOEXEC", 0)
        return os.open(path, flags, 0o600)

    def close(self, handle: int) -> None:
        """os.close."""
        os.close(handle)

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        """os.pwrite until everything is written."""
        view = memoryview(data)
        while view:
            written = os.pwrite(handle, view, offset)
            if written <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[written:]
            offset += written

    def fsync(self, handle: int) -> None:
        """os.fsync."""
        os.fsync(handle)

    def truncate(self, handle: int, size: int) -> None:
        """os.ftruncate."""
        os.ftruncate(handle, size)

    def size(self, path: str) -> int:
        """os.stat().st_size."""
        return os.stat(path).st_size

    def read(self, path: str, offset: int, size: int) -> bytes:
        """os.pread on a short-lived descriptor."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        """os.unlink."""
        os.unlink(path)

    def rename(self, src: str, dst: str) -> None:
        """os.replace."""
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        """fsync an O_RDONLY descriptor of the directory."""
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class SimulatedCrash(BaseException):
    """Raised at an armed fault point in-process: the component must stop dead.

    A BaseException so that no ``except Exception`` on the way swallows it.
    """


class FaultPoints:
    """Named crash points. Unarmed (the default) they cost one dict lookup.

    ``arm("release.after_unlink")`` crashes at the first hit; ``arm(name, n)``
    at the n-th. ``hard=True`` ends the process with ``os._exit`` (for tests
    that run the sidecar as a subprocess); otherwise ``SimulatedCrash`` is
    raised.
    """

    def __init__(self, *, hard: bool = False) -> None:
        self._armed: dict[str, int] = {}
        self._hard = hard
        self.hits: dict[str, int] = {}

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> FaultPoints:
        """Arm points from ``PREDTRACE_SIDECAR_FAULTS=name[:n],...`` (tests only)."""
        faults = cls(hard=True)
        for item in environ.get(FAULTS_ENV, "").split(","):
            name, _, count = item.strip().partition(":")
            if name:
                faults.arm(name, int(count) if count else 1)
        return faults

    def arm(self, name: str, at: int = 1) -> None:
        """Crash on the ``at``-th hit of ``name``."""
        if name not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {name!r}; known: {', '.join(FAULT_POINTS)}")
        self._armed[name] = at

    def hit(self, name: str) -> None:
        """Pass a fault point: crash here if it is armed and due."""
        if not self._armed:
            return
        count = self.hits.get(name, 0) + 1
        self.hits[name] = count
        if self._armed.get(name) == count:
            if self._hard:
                os._exit(86)
            raise SimulatedCrash(name)


NO_FAULTS: Final = FaultPoints()

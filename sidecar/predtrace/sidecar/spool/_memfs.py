"""An in-memory disk that forgets what was never fsynced (a public test fake).

Every file keeps two versions of its bytes: what was written and what was
made durable by ``fsync``; every directory keeps the set of entries made
durable by ``fsync_dir``. ``power_loss()`` throws away everything else, the
way a real machine loses its page cache (RELIABILITY row 9). ``capacity``
makes writes fail with ENOSPC once the disk is full (row 14);
``fail_next_fsync`` makes the next ``fsync`` fail with that errno (a dying
device, a lost network volume), once.

Example:
    >>> disk = MemoryFileLayer()
    >>> spool = Spool.open(SpoolConfig(directory="/spool"), files=disk)
    >>> disk.power_loss()   # then open the spool again and check what survived
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import threading
from dataclasses import dataclass, field


@dataclass(slots=True)
class _File:
    data: bytearray = field(default_factory=bytearray)
    durable: bytes = b""


class MemoryFileLayer:
    """A FileLayer held in memory, with power loss and a capacity."""

    def __init__(self, *, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._lock = threading.RLock()
        self._entries: dict[str, _File] = {}
        self._durable_entries: dict[str, _File] = {}
        self._dirs: set[str] = {"/"}
        self._handles: dict[int, _File] = {}
        self._next_handle = 3
        self.fsyncs = 0
        self.fail_next_fsync: int | None = None

    # -- the FileLayer protocol -------------------------------------------------

    def makedirs(self, path: str) -> None:
        """Create the directory (directories themselves are always durable)."""
        with self._lock:
            if path in self._entries:
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
            self._dirs.add(path.rstrip("/") or "/")

    def listdir(self, path: str) -> list[str]:
        """Names directly in ``path``."""
        with self._lock:
            self._require_dir(path)
            prefix = path.rstrip("/") + "/"
            return [p[len(prefix) :] for p in self._entries if posixpath.dirname(p) + "/" == prefix]

    def exists(self, path: str) -> bool:
        """Whether a file exists now."""
        with self._lock:
            return path in self._entries

    def open(self, path: str, *, create: bool) -> int:
        """Return a handle; a new file's entry is durable only after ``fsync_dir``."""
        with self._lock:
            self._require_dir(posixpath.dirname(path))
            file = self._entries.get(path)
            if file is None:
                if not create:
                    raise FileNotFoundError(errno.ENOENT, "no such file", path)
                file = self._entries[path] = _File()
            handle = self._next_handle
            self._next_handle += 1
            self._handles[handle] = file
            return handle

    def close(self, handle: int) -> None:
        """Forget a handle."""
        with self._lock:
            self._handles.pop(handle, None)

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        """Write at ``offset``; past the capacity, write what fits and raise ENOSPC."""
        with self._lock:
            file = self._handles[handle]
            room = len(data)
            if self.capacity is not None:
                growth = max(0, offset + len(data) - len(file.data))
                free = self.capacity - self.used_bytes()
                if growth > free:
                    room = max(0, len(data) - (growth - max(free, 0)))
            if offset > len(file.data):
                file.data.extend(bytes(offset - len(file.data)))
            file.data[offset : offset + room] = data[:room]
            if room < len(data):
                raise OSError(errno.ENOSPC, "No space left on device")

    def fsync(self, handle: int) -> None:
        """Make the file's current bytes durable."""
        with self._lock:
            if self.fail_next_fsync is not None:
                code, self.fail_next_fsync = self.fail_next_fsync, None
                raise OSError(code, os.strerror(code))
            file = self._handles[handle]
            file.durable = bytes(file.data)
            self.fsyncs += 1

    def truncate(self, handle: int, size: int) -> None:
        """Cut (or extend with zeros) the file."""
        with self._lock:
            file = self._handles[handle]
            del file.data[size:]
            file.data.extend(bytes(size - len(file.data)))

    def size(self, path: str) -> int:
        """Current size."""
        with self._lock:
            return len(self._get(path).data)

    def read(self, path: str, offset: int, size: int) -> bytes:
        """Current bytes (the page cache, like a real read)."""
        with self._lock:
            return bytes(self._get(path).data[offset : offset + size])

    def unlink(self, path: str) -> None:
        """Remove the entry (the file comes back after a power loss until ``fsync_dir``)."""
        with self._lock:
            self._get(path)
            del self._entries[path]

    def rename(self, src: str, dst: str) -> None:
        """Move an entry over another."""
        with self._lock:
            self._entries[dst] = self._get(src)
            del self._entries[src]

    def fsync_dir(self, path: str) -> None:
        """Make the entries of ``path`` durable as they are now."""
        with self._lock:
            self._require_dir(path)
            prefix = path.rstrip("/") + "/"
            for name in [p for p in self._durable_entries if p.startswith(prefix)]:
                del self._durable_entries[name]
            for name, file in self._entries.items():
                if name.startswith(prefix):
                    self._durable_entries[name] = file
            self.fsyncs += 1

    # -- test controls ------------------------------------------------------------

    def power_loss(self, rng: random.Random | None = None) -> None:
        """Lose everything not fsynced; with ``rng`` keep a random prefix of each lost tail.

        Open handles become invalid, like every descriptor of a dead process.
        """
        with self._lock:
            self._entries = dict(self._durable_entries)
            for file in self._entries.values():
                kept = file.durable
                if (
                    rng is not None
                    and len(file.data) > len(kept)
                    and file.data[: len(kept)] == kept
                ):
                    kept = bytes(file.data[: rng.randint(len(kept), len(file.data))])
                file.data = bytearray(kept)
                file.durable = kept
            self._handles.clear()

    def crash(self) -> None:
        """A process crash (kill -9): the page cache survives, handles do not."""
        with self._lock:
            self._handles.clear()

    def used_bytes(self) -> int:
        """Bytes held by every file."""
        with self._lock:
            return sum(len(f.data) for f in self._entries.values())

    def corrupt(self, path: str, offset: int, value: int | None = None) -> None:
        """Flip the bits of one byte (or set it), in the current and the durable copy."""
        with self._lock:
            file = self._get(path)
            file.data[offset] = (file.data[offset] ^ 0xFF) if value is None else value
            file.durable = bytes(file.data)

    def write_file(self, path: str, data: bytes) -> None:
        """Replace a file's content durably (to plant garbage in a test)."""
        with self._lock:
            file = self._entries.setdefault(path, _File())
            file.data = bytearray(data)
            file.durable = bytes(data)
            self._durable_entries[path] = file

    def _get(self, path: str) -> _File:
        try:
            return self._entries[path]
        except KeyError:
            raise FileNotFoundError(errno.ENOENT, "no such file", path) from None

    def _require_dir(self, path: str) -> None:
        if (path.rstrip("/") or "/") not in self._dirs:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path)

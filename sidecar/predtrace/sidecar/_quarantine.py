"""``quarantine/``: the batches the shipper gave up on, kept as files under a byte cap.

Shipper -> **quarantine**. A batch the collector refuses for good (or that
kills the sidecar on every start) is written here, whole and durably, before
the shipper's marks move past it: the file is then its only copy. The
directory has its own byte cap; past it the oldest files are removed first
(counted), the newest always kept. File names sort by age (see
``_ship_outcomes.BatchOutcomes.quarantine``).
"""

from __future__ import annotations

import logging
import posixpath
from typing import Final, Protocol

from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.sidecar.spool import FileLayer, write_whole

_log = logging.getLogger("predtrace.sidecar.shipper")
QUARANTINE_DIR: Final = "quarantine"
# The quarantine's byte cap when none is configured: this share of the spool's.
QUARANTINE_SHARE: Final = 0.1
SUFFIX: Final = ".msgpack"


class QuarantineCounts(Protocol):
    """Where the quarantine reports its size (the shipper's counters)."""

    quarantine_bytes: int
    quarantine_byte_cap: int
    quarantine_evicted: int


class Quarantine:
    """The files of ``<spool>/quarantine``, oldest first, and their byte cap.

    Blocking file I/O: call from a thread.
    """

    def __init__(self, files: FileLayer, spool_directory: str, counts: QuarantineCounts) -> None:
        self.directory = posixpath.join(spool_directory, QUARANTINE_DIR)
        self._files = files
        self._counts = counts
        self._sizes: dict[str, int] = {}  # file name -> bytes, oldest first
        self._log = RateLimitedLog(_log)

    def path(self, name: str) -> str:
        """Where the batch named ``name`` is (or would be) kept."""
        return posixpath.join(self.directory, name)

    def scan(self) -> None:
        """Count the files a previous run quarantined (oldest first), then apply the cap."""
        try:
            names = self._files.listdir(self.directory)
        except FileNotFoundError:
            return  # nothing was ever quarantined here
        for name in sorted(names):
            if name.endswith(SUFFIX):
                self._sizes[name] = self._files.size(self.path(name))
        self._counts.quarantine_bytes = sum(self._sizes.values())
        self._evict(0)

    def write(self, name: str, payload: bytes) -> None:
        """Write ``payload`` durably as ``name``, first removing the oldest files past the cap."""
        self._files.makedirs(self.directory)
        self._evict(len(payload), keep=name)
        write_whole(self._files, self.path(name), payload)
        self._files.fsync_dir(self.directory)
        self._sizes.pop(name, None)
        self._sizes[name] = len(payload)
        self._counts.quarantine_bytes = sum(self._sizes.values())

    def _evict(self, incoming: int, keep: str = "") -> None:
        """Remove the oldest files until ``incoming`` more bytes fit the cap.

        The newest batch is always kept, even alone over the cap. Removed
        batches are counted (``quarantine_evicted``); their events were
        counted as dropped when they were quarantined.
        """
        c = self._counts
        sizes = self._sizes
        total = sum(size for name, size in sizes.items() if name != keep)
        removed = 0
        for name in [name for name in sizes if name != keep]:
            if total + incoming <= c.quarantine_byte_cap:
                break
            try:
                self._files.unlink(self.path(name))
            except FileNotFoundError:
                pass  # removed by an operator meanwhile
            except OSError as exc:
                _log.error("cannot remove quarantined batch %s: %s", name, exc.strerror)
                break
            total -= sizes.pop(name)
            removed += 1
        if removed:
            c.quarantine_evicted += removed
            c.quarantine_bytes = sum(sizes.values())
            self._files.fsync_dir(self.directory)
            self._log.warning(
                "quarantine_cap",
                "quarantine at its byte cap (%d bytes): removed %d oldest batches",
                c.quarantine_byte_cap,
                removed,
            )

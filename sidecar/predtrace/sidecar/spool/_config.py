"""Configuration and counters of the durable spool."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from predtrace.sidecar._errors import ConfigError

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class SpoolConfig:
    """Where the spool lives and how big it may grow.

    Example:
        >>> SpoolConfig(directory="/var/lib/predtrace/spool", max_bytes=2 * 1024**3)

    Attributes:
        directory: the spool directory (created if missing).
        max_bytes: the byte cap; past it the oldest segments are dropped (counted).
        segment_bytes: size at which the active segment is sealed and a new one begun
            (a segment may exceed it by one append).
        max_record_bytes: the largest event accepted (bigger ones are rejected alone).
        max_pending_bytes: bytes waiting for the writer before appends are refused
            (at most half the cap: see ``pending_limit``).
        commit_delay: seconds the writer waits to gather more appends per fsync.
    """

    directory: str
    max_bytes: int = 1024 * MIB
    segment_bytes: int = 8 * MIB
    max_record_bytes: int = 1 * MIB
    max_pending_bytes: int = 64 * MIB
    commit_delay: float = 0.0

    def __post_init__(self) -> None:
        if not self.directory:
            raise ConfigError("the spool directory is required")
        if self.max_record_bytes < 1024:
            raise ConfigError("spool max_record_bytes must be at least 1 KiB")
        if self.segment_bytes < 4096:
            raise ConfigError("spool segment_bytes must be at least 4 KiB")
        if self.max_bytes < 2 * self.segment_bytes:
            raise ConfigError("spool max_bytes must be at least two segments")
        if self.max_pending_bytes < self.max_record_bytes:
            raise ConfigError("spool max_pending_bytes must hold a maximal record")
        if not 0 <= self.commit_delay <= 1:
            raise ConfigError("spool commit_delay must be between 0 and 1 second")

    @property
    def pending_limit(self) -> int:
        """Bytes waiting for the writer before appends are refused as busy.

        ``max_pending_bytes``, but at most the cap (and never under one
        maximal record): more could never be kept at once. A group commit
        takes what fits under the cap beside the shipper's batches; the rest
        waits for the next one. A single append is taken whatever its size
        (up to the cap).
        """
        return min(self.max_pending_bytes, max(self.max_bytes, self.max_record_bytes))


@dataclass(slots=True)
class SpoolCounters:
    """What the spool did that a user must be able to see (all monotonic).

    ``cap_refused``: appends refused because the byte cap cannot hold them
    (bigger than the cap, or than it has room for beside the rest of their
    group commit and the shipper's pinned segments): the cap never drops a
    record before it is acknowledged. ``dropped`` reasons: ``byte_cap``
    (oldest records dropped at the cap), ``corrupt`` (records in damaged
    regions), ``torn`` (an incomplete tail cut on recovery; never
    acknowledged records), ``missing_segment``.
    """

    appended: int = 0
    commits: int = 0
    corrupt_regions: int = 0
    disk_full: int = 0
    busy: int = 0
    cap_refused: int = 0
    write_errors: int = 0
    index_rebuilds: int = 0
    state_slots_bad: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, count: int = 1) -> None:
        """Add to one integer counter."""
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def drop(self, reason: str, count: int) -> None:
        """Count ``count`` records dropped for ``reason``."""
        if count > 0:
            with self._lock:
                self.dropped[reason] += count

    def snapshot(self) -> dict[str, int]:
        """Flat copy: the integer counters and ``dropped.<reason>``."""
        with self._lock:
            flat = {
                name: getattr(self, name)
                for name in (
                    "appended",
                    "commits",
                    "corrupt_regions",
                    "disk_full",
                    "busy",
                    "cap_refused",
                    "write_errors",
                    "index_rebuilds",
                    "state_slots_bad",
                )
            }
            flat.update({f"dropped.{k}": v for k, v in sorted(self.dropped.items())})
        return flat

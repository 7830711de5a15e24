"""Pipeline counters: every event is enqueued once and then exported or dropped by reason."""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class PipelineCounters:
    """Counts of a QueuedExporter; read a consistent copy with ``snapshot()``.

    ``dropped`` reasons: ``queue_full``, ``processor``, ``filtered``,
    ``rejected``, ``permanent``, ``retries_exhausted``, ``exporter_error``,
    ``shutdown``.
    """

    enqueued: int = 0
    exported: int = 0
    retried: int = 0
    batches: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_dropped(self, reason: str, count: int = 1) -> None:
        """Count ``count`` events dropped for ``reason``."""
        with self._lock:
            self.dropped[reason] += count

    def add(self, name: str, count: int = 1) -> None:
        """Add to one of the integer counters."""
        with self._lock:
            setattr(self, name, getattr(self, name) + count)

    def snapshot(self) -> dict[str, int]:
        """Return flat counters: ``enqueued``, ..., ``dropped.<reason>``, ``dropped``."""
        with self._lock:
            flat = {
                "enqueued": self.enqueued,
                "exported": self.exported,
                "retried": self.retried,
                "batches": self.batches,
                "dropped": sum(self.dropped.values()),
            }
            flat.update({f"dropped.{reason}": n for reason, n in sorted(self.dropped.items())})
        return flat

    def reset_after_fork(self) -> None:
        """Zero every counter: a forked child starts its own count.

        With a new lock, never the inherited one: a thread of the parent may
        have held it at the fork, and that thread does not exist in the child.
        """
        self._lock = threading.Lock()
        self.enqueued = self.exported = self.retried = self.batches = 0
        self.dropped.clear()


class RateLimitedLog:
    """Logs the first occurrence of each key, then at most once per interval.

    Telemetry failures are logged, but a collector outage must not flood the
    model server's log.
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()
        _LOGS.add(self)

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` unless ``key`` was logged within the interval."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" ({suppressed} similar messages suppressed)"
        self._logger.warning(message, *args)


_LOGS: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()


def _new_locks_after_fork() -> None:
    # A parent's thread may have held a log's lock at the fork; in the child
    # nobody would ever release it, and the next warning would hang.
    for log in list(_LOGS):
        log._lock = threading.Lock()


os.register_at_fork(after_in_child=_new_locks_after_fork)

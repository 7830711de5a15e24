"""Public test fakes for the pipeline: use them instead of mocks.

Example:
    >>> exporter = ScriptedExporter([RetryableExportError("down"), ExportResult(3)])
    >>> pipeline = QueuedExporter(exporter, clock=FakeClock())
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from predtrace.sidecar.pipeline import ExportResult, OutgoingBatch
from predtrace.wire import PredictionEvent


class InMemoryExporter:
    """Accepts every batch and keeps it (bounded by ``max_events``, oldest first out)."""

    def __init__(self, max_events: int = 1_000_000) -> None:
        self.batches: list[list[PredictionEvent]] = []
        self.max_events = max_events
        self.shutdown_calls = 0
        self._lock = threading.Lock()
        self._count = 0

    @property
    def events(self) -> list[PredictionEvent]:
        """Every exported event, in order."""
        with self._lock:
            return [e for batch in self.batches for e in batch]

    def export(self, batch: OutgoingBatch) -> ExportResult:
        """Keep the batch; accept all of it."""
        with self._lock:
            self.batches.append(list(batch.events))
            self._count += len(batch.events)
            while self._count > self.max_events and self.batches:
                self._count -= len(self.batches.pop(0))
        return ExportResult(len(batch.events))

    def shutdown(self, timeout: float) -> None:
        """Count the call."""
        self.shutdown_calls += 1


class ScriptedExporter:
    """Plays a script: each ``export`` call takes the next item.

    An item that is an exception is raised; an ExportResult is returned; when
    the script runs out every call succeeds. ``attempts`` records each batch's
    (attempt, seq, number of events).
    """

    def __init__(self, script: Iterable[ExportResult | BaseException]) -> None:
        self.script = list(script)
        self.attempts: list[tuple[int, int, int]] = []
        self.delivered: list[list[PredictionEvent]] = []
        self.shutdown_calls = 0

    def export(self, batch: OutgoingBatch) -> ExportResult:
        """Raise or return the next scripted outcome."""
        self.attempts.append((batch.attempt, batch.seq, len(batch.events)))
        outcome: ExportResult | BaseException = (
            self.script.pop(0) if self.script else ExportResult(len(batch.events))
        )
        if isinstance(outcome, BaseException):
            raise outcome
        self.delivered.append(list(batch.events))
        return outcome

    def shutdown(self, timeout: float) -> None:
        """Count the call."""
        self.shutdown_calls += 1


class FakeClock:
    """A clock that never sleeps: ``wait`` advances time and returns at once.

    ``sleeps`` records every wait, so a test can check the backoff schedule
    (for example that a Retry-After of an hour was honoured) in microseconds.
    """

    def __init__(self, start: float = 1_000.0, wall_ns: int = 1_800_000_000 * 10**9) -> None:
        self.now = start
        self.wall_offset_ns = wall_ns - int(start * 1e9)
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        """Fake monotonic seconds."""
        return self.now

    def time_ns(self) -> int:
        """Fake unix nanoseconds, advancing with ``monotonic``."""
        return int(self.now * 1e9) + self.wall_offset_ns

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        """Return at once; if the event is not set, time jumps by ``timeout``."""
        if event.is_set():
            return True
        if timeout is not None:
            self.sleeps.append(timeout)
            self.now += timeout
        return False

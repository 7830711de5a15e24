"""The export worker: the half of a QueuedExporter that runs in its thread.

Bounded queue -> batcher -> processors -> retry -> exporter: this module is
the queued exporter from the batcher on. It holds the state the request path,
the worker and shutdown share (the queue, the batch in flight and how its
delivery goes), the worker loop, and the delivery of one batch with its
retries and the counting of its outcome. ``QueuedExporter`` (``_queued``)
adds the request path and the lifecycle on top; this class is never used
alone.
"""

from __future__ import annotations

import random
import threading
from collections import Counter, deque
from collections.abc import Sized
from typing import Final

from predtrace.sidecar.pipeline._clock import Clock
from predtrace.sidecar.pipeline._counters import PipelineCounters, RateLimitedLog
from predtrace.sidecar.pipeline._errors import PermanentExportError, RetryableExportError
from predtrace.sidecar.pipeline._queue_config import QueueConfig
from predtrace.sidecar.pipeline._stages import Exporter, OutgoingBatch, Processor
from predtrace.wire import PredictionEvent, event_problem

# After an unexpected error in a loop turn, the worker pauses this long, so a
# fault that repeats on every turn cannot spin a core.
_ERROR_PAUSE_S: Final = 1.0
# Outcomes that prove the destination answers (None: exported).
_ANSWERED: Final = frozenset({None, "permanent"})


class ExportWorker:
    """The queue's shared state and the worker that empties it into the exporter.

    The base of ``QueuedExporter``, whose constructor sets the attributes
    declared here and calls ``_init_state``; the methods of both classes
    share one lock (``_lock``) over the queue and the batch in flight.
    """

    config: QueueConfig
    counters: PipelineCounters
    _exporter: Exporter
    _processors: tuple[Processor, ...]
    _clock: Clock
    _rng: random.Random
    _log: RateLimitedLog

    # -- state, and the steps the worker and shutdown share ---------------------

    def _init_state(self) -> None:
        self._queue: deque[PredictionEvent] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._done = threading.Condition(threading.Lock())
        self._handled = 0
        self._flushing = False
        self._thread: threading.Thread | None = None
        self._started = False
        self._closed = False
        self._deadline: float | None = None
        # The batch between the queue and its outcome, and how its delivery
        # goes (all under self._lock): shutdown reads them to decide whether
        # to wait, and counts the batch itself when it stops waiting.
        self._inflight = 0
        self._attempt_since: float | None = None
        self._failing_since: float | None = None  # first retryable failure since an answer
        self._final_backoff = False
        self._abandoned = False
        self._worker_done = False
        self._changed = threading.Event()  # the worker's state above changed
        self._abandon = threading.Event()  # shutdown gave the destination up
        # Unexpected errors the worker survived (each logged, rate-limited).
        self.worker_errors = 0

    def _remaining(self) -> float:
        if self._deadline is None:
            return float("inf")
        return self._deadline - self._clock.monotonic()

    def _drain_inline(self) -> None:
        while self._queue and self._remaining() > 0:
            self.pump()

    def _drop_leftovers(self) -> None:
        with self._lock:
            left = len(self._queue)
            self._queue.clear()
        if left:
            self.counters.add_dropped("shutdown", left)
            self._mark_handled(left)
            self._log.warning("leftovers", "dropped %d queued events at shutdown", left)

    def _shutdown_exporter(self) -> None:
        try:
            self._exporter.shutdown(max(0.0, self._remaining()))
        except Exception as exc:  # noqa: BLE001 - shutdown must not raise
            self._log.warning("shutdown", "exporter shutdown failed: %s", type(exc).__name__)

    # -- worker ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._run_once()
                except Exception as exc:  # noqa: BLE001 - a dead worker would strand every later event
                    self._worker_failed(exc, pause=True)
            try:
                self._drain_inline()
            except Exception as exc:  # noqa: BLE001 - what is left is still counted below
                self._worker_failed(exc, pause=False)
            self._drop_leftovers()
            self._shutdown_exporter()
        finally:
            with self._lock:
                self._worker_done = True
            self._changed.set()

    def _run_once(self) -> None:
        self._clock.wait(self._wake, self.config.schedule_delay)
        self._wake.clear()
        while self._queue and not self._should_abandon():
            self.pump()
            if self._flushing or self._stop.is_set():
                continue
            if len(self._queue) < self.config.max_batch_size:
                break
        if not self._queue:
            self._flushing = False

    def _worker_failed(self, exc: Exception, *, pause: bool) -> None:
        self.worker_errors += 1
        self._log.warning(
            "worker", "export worker error, carrying on: %s: %s", type(exc).__name__, exc
        )
        if not pause:
            return
        try:
            self._clock.wait(self._stop, _ERROR_PAUSE_S)
        except Exception:  # noqa: BLE001 - the clock itself may be what fails
            self._stop.wait(_ERROR_PAUSE_S)

    def _should_abandon(self) -> bool:
        return self._stop.is_set() and self._remaining() <= 0

    def pump(self) -> int:
        """Take one batch from the queue and deliver it (in the calling thread).

        The worker calls this; tests call it directly to drive the pipeline
        step by step with a FakeClock. Returns the number of events taken.
        An unexpected error drops (and counts, ``worker_error``) the batch
        and propagates.
        """
        with self._lock:
            take = min(len(self._queue), self.config.max_batch_size)
            events = [self._queue.popleft() for _ in range(take)]
            self._inflight = take
        if not events:
            return 0
        try:
            kept = self._process(events)
            if kept:
                self._deliver(OutgoingBatch(kept))
        except Exception:
            self._settle("worker_error", None)
            raise
        finally:
            self._mark_handled(take)
        return take

    def _process(self, events: list[PredictionEvent]) -> list[PredictionEvent]:
        kept = []
        drops: Counter[str] = Counter()
        for event in events:
            processed = self._process_one(event, drops) if self._processors else event
            if processed is None:
                continue
            # An event the collector would refuse would cost its whole batch
            # (a 400): it is dropped alone, counted (off the request path).
            try:
                problem = event_problem(processed)
            except Exception as exc:  # noqa: BLE001 - a malformed event drops alone, not its batch
                problem = f"unreadable event ({type(exc).__name__})"
            if problem is not None:
                drops["invalid"] += 1
                self._log.warning("invalid", "event dropped: %s", problem)
                continue
            kept.append(processed)
        with self._lock:
            if self._abandoned:
                return []  # shutdown counted the whole batch already
            for reason, count in drops.items():
                self.counters.add_dropped(reason, count)
            self._inflight = len(kept)
        return kept

    def _process_one(self, event: PredictionEvent, drops: Counter[str]) -> PredictionEvent | None:
        current = event
        for processor in self._processors:
            try:
                result = processor(current)
            except Exception as exc:  # noqa: BLE001 - a bad processor drops one event
                drops["processor"] += 1
                self._log.warning("processor", "processor raised %s", type(exc).__name__)
                return None
            if result is None:
                drops["filtered"] += 1
                return None
            current = result
        return current

    def _deliver(self, batch: OutgoingBatch) -> None:
        size = len(batch.events)
        while True:
            batch.attempt += 1
            with self._lock:
                if self._abandoned:
                    return
                self._attempt_since = self._clock.monotonic()
            self._changed.set()
            try:
                result = self._exporter.export(batch)
            except RetryableExportError as exc:
                if self._retry_wait(batch, exc, size):
                    continue
                return
            except PermanentExportError as exc:
                self._settle("permanent", size)
                self._log.warning("permanent", "batch dead-lettered, not retried: %s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the worker
                self._settle("exporter_error", size)
                self._log.warning("exporter", "exporter raised %s", type(exc).__name__)
                return
            counts = _result_counts(result)
            if counts is None:
                # As much an exporter bug as raising (None, say): reading it
                # here would kill the worker and strand every later event.
                self._settle("exporter_error", size)
                self._log.warning(
                    "exporter", "exporter returned %s, not an ExportResult", type(result).__name__
                )
                return
            accepted, rejected = counts
            self._settle(None, accepted, rejected)
            return

    def _settle(self, reason: str | None, count: int | None, rejected: int = 0) -> None:
        """Count the outcome of the batch in flight and clear its delivery state.

        ``reason`` None: ``count`` events exported in one batch, ``rejected``
        refused by the receiver; else ``count`` events (None: all still in
        flight) dropped for ``reason``. Nothing is counted once shutdown has
        counted the batch itself (an export that outlived it).
        """
        with self._lock:
            self._attempt_since = None
            self._final_backoff = False
            if reason in _ANSWERED:
                # The destination answered: whatever failed before is over. A
                # batch given up on (retries exhausted, the shutdown deadline)
                # leaves the destination as failing as it was, for the next one.
                self._failing_since = None
            if self._abandoned:
                return
            if count is None:
                count = self._inflight
            self._inflight = 0
            if reason is not None:
                if count:
                    self.counters.add_dropped(reason, count)
                return
            self.counters.add("batches")
            self.counters.add("exported", count)
            if rejected:
                self.counters.add_dropped("rejected", rejected)

    def _retry_wait(self, batch: OutgoingBatch, exc: RetryableExportError, size: int) -> bool:
        """Wait before the next attempt; return False when the batch is abandoned."""
        if self.config.retry.gives_up_after(batch.attempt):
            self._settle("retries_exhausted", size)
            self._log.warning("exhausted", "batch dropped after %d attempts", batch.attempt)
            return False
        delay = self.config.retry.delay(batch.attempt - 1, exc.retry_after, self._rng)
        if delay >= self._remaining():
            self._settle("shutdown", size)
            return False
        # Before shutdown the backoff ends early when shutdown begins: the
        # batch gets one more try within the deadline. During shutdown it
        # ends early only when shutdown gives the destination up, which it
        # does once the batch has been failing for longer than the grace.
        final = self._stop.is_set()
        with self._lock:
            if self._abandoned:
                return False
            if self._failing_since is None:
                self._failing_since = self._attempt_since
            self._attempt_since = None
            self._final_backoff = final
        self._changed.set()
        self.counters.add("retried")
        self._log.warning("retry", "export failed, retrying: %s", exc)
        self._clock.wait(self._abandon if final else self._stop, delay)
        with self._lock:
            self._final_backoff = False
            return not self._abandoned

    def _mark_handled(self, count: int) -> None:
        with self._done:
            self._handled += count
            self._done.notify_all()


def _result_counts(result: object) -> tuple[int, int] | None:
    """``(accepted, rejected)`` of what ``export`` returned; None when it is no ExportResult.

    Read by attribute, so an exporter's own result type with the same fields works.
    """
    accepted = getattr(result, "accepted", None)
    rejected = getattr(result, "rejected", ())
    if not isinstance(accepted, int) or not isinstance(rejected, Sized):
        return None
    return accepted, len(rejected)

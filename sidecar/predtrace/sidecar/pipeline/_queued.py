"""The queued exporter: bounded queue -> batcher -> processors -> retry -> exporter.

``emit`` is what the request path calls: O(1), never blocks on I/O, never
raises. One worker thread (started lazily, restarted in a forked child) takes
batches by size or by time, runs the processors, and hands each batch to the
exporter, retrying transient failures with backoff. When the queue is full the
oldest (or newest) event is dropped and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import weakref
from collections import deque
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from typing import Literal

from predtrace.sidecar.pipeline._clock import Clock, SystemClock
from predtrace.sidecar.pipeline._counters import PipelineCounters, RateLimitedLog
from predtrace.sidecar.pipeline._errors import PermanentExportError, RetryableExportError
from predtrace.sidecar.pipeline._retry import RetryPolicy
from predtrace.sidecar.pipeline._stages import Exporter, OutgoingBatch, Processor
from predtrace.wire import PredictionEvent, event_problem

_log = logging.getLogger("predtrace.pipeline")
_INSTANCES: weakref.WeakSet[QueuedExporter] = weakref.WeakSet()


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """Sizes and timings of a QueuedExporter.

    Example:
        >>> QueueConfig(max_queue_size=4096, max_batch_size=512, schedule_delay=0.5)
    """

    max_queue_size: int = 4096
    max_batch_size: int = 512
    schedule_delay: float = 1.0
    drop: Literal["oldest", "newest"] = "oldest"
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if self.max_queue_size < 1:
            raise ValueError("QueueConfig.max_queue_size must be >= 1")
        if not 1 <= self.max_batch_size <= self.max_queue_size:
            raise ValueError("QueueConfig.max_batch_size must be in [1, max_queue_size]")
        if self.schedule_delay <= 0:
            raise ValueError("QueueConfig.schedule_delay must be > 0 seconds")
        if self.drop not in ("oldest", "newest"):
            raise ValueError("QueueConfig.drop must be 'oldest' or 'newest'")


class QueuedExporter:
    """Bounded, batching, retrying front of an exporter.

    Example:
        >>> pipeline = QueuedExporter(CollectorHttpExporter(cfg), QueueConfig())
        >>> pipeline.emit(event)          # on the request path
        >>> pipeline.shutdown(timeout=5)  # at exit: flush what it can
    """

    def __init__(
        self,
        exporter: Exporter,
        config: QueueConfig | None = None,
        *,
        processors: Sequence[Processor] = (),
        clock: Clock | None = None,
        seed: int | None = None,
        counters: PipelineCounters | None = None,
    ) -> None:
        self.config = config or QueueConfig()
        # Shared counters let a pipeline that replaces a shut-down one (an app
        # started again) count on from where that one stopped.
        self.counters = counters if counters is not None else PipelineCounters()
        self._exporter = exporter
        self._processors = tuple(processors)
        self._clock = clock or SystemClock()
        self._rng = random.Random(seed)  # noqa: S311 - jitter, not secrets
        self._log = RateLimitedLog(_log)
        self._init_state()
        _INSTANCES.add(self)

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

    # -- request path ---------------------------------------------------------

    def emit(self, event: PredictionEvent) -> None:
        """Queue one event. O(1); never blocks on I/O and never raises."""
        try:
            self._emit(event)
        except Exception:  # noqa: BLE001 - telemetry must never fail the caller
            self.counters.add_dropped("emit_error")

    def _emit(self, event: PredictionEvent) -> None:
        if self._closed:
            self.counters.add_dropped("shutdown")
            return
        if not self._started:
            self.start()
        config = self.config
        with self._lock:
            queue = self._queue
            if len(queue) >= config.max_queue_size:
                if config.drop == "newest":
                    # Never entered the queue, so it is not "handled" by a flush.
                    self.counters.add_dropped("queue_full")
                    return
                queue.popleft()
                self._drop_now("queue_full")
            queue.append(event)
            self.counters.enqueued += 1
            full = len(queue) >= config.max_batch_size
        # Until the worker takes the batch, every later emit finds the queue
        # full: waking it once is enough (Event.set takes a lock and notifies).
        if full and not self._wake.is_set():
            self._wake.set()

    def _drop_now(self, reason: str) -> None:
        # Called with self._lock held: the counters' own lock is never taken
        # inside another lock in the other order, so this cannot deadlock.
        self.counters.add_dropped(reason)
        self._mark_handled(1)

    @property
    def queue_depth(self) -> int:
        """Events waiting in the queue."""
        return len(self._queue)

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread. Idempotent; ``emit`` calls it lazily."""
        with self._lock:
            if self._started or self._closed:
                return
            self._started = True
            self._thread = threading.Thread(target=self._run, name="predtrace-export", daemon=True)
            self._thread.start()

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Export everything queued so far; return whether it finished in time."""
        with self._lock:
            target = self._handled + len(self._queue)
        if not self._started:
            deadline = self._clock.monotonic() + timeout
            while self._handled < target and self._clock.monotonic() < deadline:
                if not self.pump():
                    break
            return self._handled >= target
        self._flushing = True
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._handled >= target, timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Flush within ``timeout`` seconds, then stop. Safe twice and without start.

        Events still queued at the deadline are dropped with reason ``shutdown``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._deadline = self._clock.monotonic() + timeout
            thread = self._thread
        if thread is None:
            self._drain_inline()
            self._drop_leftovers()
            self._shutdown_exporter()
            return
        # The worker owns the exporter: it shuts it down when its last export
        # returns, even when that outlives this deadline (a hung collector), so
        # the exporter is never closed under an export running in another thread.
        self._stop.set()
        self._wake.set()
        thread.join(timeout + 1.0)
        self._drop_leftovers()

    def _shutdown_exporter(self) -> None:
        try:
            self._exporter.shutdown(max(0.0, self._remaining()))
        except Exception as exc:  # noqa: BLE001 - shutdown must not raise
            self._log.warning("shutdown", "exporter shutdown failed: %s", type(exc).__name__)

    async def ashutdown(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a flush deadline, not a cancel scope
        """``shutdown`` for asyncio code: runs in a thread, never blocks the loop."""
        await asyncio.to_thread(self.shutdown, timeout)

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

    def _after_fork_in_child(self) -> None:
        # The parent's queue belongs to the parent: the child starts empty and
        # starts its own worker on its first emit.
        self._init_state()
        self.counters.reset()

    # -- worker ---------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
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
        self._drain_inline()
        self._drop_leftovers()
        self._shutdown_exporter()

    def _should_abandon(self) -> bool:
        return self._stop.is_set() and self._remaining() <= 0

    def pump(self) -> int:
        """Take one batch from the queue and deliver it (in the calling thread).

        The worker calls this; tests call it directly to drive the pipeline
        step by step with a FakeClock. Returns the number of events taken.
        """
        with self._lock:
            take = min(len(self._queue), self.config.max_batch_size)
            events = [self._queue.popleft() for _ in range(take)]
        if not events:
            return 0
        kept = self._process(events)
        if kept:
            self._deliver(OutgoingBatch(kept))
        self._mark_handled(take)
        return take

    def _process(self, events: list[PredictionEvent]) -> list[PredictionEvent]:
        kept = []
        for event in events:
            processed = self._process_one(event) if self._processors else event
            if processed is None:
                continue
            # An event the collector would refuse would cost its whole batch
            # (a 400): it is dropped alone, counted (off the request path).
            problem = event_problem(processed)
            if problem is not None:
                self.counters.add_dropped("invalid")
                self._log.warning("invalid", "event dropped: %s", problem)
                continue
            kept.append(processed)
        return kept

    def _process_one(self, event: PredictionEvent) -> PredictionEvent | None:
        current = event
        for processor in self._processors:
            try:
                result = processor(current)
            except Exception as exc:  # noqa: BLE001 - a bad processor drops one event
                self.counters.add_dropped("processor")
                self._log.warning("processor", "processor raised %s", type(exc).__name__)
                return None
            if result is None:
                self.counters.add_dropped("filtered")
                return None
            current = result
        return current

    def _deliver(self, batch: OutgoingBatch) -> None:
        size = len(batch.events)
        while True:
            batch.attempt += 1
            try:
                result = self._exporter.export(batch)
            except RetryableExportError as exc:
                if self._retry_wait(batch, exc, size):
                    continue
                return
            except PermanentExportError as exc:
                self.counters.add_dropped("permanent", size)
                self._log.warning("permanent", "batch dead-lettered, not retried: %s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - an exporter bug must not kill the worker
                self.counters.add_dropped("exporter_error", size)
                self._log.warning("exporter", "exporter raised %s", type(exc).__name__)
                return
            counts = _result_counts(result)
            if counts is None:
                # As much an exporter bug as raising (None, say): reading it
                # here would kill the worker and strand every later event.
                self.counters.add_dropped("exporter_error", size)
                self._log.warning(
                    "exporter", "exporter returned %s, not an ExportResult", type(result).__name__
                )
                return
            accepted, rejected = counts
            self.counters.add("batches")
            self.counters.add("exported", accepted)
            if rejected:
                self.counters.add_dropped("rejected", rejected)
            return

    def _retry_wait(self, batch: OutgoingBatch, exc: RetryableExportError, size: int) -> bool:
        """Wait before the next attempt; return False when the batch is abandoned."""
        if self.config.retry.gives_up_after(batch.attempt):
            self.counters.add_dropped("retries_exhausted", size)
            self._log.warning("exhausted", "batch dropped after %d attempts", batch.attempt)
            return False
        delay = self.config.retry.delay(batch.attempt - 1, exc.retry_after, self._rng)
        if delay >= self._remaining():
            self.counters.add_dropped("shutdown", size)
            return False
        self.counters.add("retried")
        self._log.warning("retry", "export failed, retrying: %s", exc)
        # During shutdown the stop event is set, so sleep on a private event
        # that nobody sets: the wait is bounded by the deadline check above.
        sleeper = threading.Event() if self._stop.is_set() else self._stop
        self._clock.wait(sleeper, delay)
        return True

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


def _reinit_after_fork() -> None:
    for instance in list(_INSTANCES):
        instance._after_fork_in_child()


os.register_at_fork(after_in_child=_reinit_after_fork)

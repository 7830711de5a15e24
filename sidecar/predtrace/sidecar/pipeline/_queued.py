"""The queued exporter: bounded queue -> batcher -> processors -> retry -> exporter.

``emit`` is what the request path calls: O(1), never blocks on I/O, never
raises. One worker thread (started lazily, restarted in a forked child) takes
batches by size or by time, runs the processors, and hands each batch to the
exporter, retrying transient failures with backoff. When the queue is full the
oldest (or newest) event is dropped and counted.

Every event enqueued ends exported or dropped by reason, including at
shutdown: the batch in flight is counted as well as the queue, and a
destination that is down or hung is not waited for beyond a short grace.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import threading
import weakref
from collections import Counter, deque
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field
from typing import Final, Literal

from predtrace.sidecar.pipeline._clock import Clock, SystemClock
from predtrace.sidecar.pipeline._counters import PipelineCounters, RateLimitedLog
from predtrace.sidecar.pipeline._errors import PermanentExportError, RetryableExportError
from predtrace.sidecar.pipeline._retry import RetryPolicy
from predtrace.sidecar.pipeline._stages import Exporter, OutgoingBatch, Processor
from predtrace.wire import DecodeLimits, PredictionEvent, event_problem

_log = logging.getLogger("predtrace.pipeline")
_INSTANCES: weakref.WeakSet[QueuedExporter] = weakref.WeakSet()

_MAX_QUEUE_SIZE: Final = 1_000_000
# The most events the receivers (collector, sidecar) take in one batch: a
# bigger batch would be refused whole, every time.
_MAX_BATCH_SIZE: Final = DecodeLimits().max_events
# Timed waits of the worker: the longest far below threading.TIMEOUT_MAX, whose
# overflow (inf, 1e10) kills a thread at its first wait; the shortest long
# enough that an idle worker does not spin (1e-6 cost a quarter of a core).
_MIN_DELAY_S: Final = 0.001
_MAX_DELAY_S: Final = 3600.0
_MAX_BACKOFF_S: Final = 86_400.0
# After an unexpected error in a loop turn, the worker pauses this long, so a
# fault that repeats on every turn cannot spin a core.
_ERROR_PAUSE_S: Final = 1.0
# Outcomes that prove the destination answers (None: exported).
_ANSWERED: Final = frozenset({None, "permanent"})


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueConfig:
    """Sizes and timings of a QueuedExporter.

    Integers are bounded (``max_queue_size`` at most 1,000,000) and every time
    is a finite number of seconds in [0.001, 3600]: NaN, infinity or a
    microsecond would make the worker spin or die at its first wait.

    Example:
        >>> QueueConfig(max_queue_size=4096, max_batch_size=512, schedule_delay=0.5)
    """

    max_queue_size: int = 4096
    max_batch_size: int = 512
    schedule_delay: float = 1.0
    stall_grace: float = 2.0
    """At shutdown, how long a destination that is failing or hung is waited for.

    An export in flight longer than this, or a batch failing for longer than
    this even after the immediate retry shutdown gives it, means the rest is
    dropped (``shutdown``) at once instead of at the deadline. A healthy
    destination keeps the whole shutdown deadline; one that takes longer
    than this for one batch is taken for hung (a collector commits a batch
    in milliseconds). Every server worker's restart waits this long at most
    for a collector that is down.
    """
    drop: Literal["oldest", "newest"] = "oldest"
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        if not _is_count(self.max_queue_size, _MAX_QUEUE_SIZE):
            raise ValueError(
                f"QueueConfig.max_queue_size must be an integer in [1, {_MAX_QUEUE_SIZE}], "
                f"got {self.max_queue_size!r}"
            )
        if not _is_count(self.max_batch_size, min(self.max_queue_size, _MAX_BATCH_SIZE)):
            raise ValueError(
                f"QueueConfig.max_batch_size must be in [1, max_queue_size] and at most "
                f"{_MAX_BATCH_SIZE} (what a collector or sidecar takes in one batch), "
                f"got {self.max_batch_size!r}"
            )
        for name in ("schedule_delay", "stall_grace"):
            value = getattr(self, name)
            if not _is_seconds(value, _MAX_DELAY_S, least=_MIN_DELAY_S):
                raise ValueError(
                    f"QueueConfig.{name} must be a finite number of seconds in "
                    f"[{_MIN_DELAY_S:g}, {_MAX_DELAY_S:g}], got {value!r}"
                )
        if self.drop not in ("oldest", "newest"):
            raise ValueError("QueueConfig.drop must be 'oldest' or 'newest'")
        retry = self.retry
        if not (
            _is_seconds(retry.initial_backoff, _MAX_BACKOFF_S)
            and _is_seconds(retry.max_backoff, _MAX_BACKOFF_S)
            and math.isfinite(retry.multiplier)
        ):
            raise ValueError(
                "QueueConfig.retry needs finite backoffs of at most "
                f"{_MAX_BACKOFF_S:g} seconds and a finite multiplier"
            )


def _is_count(value: object, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= most


def _is_seconds(value: object, most: float, *, least: float = 0.0) -> bool:
    # Every comparison with NaN is false, so NaN fails here too.
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    return value > 0 and least <= value <= most


class QueuedExporter:
    """Bounded, batching, retrying front of an exporter.

    An exporter may offer ``set_deadline(timeout)``: shutdown calls it so the
    attempt in flight (and any later one) ends within the time left, and with
    0 when it gives the destination up.

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

        A healthy destination gets the whole ``timeout``. One that is down or
        hung is given up after ``config.stall_grace`` (an export in flight
        that long, or a batch still failing after the immediate retry that
        shutdown triggers). Events not delivered by then, queued or in flight,
        are dropped with reason ``shutdown``; an export that returns later is
        not counted again.
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
        self._limit_exporter(timeout)
        self._stop.set()
        self._wake.set()
        if self._wait_for_worker():
            # It is past its last step (the exporter is shut down): only its exit is left.
            thread.join(max(0.0, self._remaining()))
        else:
            self._abandon_worker()
        self._drop_leftovers()

    def _wait_for_worker(self) -> bool:
        """Wait for the worker to finish; False at the deadline or when the destination stalls."""
        grace = self.config.stall_grace
        while True:
            self._changed.clear()  # before reading the state: a change after it wakes the wait
            with self._lock:
                if self._worker_done:
                    return True
                now = self._clock.monotonic()
                wait = self._remaining()
                if self._attempt_since is not None:
                    wait = min(wait, self._attempt_since + grace - now)
                elif self._final_backoff and self._failing_since is not None:
                    wait = min(wait, self._failing_since + grace - now)
            if wait <= 0:
                return False
            self._clock.wait(self._changed, wait)

    def _abandon_worker(self) -> None:
        """Count what the worker still holds as dropped and stop waiting for it."""
        with self._lock:
            if self._worker_done:
                return  # it finished meanwhile; the leftovers are counted by the caller
            self._abandoned = True
            queued = len(self._queue)
            self._queue.clear()
            stranded = self._inflight + queued
            self._inflight = 0
            at_deadline = self._remaining() <= 0
            if stranded:
                self.counters.add_dropped("shutdown", stranded)
        self._abandon.set()  # ends a backoff at once
        self._limit_exporter(0.0)  # ends the attempt in flight, if the exporter can
        if queued:
            self._mark_handled(queued)
        if stranded:
            why = "at the shutdown deadline" if at_deadline else "the destination is not answering"
            self._log.warning(
                "abandoned", "dropped %d queued and in-flight events at shutdown: %s", stranded, why
            )

    def _limit_exporter(self, timeout: float) -> None:
        limit = getattr(self._exporter, "set_deadline", None)
        if not callable(limit):
            return
        try:
            limit(max(0.0, timeout))
        except Exception as exc:  # noqa: BLE001 - shutdown must not raise
            self._log.warning("deadline", "exporter set_deadline failed: %s", type(exc).__name__)

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
        self.counters.reset_after_fork()

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


def _reinit_after_fork() -> None:
    for instance in list(_INSTANCES):
        instance._after_fork_in_child()


os.register_at_fork(after_in_child=_reinit_after_fork)

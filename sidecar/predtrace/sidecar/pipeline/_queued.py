"""The queued exporter: bounded queue -> batcher -> processors -> retry -> exporter.

``emit`` is what the request path calls: O(1), never blocks on I/O, never
raises. One worker thread (started lazily, restarted in a forked child) takes
batches by size or by time, runs the processors, and hands each batch to the
exporter, retrying transient failures with backoff. When the queue is full the
oldest (or newest) event is dropped and counted.

Every event enqueued ends exported or dropped by reason, including at
shutdown: the batch in flight is counted as well as the queue, and a
destination that is down or hung is not waited for beyond a short grace.

This module is the request path and the lifecycle (start, flush, shutdown,
fork); the worker and the delivery of a batch are ``_export_worker``, the
sizes and timings ``_queue_config``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import weakref
from collections.abc import Sequence

from predtrace.sidecar.pipeline._clock import Clock, SystemClock
from predtrace.sidecar.pipeline._counters import PipelineCounters, RateLimitedLog
from predtrace.sidecar.pipeline._export_worker import ExportWorker
from predtrace.sidecar.pipeline._queue_config import QueueConfig
from predtrace.sidecar.pipeline._stages import Exporter, Processor
from predtrace.wire import PredictionEvent

# Imported from here, wherever they are defined.
__all__ = ["QueueConfig", "QueuedExporter"]

_log = logging.getLogger("predtrace.pipeline")
_INSTANCES: weakref.WeakSet[QueuedExporter] = weakref.WeakSet()


class QueuedExporter(ExportWorker):
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

    async def ashutdown(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - a flush deadline, not a cancel scope
        """``shutdown`` for asyncio code: runs in a thread, never blocks the loop."""
        await asyncio.to_thread(self.shutdown, timeout)

    def _after_fork_in_child(self) -> None:
        # The parent's queue belongs to the parent: the child starts empty and
        # starts its own worker on its first emit.
        self._init_state()
        self.counters.reset_after_fork()


def _reinit_after_fork() -> None:
    for instance in list(_INSTANCES):
        instance._after_fork_in_child()


os.register_at_fork(after_in_child=_reinit_after_fork)

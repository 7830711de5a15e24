"""QueuedExporter: bounded queue, batching, retry, drops by reason, lifecycle, fork.

RELIABILITY rows 3, 4, 5, 20, 21 (emit side), 22 (in-process), 23, 24.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import pytest

from predtrace.sidecar.pipeline import (
    ExportResult,
    OutgoingBatch,
    PermanentExportError,
    QueueConfig,
    QueuedExporter,
    RetryableExportError,
    RetryPolicy,
    SystemClock,
)
from predtrace.sidecar.testing import FakeClock, InMemoryExporter, ScriptedExporter
from predtrace.wire import PredictionEvent, Rejection

Events = Callable[..., list[PredictionEvent]]


def _pipeline(exporter: object, clock: FakeClock | None = None, **config: object) -> QueuedExporter:
    cfg = QueueConfig(**{"max_queue_size": 100, "max_batch_size": 10, **config})  # type: ignore[arg-type]
    return QueuedExporter(exporter, cfg, clock=clock or FakeClock(), seed=1)  # type: ignore[arg-type]


def _fill_without_worker(pipeline: QueuedExporter, events: list[PredictionEvent]) -> None:
    # Mark started so emit does not spawn the worker: the test pumps by hand.
    pipeline._started = True
    for event in events:
        pipeline.emit(event)


def test_pump_takes_batches_of_the_configured_size(make_events: Events) -> None:
    exporter = InMemoryExporter()
    pipeline = _pipeline(exporter)
    _fill_without_worker(pipeline, make_events(25))
    assert [pipeline.pump(), pipeline.pump(), pipeline.pump(), pipeline.pump()] == [10, 10, 5, 0]
    assert [len(b) for b in exporter.batches] == [10, 10, 5]
    assert [e.prediction_id for e in exporter.events] == [f"e{i}" for i in range(25)]
    assert pipeline.counters.snapshot()["exported"] == 25


def test_full_queue_drops_oldest_and_counts_each_drop(make_events: Events) -> None:
    exporter = InMemoryExporter()
    pipeline = _pipeline(exporter, max_queue_size=20)
    _fill_without_worker(pipeline, make_events(1000))
    assert pipeline.queue_depth == 20
    counters = pipeline.counters.snapshot()
    assert counters["dropped.queue_full"] == 980
    assert counters["enqueued"] == 1000
    pipeline.pump()
    pipeline.pump()
    assert [e.prediction_id for e in exporter.events] == [f"e{i}" for i in range(980, 1000)]


def test_drop_newest_keeps_the_oldest(make_events: Events) -> None:
    exporter = InMemoryExporter()
    pipeline = _pipeline(exporter, max_queue_size=20, drop="newest")
    _fill_without_worker(pipeline, make_events(50))
    pipeline.pump()
    pipeline.pump()
    assert [e.prediction_id for e in exporter.events] == [f"e{i}" for i in range(20)]
    assert pipeline.counters.snapshot()["dropped.queue_full"] == 30


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_retryable_error_waits_at_least_retry_after_and_delivers(
    make_events: Events, status: int
) -> None:
    clock = FakeClock()
    exporter = ScriptedExporter(
        [
            RetryableExportError(f"collector answered {status}", retry_after=120.0),
            RetryableExportError(f"collector answered {status}"),
        ]
    )
    pipeline = _pipeline(exporter, clock)
    _fill_without_worker(pipeline, make_events(5))
    pipeline.pump()
    assert [a[0] for a in exporter.attempts] == [1, 2, 3]
    assert clock.sleeps[0] >= 120.0
    assert len(clock.sleeps) == 2
    assert exporter.delivered == [make_events(5)]
    counters = pipeline.counters.snapshot()
    assert counters["retried"] == 2
    assert counters["dropped"] == 0


@pytest.mark.parametrize("status", [400, 401, 403, 413])
def test_permanent_error_is_not_retried_counted_and_logged_once(
    make_events: Events, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = ScriptedExporter([PermanentExportError(f"collector answered {status}: bad")] * 3)
    pipeline = _pipeline(exporter)
    _fill_without_worker(pipeline, make_events(30))
    with caplog.at_level(logging.WARNING, logger="predtrace.pipeline"):
        for _ in range(3):
            pipeline.pump()
    assert [a[0] for a in exporter.attempts] == [1, 1, 1]
    assert pipeline.counters.snapshot()["dropped.permanent"] == 30
    logged = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert len(logged) == 1


def test_partial_success_counts_rejected_and_does_not_retry(make_events: Events) -> None:
    rejected = (Rejection(1, "bad trace_id", "e1"), Rejection(3, "bad", "e3"))
    exporter = ScriptedExporter([ExportResult(8, rejected)])
    pipeline = _pipeline(exporter)
    _fill_without_worker(pipeline, make_events(10))
    pipeline.pump()
    assert len(exporter.attempts) == 1
    counters = pipeline.counters.snapshot()
    assert counters["exported"] == 8
    assert counters["dropped.rejected"] == 2


def test_retries_resend_the_same_sealed_batch(make_events: Events) -> None:
    seen: list[tuple[int, bytes | None]] = []

    class SealingExporter:
        def export(self, batch: OutgoingBatch) -> ExportResult:
            if batch.payload is None:
                batch.seq, batch.payload = 7, b"sealed"
            seen.append((batch.seq, batch.payload))
            if len(seen) < 3:
                raise RetryableExportError("down")
            return ExportResult(len(batch.events))

        def shutdown(self, timeout: float) -> None:
            pass

    pipeline = _pipeline(SealingExporter())
    _fill_without_worker(pipeline, make_events(3))
    pipeline.pump()
    assert seen == [(7, b"sealed")] * 3


def test_offline_for_days_drops_nothing_for_elapsed_time(make_events: Events) -> None:
    # Row 24: an outage of a week; backoff stays capped; nothing is dropped
    # because of time, and the batch is delivered when the link returns.
    clock = FakeClock()
    outage = [RetryableExportError("connection refused")] * 20_000
    exporter = ScriptedExporter(outage)
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=60.0)
    pipeline = _pipeline(exporter, clock, retry=policy)
    _fill_without_worker(pipeline, make_events(10))
    start = clock.monotonic()
    pipeline.pump()
    assert clock.monotonic() - start > 3 * 86_400
    assert max(clock.sleeps) <= 60.0
    assert exporter.delivered == [make_events(10)]
    assert pipeline.counters.snapshot()["dropped"] == 0


def test_max_attempts_drops_with_its_own_reason(make_events: Events) -> None:
    exporter = ScriptedExporter([RetryableExportError("down")] * 5)
    pipeline = _pipeline(exporter, retry=RetryPolicy(max_attempts=3))
    _fill_without_worker(pipeline, make_events(4))
    pipeline.pump()
    assert len(exporter.attempts) == 3
    assert pipeline.counters.snapshot()["dropped.retries_exhausted"] == 4


def test_exporter_bug_drops_the_batch_and_the_worker_survives(make_events: Events) -> None:
    exporter = ScriptedExporter([ZeroDivisionError("bug")])
    pipeline = _pipeline(exporter)
    _fill_without_worker(pipeline, make_events(20))
    pipeline.pump()
    pipeline.pump()
    counters = pipeline.counters.snapshot()
    assert counters["dropped.exporter_error"] == 10
    assert counters["exported"] == 10


def test_processors_transform_filter_and_a_raising_one_drops_one_event(
    make_events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    def redact(event: PredictionEvent) -> PredictionEvent:
        event.attributes.pop("email", None)
        return event

    def only_even(event: PredictionEvent) -> PredictionEvent | None:
        return event if int(event.prediction_id[1:]) % 2 == 0 else None

    def explode_on_e4(event: PredictionEvent) -> PredictionEvent:
        if event.prediction_id == "e4":
            raise RuntimeError("processor bug")
        return event

    events = make_events(6)
    for e in events:
        e.attributes["email"] = "someone@example.org"
    exporter = InMemoryExporter()
    cfg = QueueConfig(max_queue_size=100, max_batch_size=10)
    pipeline = QueuedExporter(
        exporter, cfg, processors=[redact, only_even, explode_on_e4], clock=FakeClock()
    )
    _fill_without_worker(pipeline, events)
    with caplog.at_level(logging.WARNING, logger="predtrace.pipeline"):
        pipeline.pump()
    assert [e.prediction_id for e in exporter.events] == ["e0", "e2"]
    assert all("email" not in e.attributes for e in exporter.events)
    counters = pipeline.counters.snapshot()
    assert counters["dropped.filtered"] == 3
    assert counters["dropped.processor"] == 1
    assert "processor raised RuntimeError" in caplog.text


def test_emit_never_raises_even_on_garbage() -> None:
    pipeline = _pipeline(InMemoryExporter())
    pipeline._started = True
    pipeline._lock = None  # type: ignore[assignment]  # sabotage the internals
    pipeline.emit(PredictionEvent(prediction_id="x"))
    assert pipeline.counters.snapshot()["dropped.emit_error"] == 1


def test_worker_thread_exports_by_size_and_by_time(make_events: Events) -> None:
    exporter = InMemoryExporter()
    pipeline = QueuedExporter(
        exporter, QueueConfig(max_queue_size=1000, max_batch_size=50, schedule_delay=0.05)
    )
    for event in make_events(120):
        pipeline.emit(event)
    assert pipeline.force_flush(timeout=10)
    assert len(exporter.events) == 120
    for event in make_events(3, start=120):
        pipeline.emit(event)
    # Below the batch size: the timer sends it without a flush.
    deadline = time.monotonic() + 10
    while len(exporter.events) < 123 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(exporter.events) == 123
    pipeline.shutdown(timeout=5)


def test_shutdown_flushes_is_idempotent_and_emit_after_counts(make_events: Events) -> None:
    exporter = InMemoryExporter()
    pipeline = QueuedExporter(exporter, QueueConfig(schedule_delay=30.0))
    for event in make_events(700):
        pipeline.emit(event)
    pipeline.shutdown(timeout=5)
    pipeline.shutdown(timeout=5)
    assert len(exporter.events) == 700
    assert exporter.shutdown_calls == 1
    pipeline.emit(PredictionEvent(prediction_id="late"))
    assert pipeline.counters.snapshot()["dropped.shutdown"] == 1


def test_shutdown_without_start_is_safe_and_flushes_inline(make_events: Events) -> None:
    exporter = InMemoryExporter()
    QueuedExporter(exporter).shutdown(timeout=1)
    assert exporter.shutdown_calls == 1
    pipeline = QueuedExporter(exporter, clock=FakeClock())
    pipeline._started = True  # queued but never started a worker
    for event in make_events(3):
        pipeline.emit(event)
    pipeline._started = False
    pipeline.shutdown(timeout=1)
    assert len(exporter.events) == 3


def test_shutdown_deadline_bounds_a_dead_collector(make_events: Events) -> None:
    # Row 22 in-process: a full queue and a collector that never answers
    # well; shutdown returns by its deadline and counts what it could not send.
    exporter = ScriptedExporter([RetryableExportError("down", retry_after=3600)] * 100)
    pipeline = QueuedExporter(exporter, QueueConfig(max_queue_size=100, max_batch_size=10))
    for event in make_events(100):
        pipeline.emit(event)
    started = time.monotonic()
    pipeline.shutdown(timeout=0.5)
    assert time.monotonic() - started < 5
    assert pipeline.counters.snapshot()["dropped.shutdown"] == 100


async def test_emit_and_ashutdown_from_asyncio_code(make_events: Events) -> None:
    exporter = InMemoryExporter()
    pipeline = QueuedExporter(exporter)
    for event in make_events(10):
        pipeline.emit(event)
    await pipeline.ashutdown(timeout=5)
    assert len(exporter.events) == 10


def test_emit_from_many_threads_counts_exactly(make_events: Events) -> None:
    exporter = InMemoryExporter()
    pipeline = QueuedExporter(exporter, QueueConfig(max_queue_size=500, max_batch_size=100))

    def worker(base: int) -> None:
        for event in make_events(2000, start=base):
            pipeline.emit(event)

    threads = [threading.Thread(target=worker, args=(i * 10_000,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pipeline.shutdown(timeout=10)
    counters = pipeline.counters.snapshot()
    assert counters["enqueued"] == 8000
    assert counters["exported"] + counters["dropped"] == 8000
    assert counters["exported"] == len(exporter.events)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_has_a_working_pipeline_and_never_resends_the_parent_queue(
    make_events: Events,
) -> None:
    # Row 23 (gunicorn --preload): events queued in the parent before the fork
    # are exported by the parent only; the child's own events go out from it.
    exporter = InMemoryExporter()
    pipeline = QueuedExporter(exporter, QueueConfig(schedule_delay=30.0))
    for event in make_events(5):
        pipeline.emit(event)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read_fd)
            for event in make_events(3, start=100):
                pipeline.emit(event)
            pipeline.shutdown(timeout=5)
            os.write(write_fd, ",".join(e.prediction_id for e in exporter.events).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        child_exported = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert child_exported == "e100,e101,e102"
    pipeline.shutdown(timeout=5)
    assert [e.prediction_id for e in exporter.events] == [f"e{i}" for i in range(5)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("lock", ["counters", "log"])
def test_a_fork_while_another_thread_holds_a_pipeline_lock_leaves_the_child_working(
    lock: str, make_events: Events
) -> None:
    # The export thread takes these locks for microseconds per batch; a fork
    # (a process pool in a worker) in that window must not hang the child.
    exporter = InMemoryExporter()
    pipeline = QueuedExporter(exporter, QueueConfig(schedule_delay=30.0))
    held, release = threading.Event(), threading.Event()
    target = pipeline.counters._lock if lock == "counters" else pipeline._log._lock

    def holder() -> None:
        with target:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # child: emit, log a warning, flush, exit
            code = 1
            try:
                pipeline.emit(make_events(1)[0])
                pipeline._log.warning("probe", "after fork")
                pipeline.shutdown(timeout=5)
                code = 0 if pipeline.counters.snapshot()["exported"] == 1 else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 10
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done[0] == pid, "the child hung on a lock held at the fork"
        assert os.WEXITSTATUS(done[1]) == 0
    finally:
        release.set()
        thread.join()
        pipeline.shutdown(timeout=5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_queue_size": 0},
        {"max_batch_size": 0},
        {"max_queue_size": 10, "max_batch_size": 11},
        # More than a collector or sidecar takes in one batch: refused whole, every time.
        {"max_queue_size": 20_000, "max_batch_size": 10_001},
        {"schedule_delay": 0},
        {"drop": "random"},
        # NaN made the worker spin a core; inf and 1e10 killed it at its first wait.
        {"schedule_delay": float("nan")},
        {"schedule_delay": float("inf")},
        {"schedule_delay": 1e10},
        {"schedule_delay": -1.0},
        {"schedule_delay": 1e-6},  # an idle worker spinning
        {"stall_grace": float("nan")},
        {"stall_grace": 0},
        {"stall_grace": 3601},
        {"max_queue_size": 10**7},
        {"max_queue_size": True},
        {"retry": RetryPolicy(initial_backoff=float("nan"))},
        {"retry": RetryPolicy(max_backoff=float("inf"))},
    ],
)
def test_invalid_queue_config_fails_at_startup(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="QueueConfig"):
        QueueConfig(**kwargs)  # type: ignore[arg-type]


def test_an_export_outliving_shutdown_closes_the_exporter_after_it_not_under_it() -> None:
    """A hung export: shutdown returns at its deadline; the exporter is shut down later,
    by the worker, once the export returned (never concurrently with it)."""

    class Hanging:
        def __init__(self) -> None:
            self.release = threading.Event()
            self.exporting = threading.Event()
            self.log: list[str] = []

        def export(self, batch: OutgoingBatch) -> ExportResult:
            self.exporting.set()
            self.log.append("export started")
            self.release.wait(10)
            self.log.append("export returned")
            return ExportResult(accepted=len(batch.events))

        def shutdown(self, timeout: float) -> None:
            self.log.append("shutdown")

    exporter = Hanging()
    pipeline = QueuedExporter(exporter, QueueConfig(max_batch_size=1, schedule_delay=0.01))
    pipeline.start()
    pipeline.emit(PredictionEvent(prediction_id="p-1"))
    assert exporter.exporting.wait(5)
    pipeline.shutdown(timeout=0.05)
    assert exporter.log == ["export started"]  # not shut down under the running export
    exporter.release.set()
    deadline = time.monotonic() + 5
    while "shutdown" not in exporter.log and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exporter.log == ["export started", "export returned", "shutdown"]


def test_an_exporter_returning_no_result_drops_the_batch_and_the_worker_survives(
    make_events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    class ReturnsNoneFirst(InMemoryExporter):
        returned_none = False

        def export(self, batch: OutgoingBatch) -> ExportResult:
            if not self.returned_none:
                self.returned_none = True
                return None  # type: ignore[return-value]  # the exporter bug under test
            return super().export(batch)

    exporter = ReturnsNoneFirst()
    pipeline = QueuedExporter(exporter, QueueConfig(max_batch_size=10, schedule_delay=0.05))
    with caplog.at_level(logging.WARNING, logger="predtrace.pipeline"):
        for event in make_events(10):
            pipeline.emit(event)
        assert pipeline.force_flush(timeout=5)
        for event in make_events(10, start=10):
            pipeline.emit(event)
        assert pipeline.force_flush(timeout=5)  # the worker is still there
    assert [e.prediction_id for e in exporter.events] == [f"e{i}" for i in range(10, 20)]
    counters = pipeline.counters.snapshot()
    assert (counters["dropped.exporter_error"], counters["exported"]) == (10, 10)
    assert "exporter returned NoneType" in caplog.text
    pipeline.shutdown(timeout=5)


def test_queue_config_accepts_its_bounds() -> None:
    QueueConfig(max_queue_size=1_000_000, max_batch_size=1, schedule_delay=3600, stall_grace=3600)
    QueueConfig(schedule_delay=0.001, stall_grace=0.001)


def _accounted(counters: dict[str, int]) -> bool:
    """Every event enqueued ended exported or dropped by reason."""
    dropped = sum(n for key, n in counters.items() if key.startswith("dropped."))
    return counters["enqueued"] == counters["exported"] + dropped


class _Blocking:
    """Blocks inside export until released; records the deadlines it was given."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()
        self.deadlines: list[float] = []
        self.shutdown_calls = 0

    def export(self, batch: OutgoingBatch) -> ExportResult:
        self.entered.set()
        self.release.wait(30)
        self.returned.set()
        return ExportResult(len(batch.events))

    def set_deadline(self, timeout: float) -> None:
        self.deadlines.append(timeout)

    def shutdown(self, timeout: float) -> None:
        self.shutdown_calls += 1


def _join_worker(pipeline: QueuedExporter) -> None:
    assert pipeline._thread is not None
    pipeline._thread.join(30)
    assert not pipeline._thread.is_alive()


def test_a_hung_export_is_given_up_after_the_grace_and_its_batch_counted_once(
    make_events: Events,
) -> None:
    """Finding t13/t18: the batch in flight at shutdown was in neither exported
    nor dropped, and a hung collector held every shutdown for the whole deadline."""
    exporter = _Blocking()
    config = QueueConfig(max_batch_size=10, schedule_delay=0.01, stall_grace=0.05)
    pipeline = QueuedExporter(exporter, config)
    for event in make_events(25):
        pipeline.emit(event)
    assert exporter.entered.wait(10)  # 10 in flight, 15 queued
    pipeline.shutdown(timeout=60)
    assert not exporter.returned.is_set()  # returned while the export still hangs
    after = pipeline.counters.snapshot()
    assert (after["exported"], after["dropped.shutdown"]) == (0, 25)
    assert _accounted(after)
    assert exporter.deadlines == [60, 0.0]  # bounded by the deadline, then cut
    exporter.release.set()
    _join_worker(pipeline)
    assert pipeline.counters.snapshot() == after  # the late return is not counted again
    assert exporter.shutdown_calls == 1  # by the worker, after its export returned


def test_at_the_deadline_the_batch_in_flight_is_counted_as_dropped(make_events: Events) -> None:
    exporter = _Blocking()
    config = QueueConfig(max_batch_size=10, schedule_delay=0.01, stall_grace=3600)
    pipeline = QueuedExporter(exporter, config)
    for event in make_events(25):
        pipeline.emit(event)
    assert exporter.entered.wait(10)
    pipeline.shutdown(timeout=0.2)
    assert not exporter.returned.is_set()
    after = pipeline.counters.snapshot()
    assert (after["exported"], after["dropped.shutdown"]) == (0, 25)
    assert _accounted(after)
    exporter.release.set()
    _join_worker(pipeline)
    assert pipeline.counters.snapshot() == after


class _Refusing:
    """A collector that is down: every attempt fails, asking for a long backoff."""

    def __init__(self) -> None:
        self.attempts = 0
        self.failed = threading.Event()

    def export(self, batch: OutgoingBatch) -> ExportResult:
        self.attempts += 1
        self.failed.set()
        raise RetryableExportError("collector unreachable: ClientConnectorError", retry_after=5.0)

    def shutdown(self, timeout: float) -> None:
        pass


def test_a_failing_destination_gets_one_more_try_at_shutdown_then_is_given_up(
    make_events: Events,
) -> None:
    exporter = _Refusing()
    config = QueueConfig(max_batch_size=10, schedule_delay=0.01, stall_grace=0.05)
    pipeline = QueuedExporter(exporter, config)
    for event in make_events(25):
        pipeline.emit(event)
    assert exporter.failed.wait(10)  # the batch is in backoff (or entering it)
    pipeline.shutdown(timeout=12)
    # At most the one try shutdown triggers: no backoff is waited out.
    assert exporter.attempts <= 2
    after = pipeline.counters.snapshot()
    assert (after["exported"], after["dropped.shutdown"]) == (0, 25)
    assert _accounted(after)
    _join_worker(pipeline)
    assert pipeline.counters.snapshot() == after


class _AgedClock(SystemClock):
    """The real clock, moved on by ``offset``: a test ages what happened so far."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return super().monotonic() + self.offset


def test_a_long_failure_is_not_forgiven_when_a_batch_is_dropped_at_the_deadline(
    make_events: Events,
) -> None:
    """The next batch does not restart the grace: the destination has been
    failing since the first failure after its last answer."""
    outcomes = iter([100.0, 100.0])  # Retry-After of batch 1: past the deadline at shutdown

    class Down(_Refusing):
        def export(self, batch: OutgoingBatch) -> ExportResult:
            self.attempts += 1
            self.failed.set()
            raise RetryableExportError("down", retry_after=next(outcomes, 3.0))

    exporter = Down()
    clock = _AgedClock()
    config = QueueConfig(max_batch_size=10, schedule_delay=0.01, stall_grace=10.0)
    pipeline = QueuedExporter(exporter, config, clock=clock)
    for event in make_events(20):
        pipeline.emit(event)
    for _ in range(1000):  # batch 1 failed and is in its backoff of 100 s
        if pipeline.counters.snapshot()["retried"]:
            break
        time.sleep(0.01)
    assert pipeline.counters.snapshot()["retried"] == 1
    clock.offset += 60.0  # ... since a minute ago
    pipeline.shutdown(timeout=30)
    # Batch 1's try at shutdown is dropped (100 s > 30 s left), batch 2 fails
    # once and is given up at once, not after another grace with more tries.
    assert exporter.attempts == 3
    after = pipeline.counters.snapshot()
    assert (after["exported"], after["dropped.shutdown"]) == (0, 20)
    assert _accounted(after)
    _join_worker(pipeline)


def test_a_healthy_destination_keeps_the_deadline_through_a_transient_failure(
    make_events: Events,
) -> None:
    exporter = ScriptedExporter([RetryableExportError("collector answered 503")] * 2)
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.002)
    config = QueueConfig(max_queue_size=1000, max_batch_size=100, schedule_delay=30.0, retry=policy)
    pipeline = QueuedExporter(exporter, config)
    for event in make_events(250):
        pipeline.emit(event)
    pipeline.shutdown(timeout=30)
    after = pipeline.counters.snapshot()
    assert (after["exported"], after["dropped"], after["retried"]) == (250, 0, 2)
    assert _accounted(after)
    assert exporter.shutdown_calls == 1


def test_shutdown_gives_up_in_fake_time_when_an_export_outlives_the_grace(
    make_events: Events,
) -> None:
    # The same decision on the pipeline's Clock: the fake clock's wait moves
    # time on, so shutdown gives up without any real waiting.
    exporter = _Blocking()
    clock = FakeClock()
    config = QueueConfig(max_batch_size=10, schedule_delay=3600, stall_grace=1.0)
    pipeline = QueuedExporter(exporter, config, clock=clock)
    for event in make_events(10):
        pipeline.emit(event)
    assert exporter.entered.wait(10)
    pipeline.shutdown(timeout=3600)
    assert not exporter.returned.is_set()
    assert pipeline.counters.snapshot()["dropped.shutdown"] == 10
    assert 1.0 in clock.sleeps  # it waited out the grace, in fake time
    exporter.release.set()
    _join_worker(pipeline)


class _ClockFailingOnce(SystemClock):
    """The real clock, except that its first wait raises (as Event.wait(inf) did)."""

    def __init__(self) -> None:
        self.failed = False

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        if not self.failed:
            self.failed = True
            raise OverflowError("timestamp out of range for platform time_t")
        return super().wait(event, timeout)


def test_the_worker_survives_an_error_in_a_loop_turn(
    make_events: Events, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = InMemoryExporter()
    config = QueueConfig(max_batch_size=10, schedule_delay=0.01)
    pipeline = QueuedExporter(exporter, config, clock=_ClockFailingOnce())
    with caplog.at_level(logging.WARNING, logger="predtrace.pipeline"):
        for event in make_events(5):
            pipeline.emit(event)
        assert pipeline.force_flush(timeout=10)
    assert len(exporter.events) == 5
    assert pipeline.worker_errors == 1
    assert "export worker error, carrying on: OverflowError" in caplog.text
    pipeline.shutdown(timeout=5)
    assert _accounted(pipeline.counters.snapshot())


def test_a_batch_lost_to_a_worker_bug_is_counted_and_the_worker_carries_on(
    make_events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = InMemoryExporter()
    config = QueueConfig(max_batch_size=5, schedule_delay=0.01)
    pipeline = QueuedExporter(exporter, config)
    deliver, failed = pipeline._deliver, []

    def buggy_once(batch: OutgoingBatch) -> None:
        if not failed:
            failed.append(batch)
            raise RuntimeError("a bug in the worker")
        deliver(batch)

    monkeypatch.setattr(pipeline, "_deliver", buggy_once)
    for event in make_events(5):
        pipeline.emit(event)
    assert pipeline.force_flush(timeout=10)  # the lost batch still counts as handled
    for event in make_events(5, start=5):
        pipeline.emit(event)
    assert pipeline.force_flush(timeout=10)  # the worker is still there
    assert [e.prediction_id for e in exporter.events] == [f"e{i}" for i in range(5, 10)]
    counters = pipeline.counters.snapshot()
    assert (counters["dropped.worker_error"], counters["exported"]) == (5, 5)
    assert pipeline.worker_errors == 1
    pipeline.shutdown(timeout=5)
    assert _accounted(pipeline.counters.snapshot())

"""Retention: old predictions go (whole partitions on PostgreSQL), counts stay exact."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from predtrace.collector._config import MAX_RETENTION_DAYS, RetentionPolicy
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._retention import Retainer
from predtrace.collector.lineage import parse_registration
from predtrace.collector.store import Store, open_store
from predtrace.collector.testing import make_events

from .test_store import FULL_LINEAGE, record

DAY = 86_400 * 1_000_000_000
OLD_TRACE = bytes.fromhex("11111111111111111111111111111111")
NEW_TRACE = bytes.fromhex("22222222222222222222222222222222")


async def test_retention_removes_old_predictions_and_keeps_lineage(store: Store) -> None:
    now = time.time_ns()
    await store.register(parse_registration(FULL_LINEAGE))
    await store.ingest(
        record("p", 1, make_events(7, trace_id=OLD_TRACE), received_ns=now - 10 * DAY)
    )
    await store.ingest(record("p", 2, make_events(3, trace_id=NEW_TRACE), received_ns=now))
    metrics = CollectorMetrics()
    retainer = Retainer(store, RetentionPolicy(predictions_days=5, chunk=2), metrics)
    report = await retainer.run_once()
    assert report["removed"]["predictions"] == 7  # type: ignore[index]
    assert (await store.pivot("trace_id", OLD_TRACE))[0] == []
    assert len((await store.pivot("trace_id", NEW_TRACE))[0]) == 3
    impact = await store.impact("dataset", "sha256:train")
    assert impact is not None
    assert impact["predictions"] == 3  # served counts follow the deletions
    assert (await store.model_lineage("churn", "3")) is not None  # lineage nodes are kept
    reports = await retainer.reports()
    assert reports[0]["removed"] == report["removed"]
    if store.dialect == "postgres":
        assert report["removed"]["partitions"] >= 1  # type: ignore[index]


async def test_batch_records_are_kept_unless_a_policy_says_otherwise(store: Store) -> None:
    now = time.time_ns()
    await store.ingest(record("p", 1, make_events(1), received_ns=now - 10 * DAY))
    metrics = CollectorMetrics()
    report = await Retainer(store, RetentionPolicy(predictions_days=1), metrics).run_once()
    assert "batches" not in report["removed"]  # type: ignore[operator]
    duplicate = await store.ingest(record("p", 1, make_events(1), received_ns=now))
    assert duplicate.duplicate  # the dedupe key outlives the predictions
    report = await Retainer(store, RetentionPolicy(batches_days=1), metrics).run_once()
    assert report["removed"]["batches"] == 1  # type: ignore[index]


class BrokenPassRetainer(Retainer):
    """A retainer whose every pass fails with a bug (not a store error)."""

    def __init__(self, store: Store, policy: RetentionPolicy) -> None:
        super().__init__(store, policy, CollectorMetrics())
        self.passes = 0
        self.fifth = asyncio.Event()

    async def run_once(self) -> dict[str, object]:
        self.passes += 1
        if self.passes == 5:
            self.fifth.set()
        raise ValueError("cannot convert float NaN to integer")


async def test_a_pass_that_fails_unexpectedly_is_logged_once_and_the_task_keeps_running(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    unused = open_store(f"sqlite:///{tmp_path}/c.db")  # the passes never reach it
    policy = RetentionPolicy(predictions_days=1, interval_s=0.001)
    retainer = BrokenPassRetainer(unused, policy)
    retainer.start()
    try:
        async with asyncio.timeout(10):
            await retainer.fifth.wait()
        assert retainer._task is not None and not retainer._task.done()
    finally:
        await retainer.stop()
    failures = [r for r in caplog.records if r.name == "predtrace.collector.retention"]
    assert len(failures) == 1, "one traceback per window, not one per pass"
    (failure,) = failures
    assert failure.levelno == logging.ERROR and failure.exc_info is not None
    assert "will retry" in failure.getMessage()


async def test_the_longest_retention_accepted_still_runs_a_pass(store: Store) -> None:
    days = MAX_RETENTION_DAYS
    policy = RetentionPolicy(predictions_days=days, batches_days=days, chain_events_days=days)
    report = await Retainer(store, policy, CollectorMetrics()).run_once()
    assert report["removed"] == {"partitions": 0, "predictions": 0, "batches": 0, "chain_events": 0}

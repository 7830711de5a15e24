"""Retention: remove predictions (and optionally batch records) past their age.

Runs in the background every ``interval_s``; each chunk is a separate write, so
ingest interleaves with it and is never blocked for long. On PostgreSQL whole
day partitions older than the cutoff are dropped first. Each pass produces a
report (what was removed, the cutoffs) kept in the store and counted in metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from functools import partial

from predtrace.collector._config import RetentionPolicy
from predtrace.collector._errors import StoreError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector.store import Store
from predtrace.collector.store._maintenance import (
    expire_predictions_plan,
    expire_rows_plan,
    record_retention_plan,
    retention_runs_plan,
)
from predtrace.collector.store._ops import Plan
from predtrace.collector.store._rows import iso_time

log = logging.getLogger("predtrace.collector.retention")
_DAY_NS = 86_400 * 1_000_000_000
# At most one traceback of an unexpected pass failure this often: a pass that
# fails the same way every few seconds must not fill the log.
_FAILURE_LOG_INTERVAL_S = 600.0
Json = dict[str, object]


class Retainer:
    """Applies a ``RetentionPolicy`` to a store, on demand or periodically."""

    def __init__(
        self,
        store: Store,
        policy: RetentionPolicy,
        metrics: CollectorMetrics,
        *,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.store, self.policy, self.metrics, self._clock = store, policy, metrics, clock
        self._task: asyncio.Task[None] | None = None
        self._next_failure_log = 0.0
        self._failures_left_out = 0

    def _cutoff(self, days: float | None, now_ns: int) -> int | None:
        return None if days is None else now_ns - int(days * _DAY_NS)

    async def run_once(self) -> Json:
        """One retention pass; returns its report."""
        started = self._clock()
        removed: dict[str, int] = {}
        cutoffs: dict[str, str | None] = {}
        cutoff = self._cutoff(self.policy.predictions_days, started)
        if cutoff is not None:
            partitions, rows = await self.store.engine.drop_partitions_before(cutoff)
            removed["partitions"] = partitions
            removed["predictions"] = rows + await self._drain(
                partial(expire_predictions_plan, cutoff, self.policy.chunk)
            )
            cutoffs["predictions"] = iso_time(cutoff)
        for table, days in (
            ("batches", self.policy.batches_days),
            ("chain_events", self.policy.chain_events_days),
        ):
            table_cutoff = self._cutoff(days, started)
            if table_cutoff is not None:
                removed[table] = await self._drain(
                    partial(expire_rows_plan, table, table_cutoff, self.policy.chunk)
                )
                cutoffs[table] = iso_time(table_cutoff)
        finished = self._clock()
        report: Json = {
            "started": iso_time(started),
            "finished": iso_time(finished),
            "removed": removed,
            "cutoffs": cutoffs,
        }
        for kind, count in removed.items():
            self.metrics.retention_removed.labels(kind).inc(count)
        await self.store.engine.write(record_retention_plan(started, finished, json.dumps(report)))
        return report

    async def _drain(self, plan: Callable[[], Plan[int]]) -> int:
        total = 0
        while True:
            done = await self.store.engine.write(plan())
            total += done
            if done < self.policy.chunk:
                return total
            await asyncio.sleep(0)  # let queued ingest run between chunks

    async def reports(self, limit: int = 10) -> list[Json]:
        """The latest retention reports, newest first."""
        rows = await self.store.engine.read(retention_runs_plan(limit))
        return [json.loads(r[2]) for r in rows]

    def start(self) -> None:
        """Run passes in the background every ``interval_s`` (no-op when nothing expires)."""
        if self.policy.enabled and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="predtrace-retention")

    async def _loop(self) -> None:
        while True:
            try:
                report = await self.run_once()
                log.info("retention pass removed %s", report["removed"])
            except StoreError as exc:
                log.warning("retention pass failed, will retry: %s", exc)
            # The task must outlive any bug in a pass: if it died, retention
            # would stop for good with nothing in the log (do not crash after startup).
            except Exception:  # noqa: BLE001 - logged with its traceback, then retried
                self._log_failure()
            await asyncio.sleep(self.policy.interval_s)

    def _log_failure(self) -> None:
        """Log the current exception, at most once per interval, counting the rest."""
        now = time.monotonic()
        if now < self._next_failure_log:
            self._failures_left_out += 1
            return
        left_out, self._failures_left_out = self._failures_left_out, 0
        self._next_failure_log = now + _FAILURE_LOG_INTERVAL_S
        extra = f" ({left_out} more since the last one)" if left_out else ""
        log.exception("retention pass failed unexpectedly, will retry%s", extra)

    async def stop(self) -> None:
        """Cancel the background task and wait for it. Safe twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

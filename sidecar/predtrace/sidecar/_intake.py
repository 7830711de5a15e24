"""Intake: every source's events -> processors -> checked -> encoded once -> durable spool append.

The gRPC API, the OTLP receiver and the OIP proxy all hand events here. An
event is encoded to its msgpack map bytes exactly once, here; the spool
stores those bytes and the shipper sends them unchanged. ``record`` returns
only when the accepted events are durable (RELIABILITY rule 1).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from predtrace.sidecar._batch import encode_event
from predtrace.sidecar.pipeline import Processor, RateLimitedLog
from predtrace.sidecar.spool import Spool
from predtrace.wire import PredictionEvent, Rejection, event_problem

_log = logging.getLogger("predtrace.sidecar.intake")
_THREAD_THRESHOLD = 256  # encode bigger requests in a thread: the loop keeps serving


@dataclass(slots=True)
class IntakeCounters:
    """Events seen by the intake, and what became of them."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    filtered: int = 0
    processor_errors: int = 0


@dataclass(frozen=True, slots=True)
class IntakeResult:
    """Accepted count and per-event rejections (indexes into the given list)."""

    accepted: int
    rejected: tuple[Rejection, ...] = field(default=())


class Intake:
    """Processes, encodes and durably spools events."""

    def __init__(self, spool: Spool, processors: Sequence[Processor] = ()) -> None:
        self.spool = spool
        self.counters = IntakeCounters()
        self._processors = tuple(processors)
        self._limit = spool.config.max_record_bytes
        self._log = RateLimitedLog(_log)

    async def record(self, events: Sequence[PredictionEvent]) -> IntakeResult:
        """Spool ``events``; return once the accepted ones are durable.

        Raises:
            SpoolError: the spool refused the write (full disk, busy, closed);
                nothing of this call was acknowledged.
        """
        if len(events) >= _THREAD_THRESHOLD:
            payloads, rejected = await asyncio.to_thread(self._prepare, events)
        else:
            payloads, rejected = self._prepare(events)
        if payloads:
            await self.spool.append(payloads)
        self.counters.accepted += len(payloads)
        self.counters.rejected += len(rejected)
        return IntakeResult(len(payloads), tuple(rejected))

    def _prepare(self, events: Sequence[PredictionEvent]) -> tuple[list[bytes], list[Rejection]]:
        payloads: list[bytes] = []
        rejected: list[Rejection] = []
        self.counters.received += len(events)
        for index, event in enumerate(events):
            processed = self._process(event)
            if processed is None:
                continue
            # What the collector would refuse is refused now, to this sender:
            # once acknowledged, one such event would cost its whole batch.
            problem = event_problem(processed)
            if problem is not None:
                rejected.append(Rejection(index, problem, event.prediction_id[:256]))
                continue
            data = encode_event(processed)
            if len(data) > self._limit:
                rejected.append(
                    Rejection(index, f"event larger than {self._limit} bytes", event.prediction_id)
                )
                continue
            payloads.append(data)
        return payloads, rejected

    def _process(self, event: PredictionEvent) -> PredictionEvent | None:
        current = event
        for processor in self._processors:
            try:
                result = processor(current)
            except Exception as exc:  # noqa: BLE001 - a bad processor drops one event, counted
                self.counters.processor_errors += 1
                self._log.warning("processor", "processor raised %s", type(exc).__name__)
                return None
            if result is None:
                self.counters.filtered += 1
                return None
            current = result
        return current

"""Intake: every source's events -> processors -> checked -> encoded once -> durable spool append.

The gRPC API, the OTLP receiver and the OIP proxy all hand events here. An
event is encoded to its msgpack map bytes exactly once, here; the spool
stores those bytes and the shipper sends them unchanged. ``record`` returns
only when the accepted events are durable (RELIABILITY rule 1).

Events that arrive as msgpack maps (``packed_events``) may be handed over as
those maps (the intake changes them in place). A plain one
(``plain_event_map``) stays a map: the processors' ``on_map``,
``canonical_event_map`` and ``plain_map_problem`` do to it what they would do
to its event, and the spooled bytes are the same, a little cheaper than
building the event and encoding it again.
Any other map takes the precise path (``event_from_map``), which alone names
why a map is refused. Packed events are handed over unread
(``PackedEvents``) and built here one at a time, off the event loop for a
big request: the intake holds one event's objects at a time, and bytes for
the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol, get_args

import msgpack

from predtrace.sidecar._batch import encode_event
from predtrace.sidecar.pipeline import Processor, RateLimitedLog
from predtrace.sidecar.spool import Spool
from predtrace.wire import (
    PredictionEvent,
    Rejection,
    WireError,
    canonical_event_map,
    event_from_map,
    event_problem,
    event_rejection,
    plain_event_map,
    plain_map_problem,
)

MapProcessor = Callable[[dict[Any, Any]], dict[Any, Any] | None]

_log = logging.getLogger("predtrace.sidecar.intake")
_THREAD_THRESHOLD = 256  # encode bigger requests in a thread: the loop keeps serving
RefusedReason = Literal["malformed", "too_many_events", "bad_packed_events", "bad_batch_id"]
"""Why a source refused a whole request, none of its events read (a fixed set)."""
REFUSED_REASONS: Final[tuple[RefusedReason, ...]] = get_args(RefusedReason)


class EventItems(Protocol):
    """What ``record`` takes: events, maps, or packed events read as it goes."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[PredictionEvent | object]: ...


@dataclass(slots=True)
class IntakeCounters:
    """Events seen by the intake, and what became of them."""

    received: int = 0
    accepted: int = 0
    rejected: int = 0
    filtered: int = 0
    processor_errors: int = 0
    refused_requests: dict[RefusedReason, int] = field(
        default_factory=lambda: dict.fromkeys(REFUSED_REASONS, 0)
    )
    """Whole requests refused, by reason (their events are not counted: never read)."""
    duplicate_batches: int = 0
    """Retries of a batch already spooled (same batch id): answered, not spooled again."""


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
        # Maps stay maps only when every processor can work on one.
        on_maps = [_map_form(p) for p in self._processors]
        self._map_processors: tuple[MapProcessor, ...] | None = (
            tuple(m for m in on_maps if m is not None) if None not in on_maps else None
        )
        self._limit = spool.config.max_record_bytes
        self._log = RateLimitedLog(_log)

    def count_refused(self, count: int) -> None:
        """Count events a source refused before handing them over (unreadable ones)."""
        self.counters.received += count
        self.counters.rejected += count

    def count_refused_request(self, reason: RefusedReason) -> None:
        """Count a whole request a source refused (malformed, too many events...)."""
        self.counters.refused_requests[reason] += 1

    async def record(self, events: EventItems) -> IntakeResult:
        """Spool ``events``; return once the accepted ones are durable.

        An item that is not a ``PredictionEvent`` is an event map as unpacked
        from ``packed_events`` (anything else there is rejected with a reason).

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

    def _prepare(self, events: EventItems) -> tuple[list[bytes], list[Rejection]]:
        payloads: list[bytes] = []
        rejected: list[Rejection] = []
        self.counters.received += len(events)
        map_processors = self._map_processors
        for index, item in enumerate(events):
            if isinstance(item, PredictionEvent):
                event = item
            elif map_processors is not None and plain_event_map(item):
                self._prepare_map(index, item, map_processors, payloads, rejected)  # type: ignore[arg-type]
                continue
            else:
                try:
                    event = event_from_map(item)
                except WireError as exc:
                    rejected.append(event_rejection(index, item, exc))
                    continue
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

    def _prepare_map(
        self,
        index: int,
        raw: dict[Any, Any],
        processors: tuple[MapProcessor, ...],
        payloads: list[bytes],
        rejected: list[Rejection],
    ) -> None:
        """``_prepare``'s steps for one plain event map, kept a map."""
        prediction_id: str = raw[1]
        current = raw
        for processor in processors:
            try:
                result = processor(current)
            except Exception as exc:  # noqa: BLE001 - a bad processor drops one event, counted
                self.counters.processor_errors += 1
                self._log.warning("processor", "processor raised %s", type(exc).__name__)
                return
            if result is None:
                self.counters.filtered += 1
                return
            current = result
        canonical = canonical_event_map(current)  # the bytes the object path would spool
        problem = plain_map_problem(canonical)
        if problem is not None:
            rejected.append(Rejection(index, problem, prediction_id[:256]))
            return
        data: bytes = msgpack.packb(canonical, use_bin_type=True)
        if len(data) > self._limit:
            reason = f"event larger than {self._limit} bytes"
            rejected.append(Rejection(index, reason, prediction_id))
            return
        payloads.append(data)

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


def _map_form(processor: Processor) -> MapProcessor | None:
    """The processor's ``on_map``, if the class that defines it also defines ``__call__``.

    A subclass that overrides ``__call__`` alone must not inherit an
    ``on_map`` that no longer does the same thing: its events take the
    object path.
    """
    on_map = getattr(processor, "on_map", None)
    if not callable(on_map):
        return None
    for cls in type(processor).__mro__:
        if "__call__" in vars(cls) or "on_map" in vars(cls):
            return on_map if "__call__" in vars(cls) and "on_map" in vars(cls) else None
    return None

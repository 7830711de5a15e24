"""The sidecar's own gRPC API (``predtrace.v1.Sidecar``): a source of the pipeline.

**GrpcSource** -> intake -> spool. Requests are parsed here (not by gRPC's
deserializer) so malformed bytes get INVALID_ARGUMENT with a reason instead
of an internal error. ``RecordBatch`` and ``Record`` answer only once every
accepted event is durable in the spool. Spool pressure maps to
RESOURCE_EXHAUSTED with a retry pushback; shutdown to UNAVAILABLE.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError

from predtrace.sidecar._errors import SpoolBusyError, SpoolClosedError, SpoolError, SpoolFullError
from predtrace.sidecar._intake import Intake
from predtrace.v1 import batch_pb2, event_pb2, sidecar_pb2
from predtrace.wire import (
    DecodeLimits,
    PredictionEvent,
    Rejection,
    WireError,
    WireTooLargeError,
    event_from_proto,
    unpack_event_maps,
)

_log = logging.getLogger("predtrace.sidecar.grpc")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
SERVICE_NAME: Final = "predtrace.v1.Sidecar"
MAX_EVENTS_PER_STREAM: Final = 1_000_000
_STREAM_CHUNK: Final = 1000
_PUSHBACK_MS: Final = "1000"
# An ack lists at most this many rejections (the first ones by position), and
# fewer when they would not fit the message size limit; the sender counts the
# rest as sent - accepted - listed.
MAX_LISTED_REJECTIONS: Final = 1000
# A listed rejection echoes at most this much of the event's id and reason.
_ID_CHARS: Final = 256
_REASON_CHARS: Final = 512
_ACK_HEADROOM: Final = 64  # bytes for the ack's own fields


def convert_events(
    messages: Sequence[event_pb2.PredictionEvent],
) -> tuple[list[PredictionEvent], list[int], list[Rejection]]:
    """Validate protobuf events: the good ones, their request positions, and rejections."""
    events: list[PredictionEvent] = []
    positions: list[int] = []
    rejected: list[Rejection] = []
    for index, message in enumerate(messages):
        try:
            events.append(event_from_proto(message))
        except WireError as exc:
            rejected.append(Rejection(index, str(exc), message.prediction_id[:256]))
            continue
        positions.append(index)
    return events, positions, rejected


def _ack(accepted: int, rejected: Sequence[Rejection], max_bytes: int) -> sidecar_pb2.RecordAck:
    """The ack: the first rejections by position, as many as fit ``max_bytes``.

    Its events are spooled by the time it is built: an ack the server cannot
    send would fail a call whose events go out anyway (and come back as
    duplicates when the sender retries).
    """
    ack = sidecar_pb2.RecordAck(accepted=accepted)
    budget = max_bytes - _ACK_HEADROOM
    for r in sorted(rejected, key=lambda r: r.index)[:MAX_LISTED_REJECTIONS]:
        entry = batch_pb2.Rejection(
            index=r.index,
            prediction_id=r.prediction_id[:_ID_CHARS],
            reason=r.reason[:_REASON_CHARS],
        )
        budget -= entry.ByteSize() + 4  # the field's tag and length prefix
        if budget < 0:
            break
        ack.rejected.append(entry)
    return ack


class GrpcSource:
    """Handlers of ``predtrace.v1.Sidecar``; register with ``generic_handler()``."""

    def __init__(
        self,
        intake: Intake,
        status: Callable[[], sidecar_pb2.SidecarStatus],
        *,
        max_events_per_request: int,
        max_message_bytes: int,
    ) -> None:
        self._intake = intake
        self._status = status
        self._max_events = max_events_per_request
        self._max_ack_bytes = max_message_bytes

    def generic_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        """The service's handlers, taking raw request bytes."""
        serialize = sidecar_pb2.RecordAck.SerializeToString
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "RecordBatch": grpc.unary_unary_rpc_method_handler(
                    self.record_batch, response_serializer=serialize
                ),
                "Record": grpc.stream_unary_rpc_method_handler(
                    self.record, response_serializer=serialize
                ),
                "Status": grpc.unary_unary_rpc_method_handler(
                    self.status, response_serializer=sidecar_pb2.SidecarStatus.SerializeToString
                ),
            },
        )

    async def record_batch(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck]
    ) -> sidecar_pb2.RecordAck:
        """Spool a batch; answer once it is durable."""
        try:
            message = sidecar_pb2.RecordBatchRequest.FromString(request)
        except DecodeError:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "malformed RecordBatchRequest")
        too_many = f"more than {self._max_events} events in one request"
        room = self._max_events - len(message.events)
        if room < 0:
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, too_many)
        converted, positions, rejected = convert_events(message.events)
        events: list[PredictionEvent | object] = list(converted)
        if message.packed_events:
            packed = message.packed_events
            # The message size limit already bounds the bytes; the count is
            # checked from the array header, before any event is built.
            limits = DecodeLimits(max_events=max(room, 1), max_bytes=max(len(packed), 1))
            try:
                # The maps themselves go to the intake: a plain one is never
                # turned into an object (see Intake).
                maps = unpack_event_maps(packed, limits=limits)
            except WireTooLargeError:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, too_many)
            except WireError as exc:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"packed_events: {exc}")
            if len(maps) > room:
                await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, too_many)
            events += maps
            positions += range(len(message.events), len(message.events) + len(maps))
        self._intake.count_refused(len(rejected))  # once the request is known to be readable
        accepted = await self._spool(context, events, positions, rejected)
        ack = _ack(accepted, rejected, self._max_ack_bytes)
        ack.read_packed = bool(message.packed_events)
        return ack

    async def record(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
    ) -> sidecar_pb2.RecordAck:
        """Spool a stream of events in chunks; answer once all of them are durable."""
        accepted, seen = 0, 0
        rejected: list[Rejection] = []
        chunk: list[event_pb2.PredictionEvent] = []
        places: list[int] = []  # each chunk message's position in the stream
        async for raw in requests:
            if seen >= MAX_EVENTS_PER_STREAM:
                await _abort(
                    context,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"more than {MAX_EVENTS_PER_STREAM} events in one stream",
                )
            try:
                chunk.append(event_pb2.PredictionEvent.FromString(raw))
                places.append(seen)
            except DecodeError:
                self._intake.count_refused(1)
                _note(rejected, [Rejection(seen, "malformed PredictionEvent")])
            seen += 1
            if len(chunk) >= _STREAM_CHUNK:
                accepted += await self._spool_chunk(context, chunk, places, rejected)
                chunk, places = [], []
        if chunk:
            accepted += await self._spool_chunk(context, chunk, places, rejected)
        return _ack(accepted, rejected, self._max_ack_bytes)

    async def _spool_chunk(
        self,
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
        chunk: list[event_pb2.PredictionEvent],
        places: list[int],
        rejected: list[Rejection],
    ) -> int:
        events, positions, bad = convert_events(chunk)
        self._intake.count_refused(len(bad))
        _note(rejected, [Rejection(places[r.index], r.reason, r.prediction_id) for r in bad])
        return await self._spool(context, events, [places[p] for p in positions], rejected)

    async def _spool(
        self,
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
        events: Sequence[PredictionEvent | object],
        positions: list[int],
        rejected: list[Rejection],
    ) -> int:
        if not events:
            return 0
        try:
            result = await self._intake.record(events)
        except (SpoolBusyError, SpoolFullError) as exc:
            await _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), pushback=True)
        except SpoolClosedError:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down")
        except SpoolError as exc:
            await _abort(context, grpc.StatusCode.UNAVAILABLE, str(exc), pushback=True)
        _note(
            rejected,
            [Rejection(positions[r.index], r.reason, r.prediction_id) for r in result.rejected],
        )
        return result.accepted

    async def status(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, sidecar_pb2.SidecarStatus]
    ) -> sidecar_pb2.SidecarStatus:
        """The running sidecar's spool depth, lag and counters."""
        return self._status()


async def _abort(
    context: grpc.aio.ServicerContext[_Req, _Resp],
    code: grpc.StatusCode,
    details: str,
    *,
    pushback: bool = False,
) -> NoReturn:
    metadata = (("grpc-retry-pushback-ms", _PUSHBACK_MS),) if pushback else ()
    await context.abort(code, details, trailing_metadata=metadata)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


def _note(rejected: list[Rejection], more: Sequence[Rejection]) -> None:
    """Keep the rejections the ack may list: the first by position, no more than it lists.

    Noted in any order (a request's protobuf events are checked before the
    intake checks the rest), kept in order of position; memory stays bounded.
    """
    rejected.extend(more)
    if len(rejected) > MAX_LISTED_REJECTIONS:
        rejected.sort(key=lambda r: r.index)
        del rejected[MAX_LISTED_REJECTIONS:]

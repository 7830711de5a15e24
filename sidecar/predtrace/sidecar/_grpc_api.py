"""The sidecar's own gRPC API (``predtrace.v1.Sidecar``): a source of the pipeline.

**GrpcSource** -> intake -> spool. Requests are parsed by ``_grpc_requests``
(not by gRPC's deserializer) so malformed bytes get INVALID_ARGUMENT with a
reason instead of an internal error. ``RecordBatch`` and ``Record`` answer
only once every accepted event is durable in the spool. Spool pressure maps
to RESOURCE_EXHAUSTED with a retry pushback; shutdown to UNAVAILABLE.

Here: the service, ``RecordBatch`` and ``Status``. The parts: ``Record``
streams, spooled in chunks within a held-bytes budget (``_grpc_streams``),
and the acks and refusals both calls answer with (``_grpc_answers``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Final, NoReturn

import grpc

from predtrace.sidecar._grpc_answers import (
    MAX_LISTED_REJECTIONS,
    RefusedError,
    ack,
    convert_events,
    fail_call,
    spool_events,
)
from predtrace.sidecar._grpc_requests import Batch, read_batch
from predtrace.sidecar._grpc_streams import (
    ACCEPTED_KEY,
    PROCESSED_KEY,
    STREAM_CHUNK_BYTES,
    RecordStreams,
)
from predtrace.sidecar._intake import EventItems, Intake, RefusedReason
from predtrace.sidecar._protowire import ProtoWireError
from predtrace.sidecar._recent_batches import (
    MAX_BATCH_ID_BYTES,
    BatchIdReusedError,
    RecentBatches,
)
from predtrace.v1 import sidecar_pb2
from predtrace.wire import (
    DecodeLimits,
    PackedEvents,
    PredictionEvent,
    Rejection,
    WireError,
    WireTooLargeError,
    open_packed_events,
)

# Imported from here, wherever they are defined.
__all__ = [
    "ACCEPTED_KEY",
    "MAX_LISTED_REJECTIONS",
    "PROCESSED_KEY",
    "SERVICE_NAME",
    "STREAM_CHUNK_BYTES",
    "GrpcSource",
    "convert_events",
]

_log = logging.getLogger("predtrace.sidecar.grpc")
SERVICE_NAME: Final = "predtrace.v1.Sidecar"


class GrpcSource:
    """Handlers of ``predtrace.v1.Sidecar``; register with ``generic_handler()``."""

    def __init__(
        self,
        intake: Intake,
        status: Callable[[], sidecar_pb2.SidecarStatus],
        *,
        max_events_per_request: int,
        max_message_bytes: int,
        chunk_bytes: int = STREAM_CHUNK_BYTES,
    ) -> None:
        """``chunk_bytes``: a ``Record`` stream's chunk is spooled once its messages reach it."""
        self._intake = intake
        self._status = status
        self._max_events = max_events_per_request
        self._max_ack_bytes = max_message_bytes
        self._recent: RecentBatches[sidecar_pb2.RecordAck] = RecentBatches(
            sidecar_pb2.RecordAck.ByteSize
        )
        self._streams = RecordStreams(
            intake, chunk_bytes=chunk_bytes, max_ack_bytes=max_message_bytes
        )

    @property
    def held_bytes(self) -> int:
        """Message bytes of open ``Record`` streams' chunks not yet handed to the spool."""
        return self._streams.held_bytes

    def answer_draining(self) -> None:
        """The sidecar stops: ``Record`` streams it failed are answered at once."""
        self._streams.answer_draining()

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
            return await self._record_batch(request)
        except RefusedError as refusal:
            code, details, pushback = refusal.code, refusal.details, refusal.pushback
        # Out of the except block: the refusal's traceback (the frames holding
        # the request) is gone before the call ends (see ``fail_call``).
        fail_call(context, code, details, pushback=pushback)
        return sidecar_pb2.RecordAck()  # not sent: the status is the answer

    async def _record_batch(self, request: bytes) -> sidecar_pb2.RecordAck:
        """Spool a batch; the ack, once it is durable.

        Raises:
            RefusedError: the request is refused whole (malformed, too many
                events, a reused batch id) or the spool refused it.
        """
        try:
            batch = read_batch(request)
        except ProtoWireError as exc:
            self._refuse("malformed", f"malformed RecordBatchRequest: {exc}")
        too_many = f"more than {self._max_events} events in one request"
        room = self._max_events - batch.count
        if room < 0:
            self._refuse("too_many_events", too_many)
        converted, positions, rejected = _convert_batch(batch)
        events: EventItems = converted
        if batch.packed:
            packed = self._unpack(batch.packed, room, too_many)
            events = _Joined(converted, packed) if converted else packed
            positions += range(batch.count, batch.count + len(packed))
        read_packed = bool(batch.packed)

        async def spool() -> sidecar_pb2.RecordAck:
            self._intake.count_refused(len(rejected))  # once the request is known to be readable
            accepted = await spool_events(self._intake, events, positions, rejected)
            answer = ack(accepted, rejected, self._max_ack_bytes)
            answer.read_packed = read_packed
            return answer

        if not batch.batch_id:
            return await spool()
        return await self._spool_once(batch.batch_id, request, spool)

    async def _spool_once(
        self,
        batch_id: bytes,
        request: bytes,
        spool: Callable[[], Awaitable[sidecar_pb2.RecordAck]],
    ) -> sidecar_pb2.RecordAck:
        """``spool``, once per batch id (see ``_recent_batches``); a retry gets its answer."""
        if len(batch_id) > MAX_BATCH_ID_BYTES:
            self._refuse("bad_batch_id", f"batch_id longer than {MAX_BATCH_ID_BYTES} bytes")
        try:
            kept, duplicate = await self._recent.spool_once(batch_id, request, spool)
        except BatchIdReusedError as exc:
            self._refuse("bad_batch_id", str(exc))
        if not duplicate:
            return kept
        self._intake.counters.duplicate_batches += 1
        answer = sidecar_pb2.RecordAck()
        answer.CopyFrom(kept)  # the kept answer stays as it was
        answer.duplicate = True
        return answer

    def _unpack(self, packed: bytes, room: int, too_many: str) -> PackedEvents:
        # The message size limit already bounds the bytes; the count is
        # checked from the array header, and the layout by a pass that builds
        # nothing. The intake builds the maps one at a time (a plain one is
        # never turned into an object): a request never holds all of them.
        limits = DecodeLimits(max_events=max(room, 1), max_bytes=max(len(packed), 1))
        try:
            events = open_packed_events(packed, limits)
        except WireTooLargeError:
            self._refuse("too_many_events", too_many)
        except WireError as exc:
            self._refuse("bad_packed_events", f"packed_events: {exc}")
        if len(events) > room:
            self._refuse("too_many_events", too_many)
        return events

    def _refuse(self, reason: RefusedReason, details: str) -> NoReturn:
        """Refuse a whole request, counted by reason.

        Raises:
            RefusedError: INVALID_ARGUMENT, always.
        """
        self._intake.count_refused_request(reason)
        raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, details)

    async def record(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
    ) -> sidecar_pb2.RecordAck:
        """Spool a stream of events in chunks; answer once all of them are durable."""
        return await self._streams.record(requests, context)

    async def status(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, sidecar_pb2.SidecarStatus]
    ) -> sidecar_pb2.SidecarStatus:
        """The running sidecar's spool depth, lag and counters."""
        return self._status()


class _Joined:
    """A request's protobuf events, then its packed ones (read as the intake goes)."""

    __slots__ = ("_first", "_then")

    def __init__(self, first: list[PredictionEvent | object], then: PackedEvents) -> None:
        self._first, self._then = first, then

    def __len__(self) -> int:
        return len(self._first) + len(self._then)

    def __iter__(self) -> Iterator[PredictionEvent | object]:
        return itertools.chain(self._first, self._then)


def _convert_batch(
    batch: Batch,
) -> tuple[list[PredictionEvent | object], list[int], list[Rejection]]:
    """``convert_events`` of a batch, with positions in the request (unreadable events too)."""
    converted, positions, rejected = convert_events(batch.events)
    if batch.places is not None:
        places = batch.places
        positions = [places[p] for p in positions]
        rejected = [Rejection(places[r.index], r.reason, r.prediction_id) for r in rejected]
        rejected += batch.unreadable
    return list(converted), positions, rejected

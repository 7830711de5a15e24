"""The sidecar's own gRPC API (``predtrace.v1.Sidecar``): a source of the pipeline.

**GrpcSource** -> intake -> spool. Requests are parsed by ``_grpc_requests``
(not by gRPC's deserializer) so malformed bytes get INVALID_ARGUMENT with a
reason instead of an internal error. ``RecordBatch`` and ``Record`` answer
only once every accepted event is durable in the spool. Spool pressure maps
to RESOURCE_EXHAUSTED with a retry pushback; shutdown to UNAVAILABLE.

A ``Record`` stream is spooled in chunks as it arrives, so that one stream
holds a bounded number of bytes, and all open streams together at most
``STREAMS_HELD_BYTES`` (past it, the stream a message would take over spools
its chunk early); a chunk is spooled at most ``STREAM_LINGER_S`` after its
first message, while its stream stays open (a paused producer's events are
not held unseen). A stream
the sidecar fails part way has spooled the chunks before: its trailing
metadata says how many events (``predtrace-accepted``) and how many leading
messages (``predtrace-processed``). It answers once its client has sent all
it meant to (the rest is read and dropped, for at most ``STREAM_DRAIN_S``):
a grpc.aio client still writing when the answer comes reports INTERNAL
"Internal error from Core" instead, and loses that metadata.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, NoReturn, TypeVar

import grpc

from predtrace.sidecar._errors import SpoolBusyError, SpoolClosedError, SpoolError, SpoolFullError
from predtrace.sidecar._grpc_requests import ID_CHARS, Batch, parse_event, raw_id, read_batch
from predtrace.sidecar._intake import EventItems, Intake, RefusedReason
from predtrace.sidecar._protowire import ProtoWireError
from predtrace.sidecar._recent_batches import (
    MAX_BATCH_ID_BYTES,
    BatchIdReusedError,
    RecentBatches,
)
from predtrace.v1 import batch_pb2, event_pb2, sidecar_pb2
from predtrace.wire import (
    DecodeLimits,
    PackedEvents,
    PredictionEvent,
    Rejection,
    WireError,
    WireTooLargeError,
    event_from_proto,
    open_packed_events,
)

_log = logging.getLogger("predtrace.sidecar.grpc")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
SERVICE_NAME: Final = "predtrace.v1.Sidecar"
MAX_EVENTS_PER_STREAM: Final = 1_000_000
_STREAM_CHUNK: Final = 1000
# A stream's chunk holds at most this many bytes of messages (or one message
# alone, of --max-message-bytes at most), not 1,000 messages of any size: the
# chunk goes to the spool before a message that would take it past this.
STREAM_CHUNK_BYTES: Final = 1024 * 1024
# All open streams' chunks together hold at most this many message bytes: the
# stream whose message would pass it spools its chunk at once (nothing is
# refused for it). Parsed, a chunk takes some 2-3 times its message bytes.
STREAMS_HELD_BYTES: Final = 8 * 1024 * 1024
# A chunk is spooled at most this long after its first message came, while its
# stream stays open: a producer that pauses has its events made durable and shipped.
STREAM_LINGER_S: Final = 0.2
# Trailing metadata of a Record stream the sidecar fails: events of it spooled,
# and leading messages done with (each spooled or rejected).
ACCEPTED_KEY: Final = "predtrace-accepted"
PROCESSED_KEY: Final = "predtrace-processed"
_PUSHBACK_MS: Final = "1000"
# A Record stream the sidecar fails reads (and drops) what its client still
# sends, for at most this long, before it answers. gRPC's asyncio client turns
# a server's answer that comes while it is still writing into INTERNAL
# "Internal error from Core", trailing metadata lost (grpc/grpc issue 36066):
# its sender could neither tell a refusal from a fault nor skip what was spooled.
STREAM_DRAIN_S: Final = 5.0
# An ack lists at most this many rejections (the first ones by position), and
# fewer when they would not fit the message size limit; the sender counts the
# rest as sent - accepted - listed.
MAX_LISTED_REJECTIONS: Final = 1000
# A listed rejection echoes at most this much of its reason (of its id: ID_CHARS).
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
            prediction_id=r.prediction_id[:ID_CHARS],
            reason=r.reason[:_REASON_CHARS],
        )
        budget -= entry.ByteSize() + 4  # the field's tag and length prefix
        if budget < 0:
            break
        ack.rejected.append(entry)
    return ack


class _RefusedError(Exception):
    """A call the handler fails itself: the status to answer with."""

    def __init__(self, code: grpc.StatusCode, details: str, *, pushback: bool = False) -> None:
        super().__init__(details)
        self.code, self.details, self.pushback = code, details, pushback


@dataclass(slots=True, eq=False)
class _Stream:
    """One ``Record`` call: what is spooled, and the chunk not yet checked."""

    accepted: int = 0
    seen: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    chunk: list[event_pb2.PredictionEvent] = field(default_factory=list)
    places: list[int] = field(default_factory=list)  # each chunk message's stream position
    chunk_bytes: int = 0  # of the chunk's messages, while held (0 once handed to the spool)
    # The lingering chunk's spooling, while the handler waits for a message:
    # the refusal it met, if any.
    lingering: asyncio.Task[_RefusedError | None] | None = None

    def full(self, max_bytes: int) -> bool:
        """Whether the chunk is to be spooled now (by count or by bytes)."""
        return len(self.chunk) >= _STREAM_CHUNK or self.chunk_bytes >= max_bytes

    def processed(self) -> int:
        """Leading messages done with: each spooled or rejected (none of the chunk)."""
        return self.places[0] if self.chunk else self.seen


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
        self._chunk_bytes = chunk_bytes
        self._status = status
        self._max_events = max_events_per_request
        self._max_ack_bytes = max_message_bytes
        self._recent: RecentBatches[sidecar_pb2.RecordAck] = RecentBatches(
            sidecar_pb2.RecordAck.ByteSize
        )
        self.held_bytes = 0
        """Message bytes of open ``Record`` streams' chunks not yet handed to the spool."""
        self._held_limit = STREAMS_HELD_BYTES
        # Streams with a chunk held, by when its first message came (oldest first).
        self._waiting: dict[_Stream, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._lingering: set[asyncio.Task[_RefusedError | None]] = set()  # strong references

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
            batch = read_batch(request)
        except ProtoWireError as exc:
            await self._refuse(context, "malformed", f"malformed RecordBatchRequest: {exc}")
        too_many = f"more than {self._max_events} events in one request"
        room = self._max_events - batch.count
        if room < 0:
            await self._refuse(context, "too_many_events", too_many)
        converted, positions, rejected = _convert_batch(batch)
        events: EventItems = converted
        if batch.packed:
            packed = await self._unpack(context, batch.packed, room, too_many)
            events = _Joined(converted, packed) if converted else packed
            positions += range(batch.count, batch.count + len(packed))
        read_packed = bool(batch.packed)

        async def spool() -> sidecar_pb2.RecordAck:
            self._intake.count_refused(len(rejected))  # once the request is known to be readable
            accepted = await self._spool(events, positions, rejected)
            ack = _ack(accepted, rejected, self._max_ack_bytes)
            ack.read_packed = read_packed
            return ack

        try:
            if not batch.batch_id:
                return await spool()
            return await self._spool_once(context, batch.batch_id, request, spool)
        except _RefusedError as refusal:
            await _abort(context, refusal.code, refusal.details, pushback=refusal.pushback)

    async def _spool_once(
        self,
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
        batch_id: bytes,
        request: bytes,
        spool: Callable[[], Awaitable[sidecar_pb2.RecordAck]],
    ) -> sidecar_pb2.RecordAck:
        """``spool``, once per batch id (see ``_recent_batches``); a retry gets its answer."""
        if len(batch_id) > MAX_BATCH_ID_BYTES:
            await self._refuse(
                context, "bad_batch_id", f"batch_id longer than {MAX_BATCH_ID_BYTES} bytes"
            )
        try:
            ack, duplicate = await self._recent.spool_once(batch_id, request, spool)
        except BatchIdReusedError as exc:
            await self._refuse(context, "bad_batch_id", str(exc))
        if not duplicate:
            return ack
        self._intake.counters.duplicate_batches += 1
        answer = sidecar_pb2.RecordAck()
        answer.CopyFrom(ack)  # the kept answer stays as it was
        answer.duplicate = True
        return answer

    async def _unpack(
        self,
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
        packed: bytes,
        room: int,
        too_many: str,
    ) -> PackedEvents:
        # The message size limit already bounds the bytes; the count is
        # checked from the array header, and the layout by a pass that builds
        # nothing. The intake builds the maps one at a time (a plain one is
        # never turned into an object): a request never holds all of them.
        limits = DecodeLimits(max_events=max(room, 1), max_bytes=max(len(packed), 1))
        try:
            events = open_packed_events(packed, limits)
        except WireTooLargeError:
            await self._refuse(context, "too_many_events", too_many)
        except WireError as exc:
            await self._refuse(context, "bad_packed_events", f"packed_events: {exc}")
        if len(events) > room:
            await self._refuse(context, "too_many_events", too_many)
        return events

    async def _refuse(
        self,
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
        reason: RefusedReason,
        details: str,
    ) -> NoReturn:
        """Refuse a whole request, counted by reason."""
        self._intake.count_refused_request(reason)
        await _abort(context, grpc.StatusCode.INVALID_ARGUMENT, details)

    async def record(
        self,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
    ) -> sidecar_pb2.RecordAck:
        """Spool a stream of events in chunks; answer once all of them are durable."""
        stream = _Stream()
        try:
            try:
                await self._read_stream(requests, stream)
            except _RefusedError as refusal:
                self._forget(stream)  # what it held is dropped: nothing to wait for
                await _drain(requests)
                await _abort_stream(context, stream, refusal)
            return _ack(stream.accepted, stream.rejected, self._max_ack_bytes)
        finally:
            self._forget(stream)

    async def _read_stream(self, requests: AsyncIterator[bytes], stream: _Stream) -> None:
        """Spool a stream in chunks, up to its end.

        Raises:
            _RefusedError: the stream fails there (what went before is spooled).
        """
        async for raw in requests:
            if stream.lingering is not None:
                await self._settle(stream)
            if stream.seen >= MAX_EVENTS_PER_STREAM:
                self._intake.count_refused_request("too_many_events")
                too_many = f"more than {MAX_EVENTS_PER_STREAM} events in one stream"
                raise _RefusedError(grpc.StatusCode.INVALID_ARGUMENT, too_many)
            if stream.chunk and stream.chunk_bytes + len(raw) > self._chunk_bytes:
                # It would take the chunk past its bound: the chunk goes
                # first. A chunk is within the bound or one event alone,
                # which the spool takes even when a segment is all it has.
                await self._flush(stream)
            # Its size is judged after redaction, by the intake, as in
            # RecordBatch: dropped attributes may bring it under the record
            # limit.
            self._take(stream, raw)
            stream.seen += 1
            # The stream's last allowed chunk waits for the stream's end: one
            # more message fails the call, and then it must not be spooled.
            if stream.seen < MAX_EVENTS_PER_STREAM and (
                stream.full(self._chunk_bytes) or self.held_bytes > self._held_limit
            ):
                await self._flush(stream)
        if stream.lingering is not None:
            await self._settle(stream)
        await self._flush(stream)

    def _take(self, stream: _Stream, raw: bytes) -> None:
        parsed = parse_event(raw)
        if isinstance(parsed, str):
            self._reject_unread(stream, raw, parsed)
            return
        if not stream.chunk:
            self._wait_for_more(stream)
        stream.chunk.append(parsed)
        stream.places.append(stream.seen)
        stream.chunk_bytes += len(raw)
        self.held_bytes += len(raw)

    def _reject_unread(self, stream: _Stream, raw: bytes, reason: str) -> None:
        self._intake.count_refused(1)
        _note(stream.rejected, [Rejection(stream.seen, reason, raw_id(raw, reason))])

    async def _flush(self, stream: _Stream) -> None:
        """Spool the stream's chunk, if any.

        Raises:
            _RefusedError: as ``_spool``.
        """
        if stream.chunk:
            await self._spool_stream(stream)

    async def _spool_stream(self, stream: _Stream) -> None:
        """Spool the stream's chunk; a chunk the spool refuses stays (``processed`` leaves it out).

        Raises:
            _RefusedError: as ``_spool``.
        """
        self._release(stream)  # the spool bounds what it is handed
        stream.accepted += await self._spool_chunk(stream.chunk, stream.places, stream.rejected)
        stream.chunk, stream.places = [], []

    def _release(self, stream: _Stream) -> None:
        """The stream's chunk no longer counts as held (handed to the spool, or the call ended)."""
        self.held_bytes -= stream.chunk_bytes
        stream.chunk_bytes = 0
        self._waiting.pop(stream, None)

    def _forget(self, stream: _Stream) -> None:
        """The call ended (answered, failed or cancelled): nothing of it is held any more."""
        self._release(stream)
        if not self._waiting and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # -- chunks that wait for their next message ----------------------------------------

    def _wait_for_more(self, stream: _Stream) -> None:
        """The stream's chunk starts now: the sweeper spools it if still held at its linger."""
        self._waiting[stream] = asyncio.get_running_loop().time()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="predtrace-stream-linger")

    async def _sweep(self) -> None:
        """Spool each chunk that waited ``STREAM_LINGER_S``, oldest first; ends when none waits.

        One task for all streams (not a timer per stream), asleep until the
        oldest chunk's linger. A chunk in ``_waiting`` is one its handler is
        not spooling (it takes the chunk off first): the handler waits for
        the next message, and awaits this spooling (``_settle``) before it
        takes that message. A read is never cancelled for this (a grpc.aio
        read cancelled ends the call's request iterator).
        """
        loop = asyncio.get_running_loop()
        while self._waiting:
            stream, since = next(iter(self._waiting.items()))
            left = since + STREAM_LINGER_S - loop.time()
            if left > 0:
                await asyncio.sleep(left)
                continue
            del self._waiting[stream]
            # The last allowed chunk waits for the stream's end (see ``record``).
            if stream.lingering is None and stream.seen < MAX_EVENTS_PER_STREAM:
                task = asyncio.create_task(self._spool_lingering(stream))
                self._lingering.add(task)
                task.add_done_callback(self._lingering.discard)
                stream.lingering = task
        self._sweeper = None

    async def _spool_lingering(self, stream: _Stream) -> _RefusedError | None:
        try:
            await self._spool_stream(stream)
        except _RefusedError as refusal:
            return refusal
        return None

    async def _settle(self, stream: _Stream) -> None:
        """Wait for the sweeper's spooling of the stream's chunk.

        Raises:
            _RefusedError: the spool refused that chunk.
        """
        assert stream.lingering is not None  # noqa: S101 - checked by the caller
        # Shielded: a call cancelled meanwhile must not cut a spool write short.
        refusal = await asyncio.shield(stream.lingering)
        stream.lingering = None
        if refusal is not None:
            raise refusal

    async def _spool_chunk(
        self,
        chunk: list[event_pb2.PredictionEvent],
        places: list[int],
        rejected: list[Rejection],
    ) -> int:
        events, positions, bad = convert_events(chunk)
        self._intake.count_refused(len(bad))
        _note(rejected, [Rejection(places[r.index], r.reason, r.prediction_id) for r in bad])
        return await self._spool(events, [places[p] for p in positions], rejected)

    async def _spool(
        self,
        events: EventItems,
        positions: list[int],
        rejected: list[Rejection],
    ) -> int:
        """Hand ``events`` to the intake; the number spooled.

        Raises:
            _RefusedError: the spool refused them: none of them spooled, unless
                they were more than a spool segment holds and the disk filled
                part way (the parts written stay: sent again, they are
                delivered twice, never lost).
        """
        if not events:
            return 0
        try:
            result = await self._intake.record(events)
        except (SpoolBusyError, SpoolFullError) as exc:
            raise _RefusedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), pushback=True
            ) from None
        except SpoolClosedError:
            raise _RefusedError(
                grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down"
            ) from None
        except SpoolError as exc:
            raise _RefusedError(grpc.StatusCode.UNAVAILABLE, str(exc), pushback=True) from None
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


async def _drain(requests: AsyncIterator[bytes]) -> None:
    """Read and drop what a failed stream's sender still sends, to its end or STREAM_DRAIN_S."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(STREAM_DRAIN_S):
            async for _ in requests:
                pass


async def _abort_stream(
    context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
    stream: _Stream,
    refusal: _RefusedError,
) -> NoReturn:
    """Fail a ``Record`` call, saying what of it is spooled already (not to be sent again)."""
    done = stream.processed()
    details = (
        f"{refusal.details}; {stream.accepted} events of this stream are already spooled, "
        f"from its first {done} messages (trailing metadata {ACCEPTED_KEY}, {PROCESSED_KEY})"
    )
    spooled = ((ACCEPTED_KEY, str(stream.accepted)), (PROCESSED_KEY, str(done)))
    await _abort(context, refusal.code, details, pushback=refusal.pushback, metadata=spooled)


async def _abort(
    context: grpc.aio.ServicerContext[_Req, _Resp],
    code: grpc.StatusCode,
    details: str,
    *,
    pushback: bool = False,
    metadata: tuple[tuple[str, str], ...] = (),
) -> NoReturn:
    if pushback:
        metadata += (("grpc-retry-pushback-ms", _PUSHBACK_MS),)
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

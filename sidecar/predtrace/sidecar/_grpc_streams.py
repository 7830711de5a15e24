"""``Record`` streams of the sidecar's gRPC API: spooled in chunks as they arrive.

GrpcSource (``_grpc_api``) -> **RecordStreams** -> intake -> spool. A
``Record`` stream is spooled in chunks as it arrives, so that one stream
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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Final

import grpc

from predtrace.sidecar._grpc_answers import (
    RefusedError,
    ack,
    convert_events,
    fail_call,
    note,
    spool_events,
)
from predtrace.sidecar._grpc_requests import parse_event, raw_id
from predtrace.sidecar._intake import Intake
from predtrace.v1 import event_pb2, sidecar_pb2
from predtrace.wire import Rejection

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
# A Record stream the sidecar fails reads (and drops) what its client still
# sends, for at most this long, before it answers. gRPC's asyncio client turns
# a server's answer that comes while it is still writing into INTERNAL
# "Internal error from Core", trailing metadata lost (grpc/grpc issue 36066):
# its sender could neither tell a refusal from a fault nor skip what was spooled.
STREAM_DRAIN_S: Final = 5.0


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
    lingering: asyncio.Task[RefusedError | None] | None = None

    def full(self, max_bytes: int) -> bool:
        """Whether the chunk is to be spooled now (by count or by bytes)."""
        return len(self.chunk) >= _STREAM_CHUNK or self.chunk_bytes >= max_bytes

    def processed(self) -> int:
        """Leading messages done with: each spooled or rejected (none of the chunk)."""
        return self.places[0] if self.chunk else self.seen

    def drop_chunk(self) -> None:
        """Let go of a refused chunk (its messages stay unprocessed: to be sent again)."""
        self.seen = self.processed()
        self.chunk, self.places = [], []


class RecordStreams:
    """The ``Record`` handler: every open stream's chunk, their held bytes and the linger."""

    def __init__(self, intake: Intake, *, chunk_bytes: int, max_ack_bytes: int) -> None:
        """``chunk_bytes``: a stream's chunk is spooled once its messages reach it."""
        self._intake = intake
        self._chunk_bytes = chunk_bytes
        self._max_ack_bytes = max_ack_bytes
        self.held_bytes = 0
        """Message bytes of open ``Record`` streams' chunks not yet handed to the spool."""
        self._held_limit = STREAMS_HELD_BYTES
        # Streams with a chunk held, by when its first message came (oldest first).
        self._waiting: dict[_Stream, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._lingering: set[asyncio.Task[RefusedError | None]] = set()  # strong references
        # The drains of failed streams, cut short when the sidecar stops: a
        # stream must get its answer (and counts) before the server cancels it.
        self._drains: set[asyncio.Timeout] = set()
        self._stopping = False

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
                return ack(stream.accepted, stream.rejected, self._max_ack_bytes)
            except RefusedError as refusal:
                failed = refusal.code, refusal.details, refusal.pushback
            # Out of the except block: the refusal's traceback (the frames
            # holding the last message) is gone before the drain (see ``fail_call``).
            self._forget(stream)
            stream.drop_chunk()  # not held (outside the budget) while the rest is read
            await self._drain(requests)
            _fail_stream(context, stream, *failed)
            return sidecar_pb2.RecordAck()  # not sent: the status is the answer
        finally:
            self._forget(stream)

    async def _read_stream(self, requests: AsyncIterator[bytes], stream: _Stream) -> None:
        """Spool a stream in chunks, up to its end.

        Raises:
            RefusedError: the stream fails there (what went before is spooled).
        """
        async for raw in requests:
            if stream.lingering is not None:
                await self._settle(stream)
            if stream.seen >= MAX_EVENTS_PER_STREAM:
                self._intake.count_refused_request("too_many_events")
                too_many = f"more than {MAX_EVENTS_PER_STREAM} events in one stream"
                raise RefusedError(grpc.StatusCode.INVALID_ARGUMENT, too_many)
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
        note(stream.rejected, [Rejection(stream.seen, reason, raw_id(raw, reason))])

    async def _flush(self, stream: _Stream) -> None:
        """Spool the stream's chunk, if any.

        Raises:
            RefusedError: as ``spool_events``.
        """
        if stream.chunk:
            await self._spool_stream(stream)

    async def _spool_stream(self, stream: _Stream) -> None:
        """Spool the stream's chunk; a chunk the spool refuses stays (``processed`` leaves it out).

        Raises:
            RefusedError: as ``spool_events``.
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

    async def _spool_lingering(self, stream: _Stream) -> RefusedError | None:
        try:
            await self._spool_stream(stream)
        except RefusedError as refusal:
            # Its producer may pause for long before the message that learns
            # of the refusal: the chunk is not kept (outside the budget) meanwhile.
            stream.drop_chunk()
            return refusal
        return None

    async def _drain(self, requests: AsyncIterator[bytes]) -> None:
        """Read and drop what a failed stream's sender still sends.

        Up to the stream's end, for at most ``STREAM_DRAIN_S``, and not past
        the sidecar's stop (``answer_draining``).
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0 if self._stopping else STREAM_DRAIN_S) as drain:
                self._drains.add(drain)
                try:
                    async for _ in requests:
                        pass
                finally:
                    self._drains.discard(drain)

    def answer_draining(self) -> None:
        """The sidecar stops: failed streams get their answer now, not after their drain."""
        self._stopping = True
        now = asyncio.get_running_loop().time()
        for drain in self._drains:
            drain.reschedule(now)

    async def _settle(self, stream: _Stream) -> None:
        """Wait for the sweeper's spooling of the stream's chunk.

        Raises:
            RefusedError: the spool refused that chunk.
        """
        assert stream.lingering is not None  # noqa: S101 - checked by the caller
        # Shielded: a call cancelled meanwhile must not cut a spool write short.
        refusal = await asyncio.shield(stream.lingering)
        stream.lingering = None
        if refusal is not None:
            try:
                raise refusal
            finally:
                # The exception's traceback holds this frame: a local still
                # naming it would close a cycle (the message just read in it).
                del refusal

    async def _spool_chunk(
        self,
        chunk: list[event_pb2.PredictionEvent],
        places: list[int],
        rejected: list[Rejection],
    ) -> int:
        events, positions, bad = convert_events(chunk)
        self._intake.count_refused(len(bad))
        note(rejected, [Rejection(places[r.index], r.reason, r.prediction_id) for r in bad])
        return await spool_events(self._intake, events, [places[p] for p in positions], rejected)


def _fail_stream(
    context: grpc.aio.ServicerContext[bytes, sidecar_pb2.RecordAck],
    stream: _Stream,
    code: grpc.StatusCode,
    reason: str,
    pushback: bool,
) -> None:
    """Fail a ``Record`` call, saying what of it is spooled already (not to be sent again)."""
    done = stream.processed()
    details = (
        f"{reason}; {stream.accepted} events of this stream are already spooled, "
        f"from its first {done} messages (trailing metadata {ACCEPTED_KEY}, {PROCESSED_KEY})"
    )
    spooled = ((ACCEPTED_KEY, str(stream.accepted)), (PROCESSED_KEY, str(done)))
    fail_call(context, code, details, pushback=pushback, metadata=spooled)

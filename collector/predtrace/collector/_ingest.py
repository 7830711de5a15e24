"""Ingest: ``POST /v1/batches`` -> bounded read -> header -> decode -> store commit -> ack.

The delivery contract (DESIGN §4): the body is read with a hard cap (413) and
only while the in-flight byte budget allows (else 503 + Retry-After); a gzip'd
body's decompressed bytes are charged to that budget too, and only a few
batches are decoded at once; the batch's header is read (and its producer_id
checked against the token: 403) before one event is built, then the events one
at a time, each turned into its row, with what that decode may cost charged
to the budget first; the decoder is bounded (400 with a reason, 413 for
bombs); a client that hangs up mid-body is let go without a log line (it is
counted); a batch is acknowledged only after the store committed it;
(producer_id, seq) is idempotent (the same bytes again are a duplicate; other
bytes under a stored seq are a 409); bad events are rejected alone; store
failures answer 503, never 200 and never 500. A stopping collector ends an
upload whose body is still arriving with 503 (``_stopping``): nothing of it was
acknowledged; a batch whose body arrived is committed and acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from prometheus_client import Gauge

from predtrace.collector._auth import Scope, TokenEntry
from predtrace.collector._errors import StoreError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._security import Authorizer, AuthRefusal
from predtrace.collector._stopping import ShuttingDownError, reading
from predtrace.collector.store import (
    IngestRecord,
    Store,
    event_problem,
    fast_prediction_row,
    prediction_row,
)
from predtrace.collector.store._ops import Row
from predtrace.wire import (
    BatchHeader,
    DecodeLimits,
    IngestAck,
    Rejection,
    WireError,
    WireTooLargeError,
    batch_digest,
    encode_ack,
    event_from_map,
    event_rejection,
    gunzip_bounded,
    read_batch_events,
    read_batch_header,
)
from predtrace.wire._codec import GZIP_MAGIC

log = logging.getLogger("predtrace.collector.ingest")
BATCH_CONTENT_TYPE: Final = "application/vnd.predtrace.batch+msgpack"
_CHUNK: Final = 64 * 1024
# A body that has not fully arrived by then is refused (408): a client that
# stalls mid-upload must not hold its share of the in-flight budget for ever.
BODY_TIMEOUT_S: Final = 30.0
# A plain (not gzip'd) body up to this size is decoded on the event loop: its
# decode costs about its size, less than a round trip through a thread.
_INLINE_DECODE_MAX: Final = 64 * 1024
# Batches decoded at once. A decode costs more than its batch's bytes (its
# rows, one event's objects; charged to the budget, see ``decode_cost``) and
# CPU: this bounds both whatever the thread pool's size (two keep a small
# host busy).
DECODES_AT_ONCE: Final = 2
# What a decode keeps until its batch is stored, beyond its payload: its rows
# (``decode_cost``). Measured with tracemalloc (test_ingest_limits.py): some
# 350 bytes a row plus about 3 per byte of realistic events (bench/codec.py's:
# 1,550 bytes a row of 404 on the wire); short texts cost more per byte but
# stay within the per-row part. Text kept as JSON with escapes (control
# characters) can cost up to 6 per byte: such a batch may hold up to half as
# much again as it is charged, which bounds it still.
ROW_BYTES: Final = 1024
ROW_BYTES_PER_PAYLOAD_BYTE: Final = 4
_ENCODINGS: Final = ("", "identity", "gzip", "x-gzip")


class InflightBudget:
    """Bytes of request bodies, and of their decompressed forms, being ingested now, capped.

    Also the budget of query answers (a budget of their own, see ``_answers``).
    ``gauge``, if any, shows ``used``. Event-loop only.
    """

    def __init__(self, cap: int, gauge: Gauge | None = None) -> None:
        self.cap = cap
        self.used = 0
        self._gauge = gauge

    def try_reserve(self, count: int) -> bool:
        """Reserve ``count`` bytes; False when that would pass the cap."""
        if self.used + count > self.cap:
            return False
        self.used += count
        if self._gauge is not None:
            self._gauge.set(self.used)
        return True

    def release(self, count: int) -> None:
        """Give back reserved bytes."""
        self.used -= count
        if self._gauge is not None:
            self._gauge.set(self.used)


class _Reservation:
    """One request's share of the budget: grows as its body arrives, released once."""

    __slots__ = ("amount", "budget", "refusal")

    def __init__(
        self, budget: InflightBudget, refusal: str = "collector busy: in-flight byte cap reached"
    ) -> None:
        self.budget, self.amount, self.refusal = budget, 0, refusal

    def grow_to(self, total: int) -> None:
        """Hold ``total`` bytes; 503 when the budget cannot give the difference."""
        if total > self.amount:
            if not self.budget.try_reserve(total - self.amount):
                raise _Refused(503, self.refusal, "overloaded")
            self.amount = total

    def release(self) -> None:
        """Give everything back (safe twice)."""
        if self.amount:
            self.budget.release(self.amount)
            self.amount = 0


class DecodeSlots:
    """At most ``size`` batches decoded at once; the others wait (event-loop only)."""

    def __init__(self, size: int = DECODES_AT_ONCE) -> None:
        self._free = asyncio.Semaphore(size)
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body of an ``async with``."""
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._free.release()


class _Refused(Exception):
    """An answer other than 200, with its short reason (internal control flow)."""

    def __init__(self, status: int, reason: str, outcome: str) -> None:
        super().__init__(reason)
        self.status, self.reason, self.outcome = status, reason, outcome


async def read_body(
    request: web.Request,
    reservation: _Reservation,
    *,
    cap: int,
    timeout_s: float,
    name: str,
    unsaved: str,
) -> bytes:
    """The request's body, ``cap`` bytes at most, each chunk charged to ``reservation``.

    Reserved as it arrives, never the declared length up front: a stalled
    upload holds only the bytes it sent. ``name`` names the body in a
    refusal ("body", "lineage body"); ``unsaved`` says what a stopping
    collector did not do with it ("batch not stored").

    Raises:
        _Refused: 413 past ``cap``, 408 not all received within ``timeout_s``,
            503 the budget is spent or the collector is stopping.
        ConnectionResetError: the client hung up mid-body.
    """
    chunks: list[bytes] = []
    total = 0
    try:
        with reading(request):
            async with asyncio.timeout(timeout_s):
                async for chunk in request.content.iter_chunked(_CHUNK):
                    total += len(chunk)
                    if total > cap:
                        raise _Refused(413, f"{name} exceeds {cap} bytes", "too_large")
                    reservation.grow_to(total)
                    chunks.append(chunk)
    except ShuttingDownError:
        # Nothing of it was kept: the client sends it again (here once
        # restarted, or to another replica).
        raise _Refused(
            503, f"collector shutting down: {unsaved}, send it again", "shutting_down"
        ) from None
    except TimeoutError:
        # A stalled upload must not hold its bytes (and a connection) for ever.
        raise _Refused(408, f"body not received within {timeout_s:g} s", "timeout") from None
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class _Prepared:
    record: IngestRecord
    rejected: tuple[Rejection, ...]


def prepare(
    payload: bytes, limits: DecodeLimits, received_ns: int, header: BatchHeader | None = None
) -> _Prepared:
    """Build the store rows of a batch's msgpack bytes (CPU-bound: big ones run in a thread).

    ``header`` is the batch's, when it was read before (``open_batch``). The
    events are built one at a time and only their rows are kept: a plain,
    valid event becomes its row straight from the msgpack map; any other goes
    through the wire's precise decoder and the store's checks, which reject it
    alone with a reason.

    Raises:
        WireTooLargeError / WireError: the body is refused whole.
    """
    if header is None:
        header = read_batch_header(payload, limits)
    producer_id, seq, max_id = header.producer_id, header.seq, limits.max_id_len
    rows: list[Row] = []
    rejected: list[Rejection] = []
    for index, item in enumerate(read_batch_events(payload, header, limits)):
        row = fast_prediction_row(item, producer_id, seq, received_ns, max_id)
        if row is None:
            row = _precise_row(item, index, limits, rejected, (producer_id, seq, received_ns))
        if row is not None:
            rows.append(row)
    record = IngestRecord(
        producer_id=producer_id,
        seq=seq,
        digest=batch_digest(payload),
        prev_digest=header.prev_digest,
        batch_id=header.batch_id,
        created_ns=min(header.created_at_unix_nano, 2**63 - 1),
        received_ns=received_ns,
        rows=rows,
        rejected=len(rejected),
    )
    return _Prepared(record, tuple(rejected))


def open_batch(body: bytes, limits: DecodeLimits) -> tuple[bytes, BatchHeader]:
    """A body's msgpack bytes (inflated when gzip'd) and its header (CPU-bound: run in a thread).

    Raises:
        WireTooLargeError / WireError: the body is refused whole.
    """
    payload = inflate(body, limits) if body[:2] == GZIP_MAGIC else body
    return payload, read_batch_header(payload, limits)


def inflate(body: bytes, limits: DecodeLimits) -> bytes:
    """The msgpack bytes of a gzip'd body (CPU-bound: run in a thread).

    Raises:
        WireTooLargeError: they would exceed ``limits.max_decompressed_bytes``.
        WireError: the body is not one valid gzip member of a msgpack batch.
    """
    payload = gunzip_bounded(body, limits.max_decompressed_bytes)
    if payload[:2] == GZIP_MAGIC:
        # The decoder would inflate it again, past what was charged for it.
        raise WireError("batch must be a msgpack map, not gzip'd twice")
    return payload


def decode_cost(payload_len: int, event_count: int) -> int:
    """Bytes a decode keeps until its batch is stored, beyond the payload: its rows.

    Not the event being built: one at a time per decode, each within the
    reader's per-event bounds, and only ``DECODES_AT_ONCE`` decodes run in
    threads (plus small bodies on the event loop), so those objects are
    bounded whatever the number of batches in flight.
    """
    return ROW_BYTES * event_count + ROW_BYTES_PER_PAYLOAD_BYTE * payload_len


def _precise_row(
    item: object,
    index: int,
    limits: DecodeLimits,
    rejected: list[Rejection],
    origin: tuple[str, int, int],
) -> Row | None:
    """The row of an event off the fast path, or None with its rejection appended."""
    try:
        event = event_from_map(item, limits)
    except WireError as exc:
        rejected.append(event_rejection(index, item, exc))
        return None
    problem = event_problem(event)
    if problem is not None:
        rejected.append(Rejection(index, problem, event.prediction_id))
        return None
    return prediction_row(event, *origin)


class IngestHandler:
    """The ``POST /v1/batches`` handler of one collector."""

    def __init__(
        self,
        store: Store,
        *,
        limits: DecodeLimits,
        budget: InflightBudget,
        authorizer: Authorizer,
        metrics: CollectorMetrics,
        retry_after_s: int,
        body_timeout_s: float = BODY_TIMEOUT_S,
        slots: DecodeSlots | None = None,
    ) -> None:
        self.store, self.limits, self.budget = store, limits, budget
        self.slots = slots or DecodeSlots()
        self.body_timeout_s = body_timeout_s
        self.authorizer, self.metrics = authorizer, metrics
        self.retry_after = str(retry_after_s)

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one batch (see the module docstring)."""
        reservation = _Reservation(self.budget)
        try:
            entry = self.authorizer.check(request, Scope.INGEST)
            declared = request.content_length
            encoding = request.headers.get("Content-Encoding", "").strip().lower()
            if encoding not in _ENCODINGS:
                raise _Refused(
                    400, f"unsupported Content-Encoding {encoding[:32]!r}", "bad_request"
                )
            if declared is not None and declared > self.limits.max_bytes:
                raise _Refused(413, f"body exceeds {self.limits.max_bytes} bytes", "too_large")
            # Reserve what arrives, chunk by chunk (never the declared length
            # up front): a stalled upload holds only the bytes it sent. One
            # byte now, so a full budget answers 503 before any read.
            reservation.grow_to(1)
            body = await self._read(request, reservation)
            prepared = await self._prepare(body, reservation, entry)
            return await self._store(prepared, len(body))
        except AuthRefusal as refusal:
            self.metrics.batches.labels(refusal.outcome).inc()
            return refusal.response()
        except _Refused as refused:
            return self._refusal(refused)
        finally:
            reservation.release()

    async def _read(self, request: web.Request, reservation: _Reservation) -> bytes:
        try:
            return await read_body(
                request,
                reservation,
                cap=self.limits.max_bytes,
                timeout_s=self.body_timeout_s,
                name="body",
                unsaved="batch not stored",
            )
        except ConnectionResetError:
            # The client hung up mid-body: nobody reads the answer, and left to
            # aiohttp this is an ERROR with a traceback per dropped upload.
            raise _Refused(
                400, "client disconnected before the body ended", "disconnected"
            ) from None

    async def _prepare(
        self, body: bytes, reservation: _Reservation, entry: TokenEntry | None
    ) -> _Prepared:
        received_ns = time.time_ns()
        try:
            # What decides is what the decode costs: a gzip'd body of a few KiB
            # can inflate to the decompressed cap (seconds of CPU on the loop).
            if body[:2] != GZIP_MAGIC and len(body) <= _INLINE_DECODE_MAX:
                header = read_batch_header(body, self.limits)
                self._admit(entry, header, body, body, reservation)
                return prepare(body, self.limits, received_ns, header)
            async with self.slots.slot():
                payload, header = await asyncio.to_thread(open_batch, body, self.limits)
                self._admit(entry, header, body, payload, reservation)
                return await asyncio.to_thread(prepare, payload, self.limits, received_ns, header)
        except WireTooLargeError as exc:
            raise _Refused(413, str(exc), "too_large") from None
        except WireError as exc:
            raise _Refused(400, str(exc), "bad_request") from None

    def _admit(
        self,
        entry: TokenEntry | None,
        header: BatchHeader,
        body: bytes,
        payload: bytes,
        reservation: _Reservation,
    ) -> None:
        """Refuse a producer the token may not send as (403), then charge what decoding costs.

        Both before one event is built: a batch under another producer's id
        costs a pass over its bytes, whatever its events hold. The body, its
        inflated form and the decode (``decode_cost``) stay charged until the
        batch is stored. A batch within the decoder's limits is never refused
        for good: past the whole budget it is charged the whole budget (it
        waits for an idle collector: 503 until then).
        """
        if entry is not None and not entry.allows_producer(header.producer_id):
            raise _Refused(403, "token not allowed for this producer_id", "forbidden")
        inflated = len(payload) if payload is not body else 0
        cost = len(body) + inflated + decode_cost(len(payload), header.event_count)
        reservation.grow_to(min(cost, self.budget.cap))

    async def _store(self, prepared: _Prepared, size: int) -> web.Response:
        record = prepared.record
        started = time.perf_counter()
        try:
            outcome = await self.store.ingest(record)
        except StoreError as exc:
            log.warning("store failed, answering 503: %s", exc)
            raise _Refused(503, "store unavailable, retry later", "store_unavailable") from None
        self.metrics.store_seconds.observe(time.perf_counter() - started)
        if outcome.conflict:
            raise _Refused(
                409,
                f"seq {record.seq} of producer {record.producer_id!r} was stored before with "
                "other content; this batch was not stored (the producer reused a seq)",
                "conflict",
            )
        self.metrics.batches.labels("duplicate" if outcome.duplicate else "stored").inc()
        if not outcome.duplicate:
            self.metrics.chain.labels(outcome.chain).inc()
            self.metrics.events.labels("stored").inc(outcome.stored)
            self.metrics.events.labels("rejected").inc(len(prepared.rejected))
            self.metrics.ingest_bytes.inc(size)
        ack = IngestAck(
            producer_id=record.producer_id,
            seq=record.seq,
            accepted=outcome.stored,
            rejected=prepared.rejected,
            duplicate=outcome.duplicate,
        )
        return web.Response(body=encode_ack(ack), content_type=BATCH_CONTENT_TYPE)

    def _refusal(self, refused: _Refused) -> web.Response:
        self.metrics.batches.labels(refused.outcome).inc()
        headers = {"Retry-After": self.retry_after} if refused.status == 503 else None
        return web.Response(status=refused.status, text=refused.reason, headers=headers)

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

The handler is here; the body is read in ``_body``, charged to the budget of
``_budget``, and a batch becomes its store rows in ``_ingest_rows``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Final

from aiohttp import web

from predtrace.collector._auth import Scope, TokenEntry
from predtrace.collector._body import read_body
from predtrace.collector._budget import (
    DecodeSlots,
    InflightBudget,
    _Refused,
    _Reservation,
)
from predtrace.collector._errors import StoreError
from predtrace.collector._ingest_rows import (
    _Prepared,
    decode_cost,
    open_batch,
    prepare,
)
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._security import Authorizer, AuthRefusal
from predtrace.collector.store import Store
from predtrace.wire import (
    BatchHeader,
    DecodeLimits,
    IngestAck,
    WireError,
    WireTooLargeError,
    encode_ack,
    read_batch_header,
)
from predtrace.wire._codec import GZIP_MAGIC

log = logging.getLogger("predtrace.collector.ingest")
BATCH_CONTENT_TYPE: Final = "application/vnd.predtrace.batch+msgpack"
# A body that has not fully arrived by then is refused (408): a client that
# stalls mid-upload must not hold its share of the in-flight budget for ever.
BODY_TIMEOUT_S: Final = 30.0
# A plain (not gzip'd) body up to this size is decoded on the event loop: its
# decode costs about its size, less than a round trip through a thread.
_INLINE_DECODE_MAX: Final = 64 * 1024
_ENCODINGS: Final = ("", "identity", "gzip", "x-gzip")


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

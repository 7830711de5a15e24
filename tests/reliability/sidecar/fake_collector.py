"""An in-test collector implementing the ingest contract (T1 tests only).

A real aiohttp server on 127.0.0.1:0 in the test's own event loop: decodes
each batch with ``decode_batch``, stores it once per (producer, seq), answers
``encode_ack``. ``script`` queues canned answers (status codes, hangs,
resets) for the next requests; ``fail_when`` fails batches matching a test.
Like the collector, it answers 409 to a stored (producer, seq) sent again
with other bytes, 413 to a body over ``max_body`` (an ingress limit), and
``GET /readyz`` with 200 ``ready`` while ``ready`` is set (503 when False, 404 when None).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from predtrace.wire import (
    DecodedBatch,
    IngestAck,
    PredictionEvent,
    Rejection,
    WireError,
    decode_batch,
    encode_ack,
)

CONTENT_TYPE = "application/vnd.predtrace.batch+msgpack"
# What the real collector says with its 409 (collector/_ingest.py).
SEQ_REUSED = (
    "seq {seq} of producer {producer!r} was stored before with other content; this batch "
    "was not stored (the producer reused a seq)"
)


@dataclass
class Answer:
    """A canned answer: a status (with Retry-After), or ``hang`` for a server that never answers."""

    status: int = 200
    retry_after: str | None = None
    hang: bool = False


@dataclass
class FakeCollector:
    """Stores batches by (producer, seq); counts every request."""

    script: list[Answer] = field(default_factory=list)
    # A status, or a status and the text to answer with.
    fail_when: Callable[[DecodedBatch], int | tuple[int, str] | None] | None = None
    reject_ids: set[str] = field(default_factory=set)
    stored: dict[tuple[str, int], DecodedBatch] = field(default_factory=dict)
    requests: int = 0
    duplicates: int = 0
    max_body: int | None = None
    too_large: int = 0  # bodies refused with 413 for max_body
    conflicts: int = 0  # batches refused with 409 (a seq reused with other bytes)
    ready: bool | None = True  # None: /readyz is not routed (404)
    ready_probes: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen on 127.0.0.1:0; return the base URL."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/batches", self._ingest)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        """Stop listening (connections are refused afterwards)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        self.ready_probes += 1
        if self.ready is None:  # an ingress that routes only /v1/batches
            return web.Response(status=404, text="no such route")
        if self.ready:
            return web.Response(text="ready")
        return web.Response(status=503, text="store unavailable")

    async def _ingest(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        if self.max_body is not None and len(body) > self.max_body:
            self.too_large += 1
            return web.Response(status=413, text=f"body exceeds {self.max_body} bytes")
        if self.script:
            answer = self.script.pop(0)
            if answer.hang:
                await asyncio.sleep(3600)
            if answer.status != 200:
                headers = {"Retry-After": answer.retry_after} if answer.retry_after else {}
                return web.Response(status=answer.status, text="scripted", headers=headers)
        try:
            decoded = decode_batch(body)
        except WireError as exc:
            return web.Response(status=400, text=str(exc))
        if self.fail_when is not None:
            failure = self.fail_when(decoded)
            if failure is not None:
                status, text = failure if isinstance(failure, tuple) else (failure, "")
                return web.Response(status=status, text=text or "scripted failure")
        return self._store(decoded)

    def _store(self, decoded: DecodedBatch) -> web.Response:
        batch = decoded.batch
        key = (batch.producer_id, batch.seq)
        duplicate = key in self.stored
        if duplicate and self.stored[key].digest != decoded.digest:
            self.conflicts += 1
            text = SEQ_REUSED.format(seq=batch.seq, producer=batch.producer_id)
            return web.Response(status=409, text=text)
        if duplicate:
            self.duplicates += 1
        rejected = [
            Rejection(i, "rejected by test", e.prediction_id)
            for i, e in enumerate(batch.events)
            if e.prediction_id in self.reject_ids
        ]
        if not duplicate:
            self.stored[key] = decoded
        ack = IngestAck(
            batch.producer_id,
            batch.seq,
            len(batch.events) - len(rejected),
            tuple(rejected),
            duplicate,
        )
        return web.Response(body=encode_ack(ack), content_type=CONTENT_TYPE)

    def events(self) -> list[PredictionEvent]:
        """Every stored event, in (producer, seq) order."""
        return [e for key in sorted(self.stored) for e in self.stored[key].batch.events]

    def chain_ok(self, producer: str) -> bool:
        """Whether each stored batch of ``producer`` carries its predecessor's digest."""
        seqs = sorted(s for p, s in self.stored if p == producer)
        for before, after in itertools.pairwise(seqs):
            if after == before + 1:
                prev = self.stored[(producer, before)].digest
                if self.stored[(producer, after)].batch.prev_digest != prev:
                    return False
        return True

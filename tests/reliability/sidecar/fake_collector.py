"""An in-test collector implementing the ingest contract (T1 tests only).

A real aiohttp server on 127.0.0.1:0 in the test's own event loop: decodes
each batch with ``decode_batch``, stores it once per (producer, seq), answers
``encode_ack``. ``script`` queues canned answers (status codes, hangs,
resets) for the next requests; ``fail_when`` fails batches matching a test.
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
    fail_when: Callable[[DecodedBatch], int | None] | None = None
    reject_ids: set[str] = field(default_factory=set)
    stored: dict[tuple[str, int], DecodedBatch] = field(default_factory=dict)
    requests: int = 0
    duplicates: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Listen on 127.0.0.1:0; return the base URL."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/batches", self._ingest)
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

    async def _ingest(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
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
            status = self.fail_when(decoded)
            if status is not None:
                return web.Response(status=status, text="scripted failure")
        return self._store(decoded)

    def _store(self, decoded: DecodedBatch) -> web.Response:
        batch = decoded.batch
        key = (batch.producer_id, batch.seq)
        duplicate = key in self.stored
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

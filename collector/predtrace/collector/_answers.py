"""Query answers, bounded in memory as uploads are.

Each answer's JSON is charged to a
byte budget of the answers' own (``ANSWER_BUDGET_BYTES``; 503 + Retry-After
when full) from before the store is asked until its last byte is handed to the
socket; a few big ones are built at once (``QUERIES_AT_ONCE``), encoded in a
thread (``ENCODES_AT_ONCE``) an item at a time, so the event loop (and
``/healthz``) keeps answering; and a client that does not read its answer is
let go: each write must go out within ``SEND_TIMEOUT_S`` and the whole answer
at ``MIN_SEND_RATE`` at least, else the connection is aborted and its bytes
freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

from aiohttp import web
from prometheus_client import Gauge

from predtrace.collector._body import _CHUNK
from predtrace.collector._budget import DecodeSlots, InflightBudget, _Reservation
from predtrace.collector._stopping import STOPPING

# JSON of answers being built or sent, at most: a budget of their own, not
# ingest's. A batch is the delivery path and a query an on-call read: a few
# clients slow to read big answers must not turn sidecars away (503), nor a
# flood of batches refuse the on-call. What the collector holds is then
# bounded by the sum of both caps. Four pivot answers at their largest
# (PIVOT_MAX_BYTES); an answer bigger than the cap is charged the cap (it
# waits for an idle collector: 503 until then).
ANSWER_BUDGET_BYTES: Final = 64 * 1024 * 1024
# Big answers (pivot, impact, completeness, producers) built at once: their
# rows are held, before they are encoded, beyond what the budget charges.
QUERIES_AT_ONCE: Final = 4
# Answers encoded in threads at once (as ingest's DECODES_AT_ONCE: two keep a
# small host busy, and leave the default thread pool to ingest).
ENCODES_AT_ONCE: Final = 2
# A write of an answer that cannot go out within this (the client reads
# nothing) aborts the connection; so does an answer that goes out slower than
# MIN_SEND_RATE bytes a second (after SEND_TIMEOUT_S): a client reading a byte
# now and then must not hold its answer's bytes for ever either.
SEND_TIMEOUT_S: Final = 30.0
MIN_SEND_RATE: Final = 128 * 1024
_BUSY: Final = "collector busy: query answer byte cap reached (answers not yet read); retry later"


class AnswerSender:
    """Builds, encodes and sends JSON answers within a byte budget of their own."""

    def __init__(
        self,
        *,
        budget_bytes: int = ANSWER_BUDGET_BYTES,
        send_timeout_s: float = SEND_TIMEOUT_S,
        min_send_rate: float = MIN_SEND_RATE,
        on_stalled: Callable[[str], None] = lambda _path: None,
        gauge: Gauge | None = None,
    ) -> None:
        """``on_stalled(path)``: an answer's client read too slowly; its connection was aborted.

        ``gauge``: shows the bytes of answers being built or sent.
        """
        self.budget = InflightBudget(budget_bytes, gauge)
        self.send_timeout_s, self.min_send_rate = send_timeout_s, min_send_rate
        self.queries = DecodeSlots(QUERIES_AT_ONCE)
        self.encodes = DecodeSlots(ENCODES_AT_ONCE)
        self._on_stalled = on_stalled

    @property
    def used(self) -> int:
        """Bytes of answers being built or sent now."""
        return self.budget.used

    async def answer(
        self, request: web.Request, build: Callable[[], Awaitable[object]], *, big: bool = False
    ) -> web.StreamResponse:
        """The JSON of what ``build`` returns (a response it returns goes as it is), bounded.

        Charged to the answers' budget from before ``build`` runs (a full
        budget answers 503 at once) until sent; ``big``: built in one of
        ``QUERIES_AT_ONCE`` slots and encoded in a thread.

        A stopping collector gives it, from the start, the grace it gives
        uploads (``_stopping``): an answer being built when SIGTERM comes is
        still sent if it is done within the grace.

        Raises:
            _Refused: 503, the budget cannot hold the answer.
        """
        stopping, transport = request.app.get(STOPPING), request.transport
        if stopping is None or transport is None:
            return await self._answer(request, build, big=big)
        with stopping.answering(transport):
            return await self._answer(request, build, big=big)

    async def _answer(
        self, request: web.Request, build: Callable[[], Awaitable[object]], *, big: bool
    ) -> web.StreamResponse:
        reservation = _Reservation(self.budget, _BUSY)
        try:
            reservation.grow_to(1)
            async with self.queries.slot() if big else contextlib.nullcontext():
                data = await build()
                if isinstance(data, web.StreamResponse):
                    return data
                if big:
                    async with self.encodes.slot():
                        pieces = await asyncio.to_thread(encode_json, data)
                else:
                    pieces = encode_json(data)
                del data  # the rows: only their JSON is held while it is sent
                size = sum(map(len, pieces))
                reservation.grow_to(min(size, self.budget.cap))
            return await self._send(request, pieces, size)
        finally:
            reservation.release()

    async def _send(
        self, request: web.Request, pieces: list[bytes], size: int
    ) -> web.StreamResponse:
        """Write ``pieces`` (``size`` bytes of JSON); abort the connection of a client too slow.

        A write at a time, so that the socket's buffer holds one piece at
        most (the whole answer written at once is copied there, and held
        until the client reads it).
        """
        response = web.StreamResponse()
        response.content_type, response.charset = "application/json", "utf-8"
        response.content_length = size
        transport = request.transport
        if transport is None:  # the client is gone
            return response
        try:
            async with asyncio.timeout(self.send_timeout_s + size / self.min_send_rate):
                await response.prepare(request)
                for part in _slices(pieces) if request.method != "HEAD" else ():
                    async with asyncio.timeout(self.send_timeout_s):
                        await response.write(part)
                await response.write_eof()
        except TimeoutError:
            # Closing would wait for the buffered bytes to be read: abort.
            transport.abort()
            self._on_stalled(request.path)
        except ConnectionError:
            pass  # the client hung up, or the collector stopped: nobody reads the rest
        return response


def _dumps(data: object) -> str:
    return json.dumps(data, default=str)


class _Pieces:
    """Text appended a bit at a time, kept as bytes in pieces of about ``_CHUNK``."""

    __slots__ = ("_size", "_texts", "done")

    def __init__(self) -> None:
        self.done: list[bytes] = []
        self._texts: list[str] = []
        self._size = 0

    def add(self, text: str) -> None:
        self._texts.append(text)
        self._size += len(text)
        if self._size >= _CHUNK:
            self.flush()

    def flush(self) -> list[bytes]:
        if self._texts:
            # ASCII: json.dumps escapes every other character (ensure_ascii).
            self.done.append("".join(self._texts).encode("ascii"))
            self._texts, self._size = [], 0
        return self.done


def encode_json(data: object) -> list[bytes]:
    """``json.dumps(data, default=str)``, as bytes in pieces of about ``_CHUNK``.

    The lists of a dict (an answer's rows) an item at a time: a thread
    encoding a big answer then lets the event loop run between items (one
    ``json.dumps`` of it all would hold the interpreter for its whole length).
    """
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        return [_dumps(data).encode("ascii")]
    pieces = _Pieces()
    pieces.add("{")
    for index, (key, value) in enumerate(data.items()):
        pieces.add(f"{', ' if index else ''}{_dumps(key)}: ")
        if not isinstance(value, list):
            pieces.add(_dumps(value))
            continue
        pieces.add("[")
        for position, item in enumerate(value):
            pieces.add(f", {_dumps(item)}" if position else _dumps(item))
        pieces.add("]")
    pieces.add("}")
    return pieces.flush()


def _slices(pieces: list[bytes]) -> Iterator[memoryview]:
    """``pieces`` in writes of ``_CHUNK`` bytes at most (one row may be far bigger)."""
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), _CHUNK):
            yield view[start : start + _CHUNK]

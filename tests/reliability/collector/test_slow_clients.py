"""Slow clients: a connection idle past the timeout is closed, a slow upload is not."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from predtrace.cli._serving import MAX_FIELD_SIZE, MAX_HEADERS
from predtrace.collector import CollectorConfig, RunningCollector, start_collector
from predtrace.collector._app import PARTS
from predtrace.collector._server import IDLE_TIMEOUT_S
from predtrace.collector.testing import ChainedProducer, make_events

IDLE_S = 1.0

StartIdle = Callable[[], Awaitable[RunningCollector]]


@pytest.fixture
async def start_idle(tmp_path: Path) -> AsyncIterator[StartIdle]:
    """Start a collector that lets connections idle for ``IDLE_S`` seconds."""
    running: list[RunningCollector] = []

    async def _start() -> RunningCollector:
        config = CollectorConfig(db=f"sqlite:///{tmp_path}/c.db", listen="127.0.0.1:0")
        collector = await start_collector(config, idle_timeout_s=IDLE_S)
        running.append(collector)
        return collector

    yield _start
    for collector in running:
        await collector.stop()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection (fails if it did not)."""
    return await asyncio.wait_for(reader.read(), seconds)


def test_the_idle_timeout_outlasts_the_clients_own_and_is_short() -> None:
    # aiohttp's client drops a connection idle for 15 s: the server closing
    # one earlier could race a request on it. aiohttp's server default is 3630 s.
    assert 15 < IDLE_TIMEOUT_S <= 30


async def test_a_connection_whose_headers_never_end_is_closed_once_idle(
    start_idle: StartIdle,
) -> None:
    # Was held for an hour: a thousand of them took every file descriptor.
    collector = await start_idle()
    reader, writer = await asyncio.open_connection(collector.host, collector.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        started = time.monotonic()
        assert await _closed_within(reader, 10 * IDLE_S) == b""
        assert time.monotonic() - started < 5 * IDLE_S
    finally:
        writer.close()


async def test_headers_trickling_in_do_not_extend_the_timeout(start_idle: StartIdle) -> None:
    collector = await start_idle()
    reader, writer = await asyncio.open_connection(collector.host, collector.port)
    started = time.monotonic()
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            if reader.at_eof() or writer.is_closing():
                break
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            if reader.at_eof():
                break
            await asyncio.sleep(IDLE_S / 5)
        assert await _closed_within(reader, 10 * IDLE_S) == b""
        assert time.monotonic() - started < 5 * IDLE_S
    finally:
        writer.close()


async def test_an_upload_slower_than_the_idle_timeout_is_still_answered(
    start_idle: StartIdle,
) -> None:
    # A request being handled is not idle: its body has BODY_TIMEOUT_S.
    collector = await start_idle()
    body = ChainedProducer("p").body(make_events(3))
    reader, writer = await asyncio.open_connection(collector.host, collector.port)
    try:
        writer.write(
            b"POST /v1/batches HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/vnd.predtrace.batch+msgpack\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        await writer.drain()
        await asyncio.sleep(2 * IDLE_S)
        writer.write(body[10:])
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        assert status.startswith(b"HTTP/1.1 200"), status
    finally:
        writer.close()


# -- what clients' connections and headers may hold --------------------------------------


async def _status_of(collector: RunningCollector, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(collector.host, collector.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()


async def test_request_headers_are_bounded_in_number_and_size(start_idle: StartIdle) -> None:
    # aiohttp's defaults (128 headers of 8 KiB) let each connection hold about
    # 2 MB of headers, outside every byte budget, for the body deadline.
    collector = await start_idle()
    many = b"".join(b"X-H%d: v\r\n" % k for k in range(MAX_HEADERS + 1))
    long = b"X-Long: " + b"a" * (MAX_FIELD_SIZE + 1) + b"\r\n"
    for extra in (many, long):
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"
        line = await _status_of(collector, request)
        assert line.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), line
    ok = await _status_of(collector, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok


async def test_connections_past_the_cap_are_closed_at_once_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # With the header limits, this bounds what clients' connections hold.
    # Closed at once, each refused one left a task that logged a traceback.
    config = CollectorConfig(
        db=f"sqlite:///{tmp_path}/c.db", listen="127.0.0.1:0", max_connections=2
    )
    collector = await start_collector(config, idle_timeout_s=30)
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):  # open, saying nothing yet
            _, writer = await asyncio.open_connection(collector.host, collector.port)
            held.append(writer)
        await asyncio.sleep(0.1)
        for _ in range(3):
            reader, writer = await asyncio.open_connection(collector.host, collector.port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            # Closed unanswered (a reset: what it sent was never read).
            with contextlib.suppress(ConnectionResetError):
                assert await _closed_within(reader, 5) == b""
            writer.close()
        await asyncio.sleep(0.2)
        gc.collect()  # a task that failed unretrieved logs as it goes
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        held.pop().close()
        server = collector.runner.server
        assert server is not None
        await _until(lambda: len(server.connections) < 2)  # the close has been seen
        line = await _status_of(collector, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert line.startswith(b"HTTP/1.1 200"), line
        metrics = collector.runner.app[PARTS].metrics.render().decode()
        assert "predtrace_collector_connections_refused_total 3.0" in metrics
    finally:
        for writer in held:
            writer.close()
        await collector.stop()


async def _until(check: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``check`` until it is true (fails after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        await asyncio.sleep(0.02)

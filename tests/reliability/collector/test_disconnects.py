"""Clients that hang up mid-batch: let go quietly, never a traceback each in the log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from predtrace.collector import PARTS, RunningCollector

from .conftest import CONTENT_TYPE, Start

DROPS = 20


async def _until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within_s`` seconds."""
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached within {within_s:g} s")


async def _drop_upload(
    collector: RunningCollector, path: str, content_type: str, started: Callable[[], bool]
) -> None:
    """Send the head and 10 of 1000 body bytes, wait until ``started``, hang up."""
    host, port = collector.url.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 1000\r\n\r\n".encode()
        + b"{" * 10
    )
    await writer.drain()
    await _until(started)
    writer.close()
    await writer.wait_closed()


async def test_uploads_dropped_mid_batch_are_counted_and_never_logged_as_tracebacks(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    collector = await start()
    parts = collector.runner.app[PARTS]
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # startup's own warnings
    for _ in range(DROPS):
        # Hang up once the handler holds body bytes (it is reading), then wait
        # until it let them go (it has finished with the request).
        await _drop_upload(collector, "/v1/batches", CONTENT_TYPE, lambda: parts.budget.used > 0)
        await _until(lambda: parts.budget.used == 0)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    dropped = parts.metrics.registry.get_sample_value(
        "predtrace_collector_batches_total", {"outcome": "disconnected"}
    )
    assert dropped == DROPS

"""Lineage uploads (CI hooks, OpenLineage) read under a batch's rules: a body deadline,
the shared in-flight byte budget, and a quiet answer to a client that hangs up."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

import aiohttp
import pytest

from predtrace.collector import PARTS, RunningCollector
from predtrace.collector.testing import ChainedProducer, make_events

from .conftest import Post, Start


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` for up to ten seconds (no fixed sleeps)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


async def _stall(
    collector: RunningCollector, path: str, sent: bytes, declared: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Start an upload of ``declared`` bytes, send ``sent`` of them, and stop there."""
    host, port = collector.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("path", ["/v1/lineage", "/v1/openlineage"])
async def test_a_stalled_lineage_upload_is_answered_408_like_a_batch(
    start: Start, path: str
) -> None:
    collector = await start(body_timeout_s=1.0)
    reader, writer = await _stall(collector, path, b'{"run": ', 2000)
    try:
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert status_line.split()[1] == b"408", status_line
    assert collector.runner.app[PARTS].budget.used == 0


async def test_a_stalled_lineage_upload_holds_its_bytes_of_the_budget_batches_share(
    start: Start, post: Post
) -> None:
    collector = await start(max_body_bytes=64 * 1024, max_inflight_bytes=128 * 1024)
    budget = collector.runner.app[PARTS].budget
    _, writer = await _stall(collector, "/v1/lineage", b" " * 120_000, 500_000)
    try:
        await _until(lambda: budget.used >= 120_000, "the stalled upload's bytes to be held")
        busy = await post(collector, ChainedProducer("p").body(make_events(100)))
        assert busy.status == 503, busy.text
    finally:
        writer.close()
    await _until(lambda: budget.used == 0, "the hung-up upload to give its bytes back")
    answer = await post(collector, ChainedProducer("q").body(make_events(100)))
    assert answer.status == 200, answer.text


async def test_clients_that_hang_up_mid_lineage_upload_make_one_log_line_and_no_traceback(
    start: Start, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    collector = await start()
    for _ in range(5):
        _, writer = await _stall(collector, "/v1/lineage", b'{"run": ', 2000)
        writer.close()
        await writer.wait_closed()

    def hung_up() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "ended by the client mid-body" in r.getMessage()]

    await _until(lambda: bool(hung_up()), "the hang-ups to be noticed")
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert len(hung_up()) == 1, "one line a minute at most, the rest counted"
    body = json.dumps({"run": {"id": "run-1"}}).encode()
    headers = {"Content-Type": "application/json"}
    async with session.post(f"{collector.url}/v1/lineage", data=body, headers=headers) as resp:
        assert resp.status == 201, await resp.text()

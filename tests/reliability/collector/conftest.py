"""A running collector (real aiohttp server on 127.0.0.1:0, SQLite) per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from predtrace.collector import CollectorConfig, RunningCollector, start_collector
from predtrace.wire import IngestAck, decode_ack

CONTENT_TYPE = "application/vnd.predtrace.batch+msgpack"


@dataclass
class Answer:
    status: int
    text: str
    ack: IngestAck | None
    headers: dict[str, str]


Post = Callable[..., Awaitable[Answer]]
Start = Callable[..., Awaitable[RunningCollector]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """Start collectors with config overrides; all are stopped after the test."""
    running: list[RunningCollector] = []

    async def _start(**overrides: object) -> RunningCollector:
        settings: dict[str, object] = {"db": f"sqlite:///{tmp_path}/c.db", "listen": "127.0.0.1:0"}
        settings.update(overrides)
        collector = await start_collector(CollectorConfig(**settings))  # type: ignore[arg-type]
        running.append(collector)
        return collector

    yield _start
    for collector in running:
        await collector.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def post(session: aiohttp.ClientSession) -> Post:
    """POST a body to /v1/batches; returns status, text and the decoded ack."""

    async def _post(
        collector: RunningCollector, body: object, *, token: str | None = None, **headers: str
    ) -> Answer:
        sent = {"Content-Type": CONTENT_TYPE, **headers}
        if token:
            sent["Authorization"] = f"Bearer {token}"
        async with session.post(f"{collector.url}/v1/batches", data=body, headers=sent) as resp:
            raw = await resp.read()
            ack = decode_ack(raw) if resp.status == 200 else None
            text = "" if resp.status == 200 else raw.decode("utf-8", "replace")
            return Answer(resp.status, text, ack, dict(resp.headers))

    return _post

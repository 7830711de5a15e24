"""A stopping collector ends uploads still arriving at once, and commits the batches it has.

Uploads that stalled mid-body held SIGTERM for the 30 s body deadline (the
default grace of a Kubernetes pod). Now each one still arriving after the
stop grace is answered 503 (nothing of it was acknowledged: the producer
sends it again), an answer a client does not read is dropped, and a batch
whose body arrived is committed and acknowledged before the collector exits.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from predtrace.collector import RunningCollector, build_app, start_collector
from predtrace.collector._config import CollectorConfig
from predtrace.collector.store import IngestOutcome, IngestRecord, Store, open_store
from predtrace.collector.testing import ChainedProducer, make_events
from predtrace.wire import DeploymentRef, ModelRef, PredictionEvent, decode_ack

CONTENT_TYPE = "application/vnd.predtrace.batch+msgpack"
Stalled = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _stall(url: str, path: str, content_type: str) -> Stalled:
    """An upload that sent its headers and 11 bytes of a 100,000-byte body, then stopped."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 100000\r\n\r\n".encode()
        + b"\x86"
        + b"x" * 10
    )
    await writer.drain()
    return reader, writer


async def _answer_of(stalled: Stalled) -> bytes:
    """The status line and body of the answer a stalled upload gets."""
    reader, writer = stalled
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` for up to ten seconds (no fixed sleeps)."""
    deadline = time.monotonic() + 10
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class _GatedStore:
    """Holds each commit until ``release`` is set (the rest is the real store's)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.committing, self.release = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def ingest(self, record: IngestRecord) -> IngestOutcome:
        self.committing.set()
        await self.release.wait()
        return await self._store.ingest(record)


@pytest.fixture
async def stoppable(tmp_path: Path) -> AsyncIterator[list[RunningCollector]]:
    """Collectors the test starts; each stopped (again: safe twice) afterwards."""
    running: list[RunningCollector] = []
    yield running
    for collector in running:
        await collector.stop()


async def test_stop_answers_stalled_uploads_503_at_once_instead_of_after_the_body_deadline(
    tmp_path: Path, stoppable: list[RunningCollector]
) -> None:
    config = CollectorConfig(db=f"sqlite:///{tmp_path}/c.db", listen="127.0.0.1:0")
    collector = await start_collector(config, stop_grace_s=0.2)
    stoppable.append(collector)
    stalled = [await _stall(collector.url, "/v1/batches", CONTENT_TYPE) for _ in range(3)]
    stalled.append(await _stall(collector.url, "/v1/lineage", "application/json"))
    await asyncio.sleep(0.1)  # the handlers are reading
    # Within a few seconds, not the 30 s body deadline (pytest's timeout is 120 s).
    await asyncio.wait_for(collector.stop(), 10)
    for answer in await asyncio.gather(*map(_answer_of, stalled)):
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"Retry-After: 1" in answer and b"shutting down" in answer, answer


async def test_a_batch_being_committed_when_the_stop_begins_is_stored_and_acknowledged(
    tmp_path: Path, stoppable: list[RunningCollector]
) -> None:
    db = f"sqlite:///{tmp_path}/c.db"
    config = CollectorConfig(db=db, listen="127.0.0.1:0")
    gated = _GatedStore(open_store(db))
    app = build_app(config, store=gated)  # type: ignore[arg-type]  # a store's stand-in
    collector = await start_collector(config, app=app, stop_grace_s=0.2)
    stoppable.append(collector)
    producer = ChainedProducer("edge-1")
    body = producer.body(make_events(5))

    async with aiohttp.ClientSession() as session:

        async def send() -> tuple[int, bytes]:
            headers = {"Content-Type": CONTENT_TYPE}
            async with session.post(f"{collector.url}/v1/batches", data=body, headers=headers) as r:
                return r.status, await r.read()

        sent = asyncio.create_task(send())
        await asyncio.wait_for(gated.committing.wait(), 10)
        stalled = await _stall(collector.url, "/v1/batches", CONTENT_TYPE)
        await asyncio.sleep(0.1)  # its handler is reading
        stopping = asyncio.create_task(collector.stop())
        # The stalled upload is let go while the commit is still under way ...
        assert (await _answer_of(stalled)).startswith(b"HTTP/1.1 503 ")
        assert not stopping.done() and not sent.done()
        # ... and the stop waits for the commit, which is acknowledged.
        gated.release.set()
        status, raw = await asyncio.wait_for(sent, 10)
        await asyncio.wait_for(stopping, 10)
    assert status == 200, raw
    ack = decode_ack(raw)
    assert (ack.producer_id, ack.seq, ack.accepted) == ("edge-1", 1, 5)
    store = open_store(db)
    await store.open()
    try:
        report = await store.producer("edge-1")
    finally:
        await store.close()
    assert report is not None and report["last_seq"] == 1, report


async def test_stop_drops_an_answer_its_client_does_not_read(
    tmp_path: Path, stoppable: list[RunningCollector]
) -> None:
    config = CollectorConfig(db=f"sqlite:///{tmp_path}/c.db", listen="127.0.0.1:0")
    app = build_app(config)
    collector = await start_collector(config, app=app, stop_grace_s=0.2)
    stoppable.append(collector)
    trace = bytes.fromhex("ab" * 16)
    events = [
        PredictionEvent(
            prediction_id=f"big-{i}",
            trace_id=trace,
            timestamp_unix_nano=time.time_ns() + i,
            model=ModelRef("churn", "3"),
            deployment=DeploymentRef(id="churn-prod"),
            attributes={f"k{j}": "v" * 10_000 for j in range(10)},
        )
        for i in range(60)
    ]
    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": CONTENT_TYPE}
        body = io.BytesIO(ChainedProducer("p").body(events))
        async with session.post(f"{collector.url}/v1/batches", data=body, headers=headers) as r:
            assert r.status == 200
            assert decode_ack(await r.read()).accepted == len(events)
    host, port = collector.url.removeprefix("http://").rsplit(":", 1)
    loop = asyncio.get_running_loop()
    clients = []
    # Each asks for a 6 MB answer (more than the kernel's buffers take) and reads none of it.
    for _ in range(3):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        clients.append(sock)
        await loop.sock_connect(sock, (host, int(port)))
        await loop.sock_sendall(
            sock, f"GET /v1/traces/{trace.hex()} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
    try:
        stopping = collector.stopping
        assert stopping is not None
        await _until(lambda: len(stopping._sends) == 3, "the answers to be sent")
        # Within a few seconds, not the 30 s send timeout (pytest's timeout is 120 s).
        await asyncio.wait_for(collector.stop(), 10)
    finally:
        for sock in clients:
            sock.close()


def test_sigterm_with_stalled_uploads_exits_within_seconds(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    process = subprocess.Popen(
        [
            *(sys.executable, "-c", "from predtrace.cli import main; main()"),
            *("collector", "serve", "--db", f"sqlite:///{tmp_path}/c.db"),
            *("--listen", "127.0.0.1:0", "--ready-file", str(ready)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), process.stderr.read() if process.stderr else ""
        url = "http://" + ready.read_text().splitlines()[0]

        async def stall_and_stop() -> list[bytes]:
            stalled = [await _stall(url, "/v1/batches", CONTENT_TYPE) for _ in range(3)]
            await asyncio.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*map(_answer_of, stalled))

        answers = asyncio.run(stall_and_stop())
        process.wait(15)  # was 30 s: the body deadline of each stalled upload
        assert process.returncode == 0
        assert all(a.startswith(b"HTTP/1.1 503 ") for a in answers), answers
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stderr:
            process.stderr.close()


class _SlowQueryStore:
    """Holds each ``producer`` query until ``release`` is set (the rest is the real store's)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.querying, self.release = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def producer(self, producer_id: str) -> Any:
        self.querying.set()
        await self.release.wait()
        return await self._store.producer(producer_id)


async def test_an_answer_being_built_when_the_stop_begins_is_still_sent_within_the_grace(
    tmp_path: Path, stoppable: list[RunningCollector]
) -> None:
    # Review of the first version: only answers already being written shared
    # the grace; one still being built (a slow query, MLflow lagging) was
    # aborted as soon as it was done, and the CLI got no answer.
    db = f"sqlite:///{tmp_path}/c.db"
    config = CollectorConfig(db=db, listen="127.0.0.1:0")
    slow = _SlowQueryStore(open_store(db))
    app = build_app(config, store=slow)  # type: ignore[arg-type]  # a store's stand-in
    collector = await start_collector(config, app=app, stop_grace_s=5)
    stoppable.append(collector)
    async with aiohttp.ClientSession() as session:
        body = ChainedProducer("edge-9").body(make_events(3))
        headers = {"Content-Type": CONTENT_TYPE}
        async with session.post(f"{collector.url}/v1/batches", data=body, headers=headers) as r:
            assert r.status == 200

        async def ask() -> tuple[int, Any]:
            async with session.get(f"{collector.url}/v1/producers/edge-9") as resp:
                return resp.status, await resp.json()

        asked = asyncio.create_task(ask())
        await asyncio.wait_for(slow.querying.wait(), 10)
        stopping = asyncio.create_task(collector.stop())
        await asyncio.sleep(0.3)
        assert not stopping.done(), "the stop waits for the answer being built"
        slow.release.set()
        status, body = await asyncio.wait_for(asked, 10)
        await asyncio.wait_for(stopping, 10)
    assert status == 200
    assert (body["producer_id"], body["last_seq"]) == ("edge-9", 1), body

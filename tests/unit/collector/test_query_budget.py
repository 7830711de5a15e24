"""Query answers are bounded in memory: a byte budget, a send timeout, encoding off the loop.

An answer's JSON is charged to the answers' budget until its last byte is
handed to the socket; past the budget a query is answered 503 with
Retry-After and a reason. A client that never reads its answer is let go
after the send timeout, and one that hangs up at once: either way its bytes
go back to the budget. Big answers are encoded in a thread, so ``/healthz``
is answered meanwhile. Answers are the JSON they were.
"""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from predtrace.collector import _answers
from predtrace.collector._api import QueryApi
from predtrace.collector._config import RetentionPolicy
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._retention import Retainer
from predtrace.collector._security import Authorizer
from predtrace.collector._service import LineageService
from predtrace.collector.store import Store, open_store
from predtrace.wire import DeploymentRef, ModelRef, PredictionEvent

from .test_store import record

TRACE = bytes.fromhex("abcdabcdabcdabcdabcdabcdabcdabcd")
PATH = f"/v1/traces/{TRACE.hex()}"
PREDICTIONS = 20
ATTRIBUTE = "v" * 10_000  # some 200 KB of JSON in all


@web.middleware
async def _small_send_buffer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # The kernel would otherwise take megabytes of an answer a client does
    # not read: with a small send buffer, the rest stays in the collector,
    # as most of a big answer does.
    transport = request.transport
    assert transport is not None
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return await handler(request)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


class Served:
    """A query API on 127.0.0.1 (port 0) and the parts the tests look at."""

    def __init__(self, api: QueryApi, runner: web.AppRunner, port: int) -> None:
        self.api, self.runner, self.port = api, runner, port
        self.url = f"http://127.0.0.1:{port}"


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A SQLite store holding one trace of PREDICTIONS predictions of 10 KB each."""
    opened = open_store(f"sqlite:///{tmp_path}/collector.db")
    await opened.open()
    events = [
        PredictionEvent(
            prediction_id=f"big-{i}",
            trace_id=TRACE,
            timestamp_unix_nano=time.time_ns() + i,
            model=ModelRef("churn", "3"),
            deployment=DeploymentRef(id="churn-prod"),
            attributes={"k": ATTRIBUTE},
        )
        for i in range(PREDICTIONS)
    ]
    await opened.ingest(record("p", 1, events))
    yield opened
    await opened.close()


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serve the query API (with /healthz) over a service; stopped after the test."""
    runners: list[web.AppRunner] = []

    async def _serve(service: LineageService | Store, **bounds: Any) -> Served:
        metrics = CollectorMetrics()
        if isinstance(service, Store):
            service = LineageService(service, None, metrics)
        api = QueryApi(
            service,
            Retainer(service.store, RetentionPolicy(), metrics),
            Authorizer(None),
            metrics,
            query_limit=1000,
            retry_after_s=7,
            **bounds,
        )
        app = web.Application(middlewares=[_small_send_buffer])
        app.add_routes(api.routes())
        app.router.add_get("/healthz", _healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return Served(api, runner, site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    yield _serve
    for runner in runners:
        await runner.cleanup()


async def _until(condition: Callable[[], bool], what: str, seconds: float = 10.0) -> None:
    """Poll ``condition`` (no fixed sleeps); fail naming ``what``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _ask_and_never_read(served: Served) -> socket.socket:
    """A client that sends the trace query and reads nothing (a small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", served.port))
    await asyncio.get_running_loop().sock_sendall(
        sock, f"GET {PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    return sock


async def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def test_a_query_past_the_answer_budget_is_answered_503_with_retry_after_and_a_reason(
    store: Store, serve: Serve
) -> None:
    served = await serve(store, answer_budget_bytes=300_000, send_timeout_s=60)
    held = await _ask_and_never_read(served)
    try:
        await _until(lambda: served.api.answers.used > 150_000, "the unread answer to be held")
        status, body, headers = await _get(served.url + PATH)
        assert status == 503, body
        assert headers["Retry-After"] == "7"
        assert "query answer byte cap" in json.loads(body)["error"]
        gauge = served.api.metrics.registry.get_sample_value("predtrace_collector_answer_bytes")
        assert gauge == served.api.answers.used > 150_000
    finally:
        held.close()
    await _until(lambda: served.api.answers.used == 0, "the hung-up client's bytes to be freed")
    assert served.api.metrics.registry.get_sample_value("predtrace_collector_answer_bytes") == 0
    status, body, _ = await _get(served.url + PATH)
    assert status == 200 and len(json.loads(body)["predictions"]) == PREDICTIONS


async def test_a_client_that_never_reads_its_answer_is_let_go_after_the_send_timeout(
    store: Store, serve: Serve
) -> None:
    served = await serve(store, send_timeout_s=0.5)
    status, whole, _ = await _get(served.url + PATH)
    assert status == 200
    held = [await _ask_and_never_read(served) for _ in range(3)]
    try:
        await _until(lambda: served.api.answers.used > 0, "the unread answers to be held")
        # The send timeout, not the client, ends them: the bytes come back.
        await _until(lambda: served.api.answers.used == 0, "the unread answers to be freed")
        for sock in held:
            # Aborted: what the kernel had taken arrives, then the end, not the rest.
            assert len(await asyncio.to_thread(_read_to_end, sock)) < len(whole)
    finally:
        for sock in held:
            sock.close()
    status, body, _ = await _get(served.url + PATH)
    assert (status, body) == (200, whole)


def _read_to_end(sock: socket.socket) -> bytes:
    """All a socket receives until the other end closes or resets it (10 s at most)."""
    sock.setblocking(True)
    sock.settimeout(10)
    received = b""
    try:
        while chunk := sock.recv(1 << 16):
            received += chunk
    except ConnectionResetError:
        pass
    return received


async def test_a_client_that_hangs_up_without_reading_gives_its_bytes_back_at_once(
    store: Store, serve: Serve
) -> None:
    served = await serve(store, send_timeout_s=60)
    held = await _ask_and_never_read(served)
    await _until(lambda: served.api.answers.used > 0, "the unread answer to be held")
    held.close()
    await _until(lambda: served.api.answers.used == 0, "the hung-up client's bytes to be freed")


async def test_clients_that_read_get_whole_answers_and_the_budget_is_empty_after(
    store: Store, serve: Serve
) -> None:
    served = await serve(store)
    expected = await store.pivot("trace_id", TRACE)
    answers = await asyncio.gather(*(_get(served.url + PATH) for _ in range(10)))
    for status, body, headers in answers:
        assert status == 200
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        assert int(headers["Content-Length"]) == len(body)
        listed = json.loads(body)["predictions"]
        assert [p["prediction_id"] for p in listed] == [p["prediction_id"] for p in expected[0]]
        assert all(p["attributes"] == {"k": ATTRIBUTE} for p in listed)
    assert served.api.answers.used == 0
    status, body, _ = await _get(f"{served.url}/v1/traces/{'12' * 16}")
    assert status == 404 and "no predictions" in json.loads(body)["error"]
    assert served.api.answers.used == 0


class _Stall:
    """Turned into text (``default=str``) only once ``release`` is set (10 s at most)."""

    def __init__(self) -> None:
        self.encoding, self.release = threading.Event(), threading.Event()

    def __str__(self) -> str:
        self.encoding.set()
        self.release.wait(10)
        return "stalled"


class _StallingService:
    """A pivot whose answer holds a value that encodes slowly (a stand-in for a big one)."""

    def __init__(self, store: Store, value: _Stall) -> None:
        self.store, self.value, self.registry = store, value, None

    async def pivot(self, column: str, value: object, limit: int) -> list[dict[str, object]]:
        return [{"prediction_id": "p", "value": self.value, "lineage": {"complete": True}}]


async def test_healthz_is_answered_while_a_big_answer_is_being_encoded(
    store: Store, serve: Serve
) -> None:
    stall = _Stall()
    served = await serve(cast(LineageService, _StallingService(store, stall)))

    def probe() -> tuple[int, bytes] | str:
        # From a thread: were the answer encoded on the event loop, the
        # loop would wait with it, and this client with the loop.
        try:
            if not stall.encoding.wait(10):
                return "the answer was not encoded"
            connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
            try:
                connection.request("GET", "/healthz")
                response = connection.getresponse()
                return response.status, response.read()
            except OSError as exc:
                return f"/healthz not answered: {exc!r}"
            finally:
                connection.close()
        finally:
            stall.release.set()

    query = asyncio.create_task(_get(served.url + PATH))
    assert await asyncio.to_thread(probe) == (200, b"ok")
    status, body, _ = await query
    assert status == 200 and json.loads(body)["predictions"][0]["value"] == "stalled"


@pytest.mark.parametrize(
    "data",
    [
        {
            "query": "trace ab",
            "predictions": [{"a": [1, 2.5, None, True], "é": "ü\n\x00"}, {}, "x"],
            "empty": [],
            "nested": {"l": [{"b": 1}]},
            "when": datetime.datetime(2024, 5, 1, tzinfo=datetime.UTC),
        },
        {1: "non-text keys", "b": [1]},
        [{"a": 1}, {"b": 2}],
        {"rows": [{"k": "v" * 5000, "n": i} for i in range(100)]},
    ],
)
def test_an_answer_encoded_a_row_at_a_time_is_the_json_it_was(data: object) -> None:
    assert b"".join(_answers.encode_json(data)) == json.dumps(data, default=str).encode()

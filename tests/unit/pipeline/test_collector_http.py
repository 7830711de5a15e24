"""CollectorHttpExporter against a real aiohttp server: how answers are classified.

RELIABILITY rows 3, 4, 5 and 6 (the per-attempt timeout), plus the token rules
of DESIGN §5.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from predtrace.sidecar.pipeline import (
    BATCH_CONTENT_TYPE,
    CollectorClient,
    CollectorClientConfig,
    CollectorHttpExporter,
    OutgoingBatch,
    PermanentExportError,
    QueueConfig,
    QueuedExporter,
    RetryableExportError,
    RetryPolicy,
    parse_retry_after,
)
from predtrace.sidecar.pipeline._collector_http import without_userinfo
from predtrace.wire import (
    IngestAck,
    ModelRef,
    PredictionEvent,
    Rejection,
    decode_batch,
    encode_ack,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeCollector:
    """A real aiohttp server on 127.0.0.1:0, in its own thread, answering from a script."""

    handler: Handler | None = None
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    state = FakeCollector()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    async def ingest(request: web.Request) -> web.StreamResponse:
        state.bodies.append(await request.read())
        state.headers.append(dict(request.headers))
        if state.handler is not None:
            return await state.handler(request)
        decoded = decode_batch(state.bodies[-1])
        ack = IngestAck(decoded.batch.producer_id, decoded.batch.seq, len(decoded.batch.events))
        return web.Response(body=encode_ack(ack), content_type=BATCH_CONTENT_TYPE)

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/batches", ingest)
        runner = web.AppRunner(app, shutdown_timeout=0.2)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        state.url = f"http://127.0.0.1:{port}"
        ready.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    thread.start()
    assert ready.wait(10)
    yield state
    assert stop is not None
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()


def _events(n: int) -> list[PredictionEvent]:
    return [PredictionEvent(prediction_id=f"e{i}", trace_id=bytes(16)) for i in range(n)]


def _exporter(url: str, **kwargs: object) -> CollectorHttpExporter:
    return CollectorHttpExporter(CollectorClientConfig(url=url, **kwargs), producer_prefix="svc")  # type: ignore[arg-type]


def test_batches_are_numbered_chained_gzipped_and_authorised(collector: FakeCollector) -> None:
    exporter = _exporter(collector.url, token="s3cret")
    try:
        for _ in range(3):
            result = exporter.export(OutgoingBatch(_events(4)))
            assert result.accepted == 4
    finally:
        exporter.shutdown(1)
    decoded = [decode_batch(body) for body in collector.bodies]
    assert [d.batch.seq for d in decoded] == [1, 2, 3]
    assert {d.batch.producer_id for d in decoded} == {exporter.producer_id}
    assert exporter.producer_id.startswith("svc-")
    assert decoded[0].batch.prev_digest == b""
    assert decoded[1].batch.prev_digest == decoded[0].digest
    assert decoded[2].batch.prev_digest == decoded[1].digest
    # aiohttp's server inflates Content-Encoding: gzip before the handler;
    # the wire size shows the body travelled compressed.
    assert collector.headers[0]["Content-Encoding"] == "gzip"
    assert int(collector.headers[0]["Content-Length"]) < len(collector.bodies[0])
    assert collector.headers[0]["Authorization"] == "Bearer s3cret"


def test_partial_success_is_read_from_the_ack(collector: FakeCollector) -> None:
    async def partial(request: web.Request) -> web.Response:
        ack = IngestAck("p", 1, 3, (Rejection(2, "bad span_id", "e2"),))
        return web.Response(body=encode_ack(ack))

    collector.handler = partial
    exporter = _exporter(collector.url)
    try:
        result = exporter.export(OutgoingBatch(_events(4)))
    finally:
        exporter.shutdown(1)
    assert result.accepted == 3
    assert result.rejected == (Rejection(2, "bad span_id", "e2"),)


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_transient_statuses_are_retryable_with_retry_after(
    collector: FakeCollector, status: int
) -> None:
    async def busy(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Retry-After": "7"}, text="busy")

    collector.handler = busy
    exporter = _exporter(collector.url)
    try:
        with pytest.raises(RetryableExportError) as info:
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)
    assert info.value.retry_after == 7.0


@pytest.mark.parametrize("status", [400, 409, 413])
def test_client_errors_are_permanent_with_the_reason(collector: FakeCollector, status: int) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=status, text="events must be an array")

    collector.handler = refuse
    exporter = _exporter(collector.url)
    try:
        with pytest.raises(PermanentExportError, match=f"{status}: events must be an array"):
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_is_retryable_and_says_what_to_check(
    collector: FakeCollector, status: int
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=status, text="token not allowed for producer svc-1")

    collector.handler = refuse
    exporter = _exporter(collector.url)
    try:
        with pytest.raises(RetryableExportError, match="check the token") as info:
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)
    assert info.value.status == status
    assert "not allowed for producer svc-1" in str(info.value)


def test_unreadable_ack_is_retryable(collector: FakeCollector) -> None:
    async def garbage(request: web.Request) -> web.Response:
        return web.Response(body=b"\xc1\xc1")

    collector.handler = garbage
    exporter = _exporter(collector.url)
    try:
        with pytest.raises(RetryableExportError, match="unreadable ack"):
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exporter = _exporter(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(RetryableExportError) as info:
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)
    # Where and why, not only an exception class (shown by status and in the log).
    message = str(info.value)
    assert message.startswith(f"collector unreachable at http://127.0.0.1:{port}/v1/batches: ")
    assert "Connect call failed" in message or "Connection refused" in message, message


def test_server_that_never_answers_hits_the_attempt_timeout(collector: FakeCollector) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.Response()

    collector.handler = hang
    exporter = _exporter(collector.url, timeout=0.3)
    try:
        with pytest.raises(RetryableExportError, match="TimeoutError"):
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)


def test_set_deadline_cuts_the_attempt_in_flight(collector: FakeCollector) -> None:
    """The collector timeout (here 60 s) outlived the pipeline's shutdown
    deadline: the deadline given while the POST hangs now ends it."""
    finished = threading.Event()

    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        finished.set()
        return web.Response()

    collector.handler = hang
    exporter = _exporter(collector.url, timeout=60)
    outcome: list[BaseException] = []

    def export() -> None:
        try:
            exporter.export(OutgoingBatch(_events(1)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=export)
    worker.start()
    for _ in range(1000):  # the POST reached the collector
        if collector.bodies:
            break
        time.sleep(0.01)
    assert collector.bodies
    exporter.set_deadline(0.05)
    worker.join(30)
    try:
        assert not worker.is_alive()
        assert not finished.is_set()  # cut while the collector still hangs
        assert len(outcome) == 1 and isinstance(outcome[0], RetryableExportError)
        assert "deadline" in str(outcome[0])
    finally:
        exporter.shutdown(1)


def test_a_deadline_bounds_the_next_attempt_until_shutdown_clears_it(
    collector: FakeCollector,
) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response()

    collector.handler = hang
    exporter = _exporter(collector.url, timeout=60)
    try:
        exporter.set_deadline(0)
        with pytest.raises(RetryableExportError, match="deadline"):
            exporter.export(OutgoingBatch(_events(1)))
        exporter.shutdown(1)
        collector.handler = None
        assert exporter.export(OutgoingBatch(_events(1))).accepted == 1
    finally:
        exporter.shutdown(1)


def test_a_send_racing_close_fails_retryably_and_opens_no_new_session(
    collector: FakeCollector,
) -> None:
    """A shipper still retrying while the app closes its client must not leak a session."""

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(status=503)

    collector.handler = slow

    async def scenario() -> None:
        client = CollectorClient(CollectorClientConfig(url=collector.url, timeout=5))
        in_flight = asyncio.create_task(client.send(b"x", compressed=False))
        await asyncio.sleep(0.1)  # the POST is on the wire
        await client.close()
        with pytest.raises(RetryableExportError):
            await in_flight
        with pytest.raises(RetryableExportError, match="closed"):
            await client.send(b"x", compressed=False)  # the retry
        assert client._session is None

    asyncio.run(scenario())


def test_an_exporter_shut_down_and_used_again_opens_a_fresh_session(
    collector: FakeCollector,
) -> None:
    exporter = _exporter(collector.url)
    try:
        exporter.export(OutgoingBatch(_events(1)))
        exporter.shutdown(1)
        exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)
    assert len(collector.bodies) == 2


def test_retry_resends_identical_bytes_with_the_same_seq(collector: FakeCollector) -> None:
    answers = iter([503, 503, 200])

    async def flaky(request: web.Request) -> web.Response:
        status = next(answers)
        if status != 200:
            return web.Response(status=status, headers={"Retry-After": "0"})
        decoded = decode_batch(await request.read())
        return web.Response(body=encode_ack(IngestAck("p", decoded.batch.seq, 2)))

    collector.handler = flaky
    exporter = _exporter(collector.url)
    policy = RetryPolicy(initial_backoff=0.001, max_backoff=0.01)
    pipeline = QueuedExporter(exporter, QueueConfig(retry=policy))
    for event in _events(2):
        pipeline.emit(event)
    pipeline.shutdown(timeout=10)
    assert len(collector.bodies) == 3
    assert collector.bodies[0] == collector.bodies[1] == collector.bodies[2]
    assert pipeline.counters.snapshot()["exported"] == 2


def test_an_event_the_collector_would_refuse_is_dropped_alone_not_with_its_batch(
    collector: FakeCollector,
) -> None:
    pipeline = QueuedExporter(_exporter(collector.url), QueueConfig())
    huge = PredictionEvent(prediction_id="huge", model=ModelRef("m" * 70_000, "1"))
    for event in [*_events(3), huge, *_events(2)]:
        pipeline.emit(event)
    pipeline.shutdown(timeout=10)
    stored = [e.prediction_id for b in collector.bodies for e in decode_batch(b).batch.events]
    assert sorted(stored) == ["e0", "e0", "e1", "e1", "e2"]
    counts = pipeline.counters.snapshot()
    assert counts["exported"] == 5 and counts["dropped.invalid"] == 1


def test_token_over_plaintext_to_a_remote_host_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match="refusing to send a bearer token over plaintext"):
        CollectorClientConfig(url="http://collector.internal:8700", token="t")
    # Loopback and TLS are fine.
    CollectorClientConfig(url="http://127.0.0.1:8700", token="t")
    CollectorClientConfig(url="http://[::1]:8700", token="t")
    CollectorClientConfig(url="https://collector.internal", token="t")


def test_config_repr_never_shows_the_token() -> None:
    config = CollectorClientConfig(url="http://localhost:1", token="super-secret-token")
    assert "super-secret-token" not in repr(config)
    assert "super-secret-token" not in str(config)


@pytest.mark.parametrize("url", ["collector:8700", "ftp://x", "http://"])
def test_bad_collector_url_fails_at_startup(url: str) -> None:
    with pytest.raises(ValueError, match="collector URL"):
        CollectorClientConfig(url=url)


def test_parse_retry_after_reads_seconds_and_dates() -> None:
    assert parse_retry_after("30") == 30.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_a_missing_ca_file_fails_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CA file"):
        CollectorClientConfig(url="https://collector:8443", ca_file=str(tmp_path / "nope.pem"))


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, 404, 405])
def test_an_answer_from_no_ingest_endpoint_is_retryable_and_names_the_url(
    collector: FakeCollector, status: int
) -> None:
    # A wrong path prefix, a proxy or a captive portal: not the batch's fault.
    async def elsewhere(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": "/v1/batches"}, text="moved")

    collector.handler = elsewhere
    exporter = _exporter(collector.url, token="s3cret")
    try:
        with pytest.raises(RetryableExportError, match="not an ingest endpoint") as info:
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)
    assert info.value.status == status
    assert f"{collector.url}/v1/batches" in str(info.value)
    assert len(collector.bodies) == 1, "a redirect is never followed (nor the token resent)"


def test_a_2xx_that_is_no_ack_is_retryable_not_permanent(collector: FakeCollector) -> None:
    async def portal(request: web.Request) -> web.Response:
        return web.Response(text="<html>log in to the wifi</html>", content_type="text/html")

    collector.handler = portal
    exporter = _exporter(collector.url)
    try:
        with pytest.raises(RetryableExportError, match="unreadable ack") as info:
            exporter.export(OutgoingBatch(_events(1)))
    finally:
        exporter.shutdown(1)
    assert info.value.status == 200


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf"), 3601.0])
def test_an_unusable_collector_timeout_fails_at_startup(timeout: float) -> None:
    with pytest.raises(ValueError, match="collector timeout must be > 0 and at most 3600"):
        CollectorClientConfig(url="http://127.0.0.1:8700", timeout=timeout)
    assert CollectorClientConfig(url="http://127.0.0.1:8700", timeout=3600).timeout == 3600


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999", "http://127.0.0.1:0", "http://h:port", "http://[::1]:70000"]
)
def test_a_collector_url_with_an_invalid_port_fails_at_startup(url: str) -> None:
    with pytest.raises(ValueError, match="invalid port"):
        CollectorClientConfig(url=url)


@pytest.mark.parametrize(
    "url",
    [
        "http://alice:s3cret@127.0.0.1:8700",
        "https://s3cret@collector.internal:8443/prefix",
        "ftp://alice:s3cret@collector",
        "http://alice:s3cret@127.0.0.1:99999",
    ],
)
def test_credentials_in_the_collector_url_are_refused_without_echoing_them(url: str) -> None:
    # They would go out as Basic auth and show wherever the URL is shown.
    with pytest.raises(ValueError, match="must not carry a user name or password") as info:
        CollectorClientConfig(url=url)
    assert "s3cret" not in str(info.value)
    assert "bearer token" in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://alice:s3cret@collector:8700/x?y=1", "http://collector:8700/x?y=1"),
        ("https://s3cret@[::1]:8443", "https://[::1]:8443"),
        ("http://a:s3cret@b@collector/", "http://collector/"),
        ("http://alice:s3cret@[::1", "http://[::1"),  # not even a URL
        ("http://collector:8700/user@example", "http://collector:8700/user@example"),
    ],
)
def test_what_is_shown_of_a_url_never_holds_a_user_name_or_password(url: str, shown: str) -> None:
    assert without_userinfo(url) == shown

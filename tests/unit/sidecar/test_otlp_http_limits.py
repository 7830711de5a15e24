"""The OTLP receiver's limits: bodies cut off, stalled or too many at once; bombs of spans.

Each test runs a real receiver on 127.0.0.1 port 0 (in the test's event loop)
in front of an in-memory intake, with real clients: raw sockets where a client
must misbehave in ways an HTTP library will not (stall, hang up mid-body).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from predtrace.cli._serving import MAX_HEADERS
from predtrace.sidecar import _otlp, _otlp_http, _otlp_protobuf
from predtrace.sidecar._intake import IntakeResult
from predtrace.sidecar._otlp import OtlpReceiver
from predtrace.sidecar._otlp_body import BodyRefusedError, count_spans
from predtrace.sidecar._protowire import encode_varint
from predtrace.wire import PredictionEvent
from tests.reliability.sidecar.polling import eventually

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
ExportRequest = trace_service_pb2.ExportTraceServiceRequest
KiB = 1024


@dataclass
class MemoryIntake:
    """Takes every event (the receiver's intake, without a spool)."""

    events: list[PredictionEvent] = field(default_factory=list)
    refused: int = 0

    async def record(self, events: Sequence[PredictionEvent]) -> IntakeResult:
        self.events.extend(events)
        return IntakeResult(len(events))

    def count_refused(self, count: int) -> None:
        self.refused += count


@dataclass
class Listening:
    """A started receiver: its HTTP address and, if asked for, its gRPC one."""

    receiver: OtlpReceiver
    intake: MemoryIntake
    http: str
    grpc: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.http}/v1/traces"


StartReceiver = Callable[..., Awaitable[Listening]]


@pytest.fixture
async def start_receiver() -> AsyncIterator[StartReceiver]:
    started: list[tuple[OtlpReceiver, grpc.aio.Server]] = []

    async def start(**http_options: Any) -> Listening:
        intake = MemoryIntake()
        receiver = OtlpReceiver(intake, None)  # type: ignore[arg-type]
        server = grpc.aio.server()
        receiver.add_to_grpc_server(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started.append((receiver, server))
        http_options.setdefault("max_body", 4 * 1024 * KiB)
        http = await receiver.start_http("127.0.0.1:0", **http_options)
        return Listening(receiver, intake, http, f"127.0.0.1:{port}")

    yield start
    for receiver, server in started:
        await receiver.stop()
        await server.stop(None)


def _record_refusals(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The HTTP status of every refusal the receiver answers, in order."""
    statuses: list[int] = []
    answer = _otlp_http.refusal_response

    def recording(refused: BodyRefusedError, content_type: str) -> aiohttp.web.Response:
        statuses.append(refused.status)
        return answer(refused, content_type)

    monkeypatch.setattr(_otlp_http, "refusal_response", recording)
    return statuses


def _headers(address: str, length: int) -> bytes:
    return (
        f"POST /v1/traces HTTP/1.1\r\nHost: {address}\r\nContent-Type: {PROTOBUF}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _cut_off_uploads(address: str, payload: bytes, count: int) -> None:
    """``count`` uploads that announce one byte more than ``payload``, then hang up."""
    host, port = address.rsplit(":", 1)
    for _ in range(count):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(_headers(address, len(payload) + 1))
            sock.sendall(payload)


async def test_an_upload_cut_off_mid_body_leaves_nothing_of_it_held(
    start_receiver: StartReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sidecar runs the cyclic GC rarely: what a cut-off upload leaves in a
    # reference cycle (exception -> traceback -> frame -> chunks) is held for
    # good. With the GC off, only plain reference counting frees the body.
    listening = await start_receiver()
    refused = _record_refusals(monkeypatch)
    payload = b"\x0a" * (1024 * KiB - 1)  # allocated before tracing starts
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await asyncio.to_thread(_cut_off_uploads, listening.http, payload, 4)
        await eventually(lambda: len(refused) == 4)
        await eventually(lambda: listening.receiver.inflight_bytes == 0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert refused == [400] * 4
    assert held < 512 * KiB, f"{held} bytes still held after 4 uploads of 1 MiB cut off"


async def _open_upload(address: str, declared: int, sent: int) -> asyncio.StreamReader:
    """An upload announcing ``declared`` bytes that sends ``sent`` of them, then waits."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(_headers(address, declared) + b"\x0a" * sent)
    await writer.drain()
    _writers.append(writer)
    return reader


_writers: list[asyncio.StreamWriter] = []


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    while _writers:
        _writers.pop().close()


async def _response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-cased names) and body of an HTTP/1.1 response."""
    status_line = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


async def test_bodies_past_the_in_flight_budget_get_503_with_retry_after_until_bytes_free(
    start_receiver: StartReceiver,
) -> None:
    listening = await start_receiver(max_body=256 * KiB, inflight_bytes=512 * KiB)
    for _ in range(2):  # two uploads stall 56 KiB short of their end
        await _open_upload(listening.http, declared=256 * KiB, sent=200 * KiB)
    await eventually(lambda: listening.receiver.inflight_bytes == 400 * KiB)
    third = await _open_upload(listening.http, declared=256 * KiB, sent=200 * KiB)
    status, headers, body = await asyncio.wait_for(_response(third), 10)
    assert (status, headers["retry-after"]) == (503, "1")
    assert headers["content-type"] == PROTOBUF
    assert "in flight" in status_pb2.Status.FromString(body).message
    assert listening.receiver.inflight_bytes == 400 * KiB, "the refused body holds nothing"
    while _writers:  # the stalled clients give up: their bytes are freed
        _writers.pop().close()
    await eventually(lambda: listening.receiver.inflight_bytes == 0)
    request = _request_with_spans(3)
    async with (
        aiohttp.ClientSession() as session,
        session.post(listening.url, data=request, headers={"Content-Type": PROTOBUF}) as resp,
    ):
        assert resp.status == 200


async def test_a_body_that_stalls_past_the_read_timeout_gets_408_and_frees_its_bytes(
    start_receiver: StartReceiver,
) -> None:
    listening = await start_receiver(body_timeout=0.3)
    stalled = await _open_upload(listening.http, declared=100 * KiB, sent=10 * KiB)
    status, _, body = await asyncio.wait_for(_response(stalled), 10)
    assert status == 408
    assert "not received within 0.3 s" in status_pb2.Status.FromString(body).message
    await eventually(lambda: listening.receiver.inflight_bytes == 0)


def _json_export(spans: int) -> bytes:
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "name": "predict",
        "attributes": [{"key": "http.route", "value": {"stringValue": "/predict"}}],
    }
    document = {"resourceSpans": [{"scopeSpans": [{"spans": [span] * spans}]}]}
    return json_format.json.dumps(document).encode()  # type: ignore[attr-defined]


async def test_a_json_body_over_16_kib_is_parsed_off_the_loop_a_small_one_on_it(
    start_receiver: StartReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 87,000 ``{}`` spans fit in 256 KiB and cost the loop close to a second.
    listening = await start_receiver()
    loop_thread = threading.current_thread()
    parsed_in: list[threading.Thread] = []
    parse = _otlp.parse_json

    def recording(body: bytes) -> ExportRequest:
        parsed_in.append(threading.current_thread())
        return parse(body)

    monkeypatch.setattr(_otlp, "parse_json", recording)
    small, big = _json_export(1), _json_export(200)
    assert len(small) < 1 * KiB and 16 * KiB < len(big) < 64 * KiB
    async with aiohttp.ClientSession() as session:
        for body in (small, big):
            async with session.post(listening.url, data=body, headers={"Content-Type": JSON}) as r:
                assert r.status == 200
    assert parsed_in[0] is loop_thread, "a small export is parsed where it arrives"
    assert parsed_in[1] is not loop_thread, "a 16 KiB+ JSON body is parsed in a thread"


def _field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _empty_spans(count: int) -> bytes:
    """An ExportTraceServiceRequest of ``count`` empty spans: two bytes each."""
    return _field(1, _field(2, b"\x12\x00" * count))


def _request_with_spans(count: int) -> bytes:
    request = ExportRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for k in range(count):
        span = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=k.to_bytes(8, "big"))
        span.attributes.add(key="predtrace.prediction.id").value.string_value = f"p-{k}"
    return request.SerializeToString()


class _CountingParser:
    """Stands in for the request type: counts full parses."""

    calls = 0

    @classmethod
    def FromString(cls, body: bytes) -> ExportRequest:
        cls.calls += 1
        return ExportRequest.FromString(body)


async def test_a_protobuf_bomb_of_empty_spans_is_refused_before_it_is_parsed(
    start_receiver: StartReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 200,000 empty spans in 400 kB would cost some 36 MB parsed (2 million: 360 MB).
    listening = await start_receiver()
    monkeypatch.setattr(_otlp_protobuf, "ExportRequest", _CountingParser)
    # Also behind groups (protobuf skips them and parses on; the count must too).
    empty_group, nested_groups = b"\x7b\x7c", b"\x7b\x83\x01\x0a\x01x\x84\x01\x7c"
    for bomb in (
        _empty_spans(200_000),
        empty_group + _empty_spans(200_000),
        nested_groups + _empty_spans(200_000),
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.post(listening.url, data=bomb, headers={"Content-Type": PROTOBUF}) as resp,
        ):
            assert resp.status == 413
            reason = status_pb2.Status.FromString(await resp.read()).message
            assert reason == "more than 100000 spans in one request"
        async with grpc.aio.insecure_channel(listening.grpc) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(EXPORT)(bomb)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details() == "more than 100000 spans in one request"
    assert _CountingParser.calls == 0, "refused from a count of the wire, not after parsing"
    # A big real batch is far within the bound, and is taken.
    async with grpc.aio.insecure_channel(listening.grpc) as channel:
        await channel.unary_unary(EXPORT)(_request_with_spans(5000))
    assert len(listening.intake.events) == 5000


def test_the_span_count_walks_every_resource_and_scope_and_skips_other_fields() -> None:
    request = ExportRequest()
    for resources in range(3):
        resource_spans = request.resource_spans.add(schema_url="https://x")
        resource_spans.resource.attributes.add(key="service.name").value.string_value = "s"
        for scopes in range(2):
            scope = resource_spans.scope_spans.add(schema_url="https://y")
            scope.scope.name = "lib"
            for k in range(resources + scopes + 1):
                scope.spans.add(name="s", start_time_unix_nano=2**62 + k, trace_id=b"t" * 16)
    body = request.SerializeToString() + _field(99, b"an unknown field")
    assert count_spans(body, 1000) == 3 + 5 + 7
    assert count_spans(body, 4) == 5, "the count stops once past the bound"
    assert count_spans(body[:-30], 1000) <= 15, "cut-off bytes end the count"


def _bad_utf8_request() -> bytes:
    body = _request_with_spans(1)
    name = b"\x07predict"  # the span's name, and its length
    assert body.count(name) == 1
    return body.replace(name, b"\x07pr\xffdict")


def _protobuf_reason(body: bytes) -> str:
    """What the protobuf library says of ``body``, without its preamble."""
    with pytest.raises(_otlp.DecodeError) as info:
        ExportRequest.FromString(body)
    return str(info.value).rpartition("': ")[2]


async def test_a_malformed_protobuf_export_is_refused_with_the_parsers_reason(
    start_receiver: StartReceiver,
) -> None:
    listening = await start_receiver()
    bad_utf8 = _bad_utf8_request()
    reason = _protobuf_reason(bad_utf8)
    assert "UTF-8" in reason, reason
    async with grpc.aio.insecure_channel(listening.grpc) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await channel.unary_unary(EXPORT)(bad_utf8)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == f"malformed ExportTraceServiceRequest: {reason}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(listening.url, data=bad_utf8, headers={"Content-Type": PROTOBUF}) as resp,
    ):
        assert (resp.status, resp.content_type) == (400, PROTOBUF)
        status = status_pb2.Status.FromString(await resp.read())
        assert status.message == f"malformed OTLP protobuf body: {reason}"
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_a_refused_json_export_is_answered_with_a_json_status(
    start_receiver: StartReceiver,
) -> None:
    listening = await start_receiver()
    async with (
        aiohttp.ClientSession() as session,
        session.post(listening.url, data=b"{not json", headers={"Content-Type": JSON}) as resp,
    ):
        assert (resp.status, resp.content_type) == (400, JSON)
        status = json_format.Parse(await resp.read(), status_pb2.Status())
        assert status.message.startswith("malformed OTLP JSON body: not JSON")
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_big_parses_stay_two_at_once_when_their_callers_give_up() -> None:
    # A gRPC deadline cancels the handler, not the parse in its thread: the
    # next exports must wait for that thread, not start beside it.
    receiver = OtlpReceiver(MemoryIntake(), None)  # type: ignore[arg-type]
    lock, release = threading.Lock(), threading.Event()
    running = peak = 0

    def slow_parse(_: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        release.wait(10)
        with lock:
            running -= 1
        return trace_service_pb2.ExportTraceServiceRequest()

    def body(k: int) -> bytes:  # other bytes: other exports, not retries of one
        return b"\x00" * (_otlp._THREAD_BYTES + 1 + k)

    given_up = [asyncio.create_task(receiver.export(body(k), slow_parse)) for k in range(6)]
    await eventually(lambda: running == 2)
    for task in given_up:
        task.cancel()
    await asyncio.gather(*given_up, return_exceptions=True)
    later = [asyncio.create_task(receiver.export(body(k), slow_parse)) for k in range(6, 10)]
    await asyncio.sleep(0.2)  # time for a wrongly freed slot to start a fifth thread
    assert peak == 2
    release.set()
    await asyncio.wait_for(asyncio.gather(*later), 10)
    assert peak == 2
    await receiver.stop()


async def test_connections_past_the_cap_are_closed_at_once_and_headers_are_bounded(
    start_receiver: StartReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiohttp's defaults let each connection hold about 2 MB of headers,
    # outside the in-flight budget, and any number of connections.
    monkeypatch.setattr(_otlp_http, "MAX_CONNECTIONS", 2)
    listening = await start_receiver()
    host, port = listening.http.rsplit(":", 1)
    held = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(_headers(listening.http, 0))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        # Closed unanswered (a reset: what it sent was never read).
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert listening.receiver.connections_refused == 1
        for _, held_writer in held:
            held_writer.close()
        held = []
        runner = listening.receiver._http._runner  # type: ignore[union-attr]
        assert runner is not None and runner.server is not None
        server = runner.server
        await eventually(lambda: len(server.connections) == 0)  # the closes have been seen
        reader, writer = await asyncio.open_connection(host, int(port))
        many = "".join(f"X-H{k}: v\r\n" for k in range(MAX_HEADERS + 1))
        writer.write(f"GET /v1/traces HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode())
        assert (await asyncio.wait_for(reader.readline(), 5)).split()[1] == b"400"
        writer.close()
    finally:
        for _, held_writer in held:
            held_writer.close()

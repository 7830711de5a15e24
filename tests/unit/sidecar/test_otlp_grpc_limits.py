"""The OTLP/gRPC receiver's share of the in-flight byte budget it has with OTLP/HTTP.

Each call holds its request's bytes in the budget until it ends, however it
ends; past the budget a call is refused at once (UNAVAILABLE + RetryInfo),
not left waiting with its body for a parse slot. Real gRPC and HTTP servers
on 127.0.0.1 port 0, real clients; parses are held back where a test needs
calls in flight.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from predtrace.sidecar import _otlp
from predtrace.sidecar._intake import IntakeResult
from predtrace.sidecar._metrics import SidecarMetrics
from predtrace.sidecar._otlp import OtlpReceiver
from predtrace.sidecar._protowire import encode_varint
from predtrace.wire import PredictionEvent
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar

PROTOBUF = "application/x-protobuf"
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
ExportRequest = trace_service_pb2.ExportTraceServiceRequest
ExportResponse = trace_service_pb2.ExportTraceServiceResponse
KiB = 1024


@dataclass
class MemoryIntake:
    """Takes every event (the receiver's intake, without a spool)."""

    events: list[PredictionEvent] = field(default_factory=list)

    async def record(self, events: Sequence[PredictionEvent]) -> IntakeResult:
        self.events.extend(events)
        return IntakeResult(len(events))

    def count_refused(self, count: int) -> None:
        pass


@dataclass
class Listening:
    """A started receiver and its gRPC address."""

    receiver: OtlpReceiver
    intake: MemoryIntake
    grpc: str


@pytest.fixture
async def start_receiver() -> AsyncIterator[Callable[..., Awaitable[Listening]]]:
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
        await receiver.start_http("127.0.0.1:0", **http_options)
        return Listening(receiver, intake, f"127.0.0.1:{port}")

    yield start
    for receiver, server in started:
        await receiver.stop()
        await server.stop(None)


class _HeldParse:
    """Stands in for ``parse_protobuf``: each parse waits until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.waiting = 0
        self._lock = threading.Lock()
        self._parse = _otlp.parse_protobuf

    def __call__(self, body: bytes) -> ExportRequest:
        with self._lock:
            self.waiting += 1
        self.release.wait(10)
        return self._parse(body)


def _field(number: int, payload: bytes) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(len(payload)) + payload


def _export(spans: int, padding: int = 0, tag: str = "p") -> bytes:
    """A request of ``spans`` predictions, and ``padding`` bytes of a field parsers skip.

    Requests of other ``tag``s are other exports; the same bytes again are a retry.
    """
    request = ExportRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for k in range(spans):
        span = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=k.to_bytes(8, "big"))
        span.attributes.add(key="predtrace.prediction.id").value.string_value = f"{tag}-{k}"
    return request.SerializeToString() + (_field(99, b"x" * padding) if padding else b"")


def _retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay in the refusal's ``grpc-status-details-bin`` trailer, if any."""
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    if not details:
        return None
    for detail in status_pb2.Status.FromString(details).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


async def test_a_grpc_export_past_the_in_flight_budget_is_unavailable_at_once_until_bytes_free(
    start_receiver: Callable[..., Awaitable[Listening]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the budget the third call would wait, its body held, for a parse
    # slot: with many connections, memory grew with connections x streams.
    listening = await start_receiver(max_body=256 * KiB, inflight_bytes=512 * KiB)
    receiver = listening.receiver
    held = _HeldParse()
    monkeypatch.setattr(_otlp, "parse_protobuf", held)
    body, other, third_body = (_export(3, padding=200 * KiB, tag=tag) for tag in "abc")
    channels = [grpc.aio.insecure_channel(listening.grpc) for _ in range(3)]
    try:
        first, second, third = (channel.unary_unary(EXPORT) for channel in channels)
        parsing = [asyncio.ensure_future(first(body)), asyncio.ensure_future(second(other))]
        await eventually(lambda: held.waiting == 2)
        assert receiver.inflight_bytes == 2 * len(body)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await third(third_body, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert "in-flight budget" in (info.value.details() or "")
        assert _retry_delay(info.value) == 1.0, "retryable by the OTLP spec, in 1 s"
        assert receiver.budget_refusals == {"grpc": 1, "http": 0}
        assert receiver.inflight_bytes == 2 * len(body), "the refused call holds nothing"
        assert held.waiting == 2, "the refused call was never parsed"
        held.release.set()
        await asyncio.wait_for(asyncio.gather(*parsing), 10)
        assert receiver.inflight_bytes == 0
        await third(third_body, timeout=5)  # the sender's retry is taken
    finally:
        held.release.set()
        for channel in channels:
            await channel.close()
    assert len(listening.intake.events) == 9


async def test_a_grpc_export_holds_its_bytes_while_parsed_and_frees_them_after_success_or_error(
    start_receiver: Callable[..., Awaitable[Listening]], monkeypatch: pytest.MonkeyPatch
) -> None:
    listening = await start_receiver()
    receiver = listening.receiver
    seen: list[int] = []
    parse = _otlp.parse_protobuf

    def watching(body: bytes) -> ExportRequest:
        seen.append(receiver.inflight_bytes)
        return parse(body)

    monkeypatch.setattr(_otlp, "parse_protobuf", watching)
    small, big = _export(2), _export(2, padding=64 * KiB)  # parsed on the loop, in a thread
    name = b"\x07predict"
    malformed = big.replace(name, b"\x07pr\xffdict", 1)  # a string that is not UTF-8
    async with grpc.aio.insecure_channel(listening.grpc) as channel:
        export = channel.unary_unary(EXPORT)
        for body in (small, big):
            await export(body)
            assert seen[-1] == len(body), "held while parsed"
            assert receiver.inflight_bytes == 0, "freed once answered"
        for body in (malformed[:40] + b"\x0a", malformed):  # cut short; not UTF-8
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await export(body)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert seen[-1] == len(body)
            assert receiver.inflight_bytes == 0, "freed once refused"
    assert receiver.budget_refusals == {"grpc": 0, "http": 0}


async def test_a_grpc_export_its_client_gives_up_frees_its_bytes_once_its_work_ends(
    start_receiver: Callable[..., Awaitable[Listening]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The work of an export runs to its end whatever becomes of its call (so
    # that the retry gets its answer); the bytes it holds stay charged until then.
    listening = await start_receiver()
    receiver = listening.receiver
    held = _HeldParse()
    monkeypatch.setattr(_otlp, "parse_protobuf", held)
    body, other = _export(1, padding=64 * KiB, tag="a"), _export(1, padding=64 * KiB, tag="b")
    try:
        async with grpc.aio.insecure_channel(listening.grpc) as channel:
            export = channel.unary_unary(EXPORT)
            timed = asyncio.ensure_future(export(body, timeout=1.0))
            await eventually(lambda: receiver.inflight_bytes == len(body))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await timed
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            cancelled = export(other)
            await eventually(lambda: held.waiting == 2)
            cancelled.cancel()
            await asyncio.sleep(0.2)
            assert receiver.inflight_bytes == len(body) + len(other), "both still parsed"
            held.release.set()
            await eventually(lambda: receiver.inflight_bytes == 0)
            assert sorted(e.prediction_id for e in listening.intake.events) == ["a-0", "b-0"]
    finally:
        held.release.set()


async def test_a_grpc_export_retried_after_its_deadline_is_answered_once_not_spooled_twice(
    start_receiver: Callable[..., Awaitable[Listening]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An OTLP request names no batch: an SDK whose export timed out while the
    # sidecar was still spooling sends the same bytes again. Without the
    # check the events were spooled (and stored) twice.
    listening = await start_receiver()
    receiver = listening.receiver
    held = _HeldParse()
    monkeypatch.setattr(_otlp, "parse_protobuf", held)
    body = _export(3, padding=32 * KiB)
    try:
        async with grpc.aio.insecure_channel(listening.grpc) as channel:
            export = channel.unary_unary(EXPORT)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await export(body, timeout=0.5)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            retry = asyncio.ensure_future(export(body, timeout=10))
            await eventually(lambda: receiver.inflight_bytes == 2 * len(body))
            assert held.waiting == 1, "the retry is not parsed again"
            held.release.set()
            answer = ExportResponse.FromString(await retry)
            assert not answer.HasField("partial_success")
            await export(body, timeout=10)  # once more, after the first is done
            assert receiver.inflight_bytes == 0
        assert held.waiting == 1
        assert receiver.duplicate_exports == 2
        assert sorted(e.prediction_id for e in listening.intake.events) == ["p-0", "p-1", "p-2"]
    finally:
        held.release.set()


async def test_one_in_flight_budget_covers_otlp_grpc_and_http_and_its_refusals_are_counted(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_otlp, "_INFLIGHT_BODIES", 1)  # a budget of one 64 KiB body
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", max_message_bytes=64 * KiB)
    receiver = running.app._otlp
    assert receiver is not None
    address = running.app.addresses["otlp-http"]
    host, port = address.rsplit(":", 1)
    # An HTTP upload that stalls 4 KiB short of its end holds 60 KiB.
    _, stalled = await asyncio.open_connection(host, int(port))
    try:
        stalled.write(
            f"POST /v1/traces HTTP/1.1\r\nHost: {address}\r\nContent-Type: {PROTOBUF}\r\n"
            f"Content-Length: {64 * KiB}\r\n\r\n".encode()
            + b"\x0a" * (60 * KiB)
        )
        await stalled.drain()
        await eventually(lambda: receiver.inflight_bytes == 60 * KiB)
        body = _export(1, padding=8 * KiB)
        async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
            export = channel.unary_unary(EXPORT)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await export(body, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://{address}/v1/traces", data=body, headers={"Content-Type": PROTOBUF}
                ) as resp,
            ):
                assert (resp.status, resp.headers["Retry-After"]) == (503, "1")
            metrics = {
                f"{sample.name}{sample.labels}": sample.value
                for family in SidecarMetrics(running.app).collect()
                for sample in family.samples
            }
            name = "predtrace_sidecar_otlp_busy_refusals_total"
            assert metrics[f"{name}{{'transport': 'grpc'}}"] == 1
            assert metrics[f"{name}{{'transport': 'http'}}"] == 1
            stalled.close()  # the stalled client gives up: its bytes are freed
            await eventually(lambda: receiver.inflight_bytes == 0)
            await export(body, timeout=5)
            # The same bytes again, over HTTP this time: a retry, answered, not spooled.
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"http://{address}/v1/traces", data=body, headers={"Content-Type": PROTOBUF}
                ) as resp,
            ):
                assert resp.status == 200
    finally:
        stalled.close()
    await eventually(lambda: len(running.collector.events()) == 1)
    duplicates = [
        sample.value
        for family in SidecarMetrics(running.app).collect()
        for sample in family.samples
        if sample.name == "predtrace_sidecar_otlp_duplicate_exports_total"
    ]
    assert duplicates == [1]
    await asyncio.sleep(0.3)  # time for a second copy to reach the collector, were it spooled
    assert len(running.collector.events()) == 1

"""The OTLP receiver with the real OpenTelemetry SDK exporters as clients, and the forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcSpanExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpSpanExporter,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import Status, StatusCode

from predtrace.sidecar._config import DeploymentConfig
from predtrace.sidecar._otlp_export import OtlpForwarder
from predtrace.sidecar.pipeline import RetryPolicy
from predtrace.wire import Status as EventStatus
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar


@dataclass
class OtlpSink:
    """An OTLP/HTTP receiver that keeps what it gets (the forwarder's target in T1)."""

    requests: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    status: int = 200
    url: str = ""

    def spans(self) -> list[object]:
        return [
            span
            for request in self.requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def resources(self) -> list[dict[str, str]]:
        return [
            {kv.key: kv.value.string_value for kv in rs.resource.attributes}
            for request in self.requests
            for rs in request.resource_spans
        ]


@contextlib.asynccontextmanager
async def _traces_endpoint(
    receive: Callable[[web.Request], Awaitable[web.Response]],
) -> AsyncIterator[str]:
    """A real OTLP/HTTP ``/v1/traces`` endpoint on 127.0.0.1 port 0; yields its URL."""
    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    finally:
        await runner.cleanup()


@pytest.fixture
async def sink() -> AsyncIterator[OtlpSink]:
    state = OtlpSink()

    async def receive(request: web.Request) -> web.Response:
        if state.status != 200:
            return web.Response(status=state.status)
        body = await request.read()
        state.requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async with _traces_endpoint(receive) as state.url:
        yield state


def produce(exporter: SpanExporter) -> None:
    """An instrumented app: two predictions (one failing) and one unrelated span."""
    provider = TracerProvider(resource=Resource.create({"service.name": "churn-api"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("predict") as span:
        span.set_attribute("predtrace.prediction.id", "pred-1")
        span.set_attribute("predtrace.model.name", "churn")
        span.set_attribute("predtrace.model.version", "3")
        span.set_attribute("http.route", "/predict")
        span.set_attribute("http.response.status_code", 200)
    with tracer.start_as_current_span("predict") as span:
        span.set_attribute("predtrace.prediction.id", "pred-2")
        span.set_attribute("predtrace.model.name", "churn")
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", "ValueError")
    with tracer.start_as_current_span("db.query"):
        pass
    provider.shutdown()


async def start(start_sidecar: StartSidecar, sink: OtlpSink) -> Running:
    running: Running = await start_sidecar(
        otlp_listen="127.0.0.1:0",
        otlp_export=sink.url,
        deployment=DeploymentConfig(pod="churn-7d9f", namespace="ml"),
    )
    return running


async def check(running: Running, sink: OtlpSink) -> None:
    await eventually(lambda: len(running.collector.events()) == 2)
    await eventually(lambda: len(sink.spans()) == 3)
    by_id = {e.prediction_id: e for e in running.collector.events()}
    first, second = by_id["pred-1"], by_id["pred-2"]
    assert (first.model.name, first.model.version) == ("churn", "3")
    assert (first.endpoint, first.status_code, first.status) == ("/predict", "200", EventStatus.OK)
    assert len(first.trace_id) == 16 and len(first.span_id) == 8
    assert first.duration_nanos > 0
    assert first.deployment.service == "churn-api"
    assert (second.status, second.error_type) == (EventStatus.ERROR, "ValueError")
    assert all(r.get("k8s.pod.name") == "churn-7d9f" for r in sink.resources())
    assert all(r.get("service.name") == "churn-api" for r in sink.resources())


async def test_spans_from_the_sdk_grpc_exporter_become_events_and_are_all_forwarded(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running = await start(start_sidecar, sink)
    exporter = GrpcSpanExporter(endpoint=running.app.addresses["otlp-grpc"], insecure=True)
    await asyncio.to_thread(produce, exporter)
    await check(running, sink)


async def test_spans_from_the_sdk_http_exporter_gzip_become_events_and_are_forwarded(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running = await start(start_sidecar, sink)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    exporter = HttpSpanExporter(endpoint=url, compression=Compression.Gzip)
    await asyncio.to_thread(produce, exporter)
    await check(running, sink)


async def test_bad_otlp_http_bodies_get_a_4xx_and_the_receiver_keeps_serving(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running: Running = await start_sidecar(
        otlp_listen="127.0.0.1:0", otlp_export=sink.url, max_message_bytes=64 * 1024
    )
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    proto = {"Content-Type": "application/x-protobuf"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=b"\xff\xff\xff", headers=proto) as resp:
            assert resp.status == 400
        async with session.post(url, data=b"{}", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        snappy = {"Content-Type": "application/json", "Content-Encoding": "snappy"}
        async with session.post(url, data=b"{}", headers=snappy) as r:
            assert r.status == 415 and "Content-Encoding" in await r.text()
        as_json = {"Content-Type": "application/json"}
        for bad in (
            b"{not json",
            b"[1, 2]",
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            b'{"resourceSpans": {"oops": 1}}',
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 7}]}]}]}',
            b"[" * 50_000 + b"]" * 50_000,
        ):
            async with session.post(url, data=bad, headers=as_json) as r:
                assert r.status in (400, 413), (bad[:40], r.status)
                assert r.status == 413 or "malformed OTLP JSON body" in await r.text()
        async with session.post(url, data=b"x" * 100_000, headers=proto) as resp:
            assert resp.status == 413
        bomb = gzip.compress(b"\x00" * 10_000_000)
        async with session.post(url, data=bomb, headers={**proto, "Content-Encoding": "gzip"}) as r:
            assert r.status == 413
    for coding in ("gzip", "deflate"):  # a body that is not what its encoding says
        headers = {"Content-Type": "application/json", "Content-Encoding": coding}
        # A fresh session each time: the server closes such a connection.
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=b"not gzip", headers=headers) as r,
        ):
            assert r.status == 400, (coding, r.status)
            assert "Content-Encoding" in await r.text()
    exporter = HttpSpanExporter(endpoint=url)
    await asyncio.to_thread(produce, exporter)
    await eventually(lambda: len(running.collector.events()) == 2)


def _json_span(prediction_id: str, span_id: str, **extra: object) -> dict[str, object]:
    """One span in OTLP/JSON: hex ids, lowerCamelCase keys, int64 as strings."""
    return {
        "traceId": "5B8EFFF798038103D269B633813FC60C",
        "spanId": span_id,
        "name": "predict",
        "kind": 2,
        "startTimeUnixNano": "1700000000000000000",
        "endTimeUnixNano": "1700000000250000000",
        "attributes": [
            {"key": "predtrace.prediction.id", "value": {"stringValue": prediction_id}},
            {"key": "predtrace.model.name", "value": {"stringValue": "churn"}},
            {"key": "predtrace.model.version", "value": {"stringValue": "4"}},
            {"key": "http.response.status_code", "value": {"intValue": "200"}},
        ],
        **extra,
    }


async def test_otlp_json_bodies_become_events_and_are_forwarded(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running = await start(start_sidecar, sink)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "js-api"}}]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "browser"},
                        "spans": [
                            _json_span("pred-j1", "EEE19B7EC3C1B174"),
                            _json_span(
                                "pred-j2",
                                "EEE19B7EC3C1B175",
                                parentSpanId="EEE19B7EC3C1B173",
                                status={"code": 2, "message": "boom"},
                                links=[{"traceId": "00" * 16, "spanId": "01" * 8}],
                                futureField={"ignored": True},
                            ),
                        ],
                    }
                ],
            }
        ]
    }
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.json() == {}
    await eventually(lambda: len(running.collector.events()) == 2)
    await eventually(lambda: len(sink.spans()) == 2)
    by_id = {e.prediction_id: e for e in running.collector.events()}
    first, second = by_id["pred-j1"], by_id["pred-j2"]
    assert first.trace_id == bytes.fromhex("5b8efff798038103d269b633813fc60c")
    assert first.span_id == bytes.fromhex("eee19b7ec3c1b174")
    assert (first.model.name, first.model.version, first.status_code) == ("churn", "4", "200")
    assert first.duration_nanos == 250_000_000
    assert first.deployment.service == "js-api"
    assert second.status == EventStatus.ERROR


async def test_the_forwarder_drops_oldest_past_its_cap_and_counts_each_reason(
    sink: OtlpSink,
) -> None:
    request = trace_service_pb2.ExportTraceServiceRequest()
    request.resource_spans.add().scope_spans.add().spans.add(name="s", trace_id=b"t" * 16)
    size = len(request.SerializeToString())
    sink.status = 503
    forwarder = OtlpForwarder(
        sink.url,
        max_queue_bytes=size * 3,
        retry=RetryPolicy(initial_backoff=0.01, max_backoff=0.01, max_attempts=2),
    )
    for _ in range(5):
        forwarder.offer(request, 1)
    assert forwarder.counters.dropped == {"queue_full": 2}
    await forwarder.start()
    await eventually(lambda: forwarder.counters.dropped.get("retries_exhausted", 0) >= 1)
    sink.status = 200
    await eventually(lambda: forwarder.counters.forwarded >= 1)
    await forwarder.stop(timeout=1)
    c = forwarder.counters
    assert c.offered == 5
    assert c.forwarded + sum(c.dropped.values()) == 5


async def test_bad_otlp_grpc_requests_are_invalid_argument_and_the_receiver_keeps_serving(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=sink.url)
    # 120 nested AnyValue arrays, deeper than the protobuf parser allows (built
    # as bytes: the Python protobuf runtime refuses to build it as a message).
    deep = common_pb2.AnyValue(string_value="leaf").SerializeToString()
    for _ in range(120):
        deep = _field(5, _field(1, deep))  # AnyValue.array_value.values
    span = trace_pb2.Span(name="s", trace_id=b"t" * 16).SerializeToString()
    span += _field(9, _field(1, b"deep") + _field(2, deep))  # Span.attributes
    nested = _field(1, _field(2, _field(2, span)))  # resource_spans.scope_spans.spans
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
        export = channel.unary_unary(method)
        for body in (b"\xff\xff\xff", nested):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await export(body)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert "malformed" in (info.value.details() or "")
    exporter = GrpcSpanExporter(endpoint=running.app.addresses["otlp-grpc"], insecure=True)
    await asyncio.to_thread(produce, exporter)
    await eventually(lambda: len(running.collector.events()) == 2)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def test_a_big_export_is_parsed_off_the_loop_and_every_prediction_is_kept(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running: Running = await start_sidecar(
        otlp_listen="127.0.0.1:0", otlp_export=sink.url, max_message_bytes=8 * 1024 * 1024
    )
    request = trace_service_pb2.ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for k in range(2000):  # about 600 kB: over the in-loop bound
        span = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=k.to_bytes(8, "big"))
        span.attributes.add(key="predtrace.prediction.id").value.string_value = f"big-{k:04d}"
        span.attributes.add(key="filler").value.string_value = "x" * 200
    body = request.SerializeToString()
    assert len(body) > 256 * 1024
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": "application/x-protobuf"}) as r,
    ):
        assert r.status == 200
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
        await channel.unary_unary(method)(body)
    await eventually(lambda: len(running.collector.events()) >= 4000)
    ids = {e.prediction_id for e in running.collector.events()}
    assert ids == {f"big-{k:04d}" for k in range(2000)}


@dataclass
class FlakySink(OtlpSink):
    """An OTLP/HTTP receiver that answers 503 to its first ``fail_first`` requests."""

    fail_first: int = 1
    attempts: int = 0
    refused: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


@pytest.fixture
async def flaky_sink() -> AsyncIterator[FlakySink]:
    state = FlakySink()

    async def receive(request: web.Request) -> web.Response:
        state.attempts += 1
        body = await request.read()
        if state.attempts <= state.fail_first:
            state.refused.append(body)
            return web.Response(status=503)
        state.bodies.append(body)
        state.requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async with _traces_endpoint(receive) as state.url:
        yield state


async def test_a_forwarded_span_whose_first_attempt_gets_503_is_retried_and_delivered_once(
    start_sidecar: StartSidecar, flaky_sink: FlakySink
) -> None:
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=flaky_sink.url)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    await asyncio.to_thread(produce, HttpSpanExporter(endpoint=url))  # three spans, one each
    await eventually(lambda: len(flaky_sink.spans()) == 3)
    forward = running.app.status_view().otlp_forward
    assert forward is not None
    assert flaky_sink.attempts == 4, "three exports plus the one retry"
    assert forward.retried == 1
    assert (forward.offered, forward.forwarded, forward.dropped) == (3, 3, {})
    names = sorted(span.name for span in flaky_sink.spans())  # type: ignore[attr-defined]
    assert names == ["db.query", "predict", "predict"], "each span delivered exactly once"
    assert flaky_sink.refused[0] in flaky_sink.bodies, "the refused request itself was resent"
    await eventually(lambda: len(running.collector.events()) == 2)  # predictions unaffected

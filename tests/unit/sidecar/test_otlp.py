"""The OTLP receiver with the real OpenTelemetry SDK exporters as clients, and the forwarder."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import threading
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import grpc
import pytest
from aiohttp import web
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
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

from predtrace.sidecar import _otlp
from predtrace.sidecar._config import DeploymentConfig
from predtrace.sidecar._metrics import SidecarMetrics
from predtrace.sidecar._otlp_export import OtlpForwarder
from predtrace.sidecar.pipeline import RetryPolicy
from predtrace.sidecar.spool import MemoryFileLayer, SpoolConfig
from predtrace.wire import Status as EventStatus
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar, traces_endpoint
from .cycles import CycleWatch


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


@pytest.fixture
async def sink() -> AsyncIterator[OtlpSink]:
    state = OtlpSink()

    async def receive(request: web.Request) -> web.Response:
        if state.status != 200:
            return web.Response(status=state.status)
        body = await request.read()
        state.requests.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async with traces_endpoint(receive) as state.url:
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


async def refusal_reason(response: aiohttp.ClientResponse) -> str:
    """The message of a refusal's body: a google.rpc.Status in the request's encoding."""
    body = await response.read()
    if response.content_type == "application/json":
        return json_format.Parse(body, status_pb2.Status()).message
    assert response.content_type == "application/x-protobuf", response.content_type
    return status_pb2.Status.FromString(body).message


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
            assert r.status == 415 and "Content-Encoding" in await refusal_reason(r)
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
                assert r.status == 413 or "malformed OTLP JSON body" in await refusal_reason(r)
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
            assert "Content-Encoding" in await refusal_reason(r)
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
    # One more once the backend is back: under load the three queued may all
    # have run out of retries before the test saw the first of them do so.
    forwarder.offer(request, 1)
    await eventually(lambda: forwarder.counters.forwarded >= 1)
    await forwarder.stop(timeout=1)
    c = forwarder.counters
    assert c.offered == 6
    assert c.forwarded + sum(c.dropped.values()) == 6


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

    def big_body(via: str) -> bytes:
        request = trace_service_pb2.ExportTraceServiceRequest()
        scope = request.resource_spans.add().scope_spans.add()
        for k in range(2000):  # about 600 kB: over the in-loop bound
            trace_id = via.encode()[:1] * 16
            span = scope.spans.add(name="predict", trace_id=trace_id, span_id=k.to_bytes(8, "big"))
            span.attributes.add(key="predtrace.prediction.id").value.string_value = f"{via}-{k:04d}"
            span.attributes.add(key="filler").value.string_value = "x" * 200
        return request.SerializeToString()

    body = big_body("http")
    assert len(body) > 256 * 1024
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": "application/x-protobuf"}) as r,
    ):
        assert r.status == 200
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
        await channel.unary_unary(method)(big_body("grpc"))
    await eventually(lambda: len(running.collector.events()) >= 4000)
    ids = [e.prediction_id for e in running.collector.events()]
    assert sorted(ids) == sorted(f"{via}-{k:04d}" for via in ("http", "grpc") for k in range(2000))


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

    async with traces_endpoint(receive) as state.url:
        yield state


async def test_a_forwarded_span_whose_first_attempt_gets_503_is_retried_and_delivered_once(
    start_sidecar: StartSidecar, flaky_sink: FlakySink
) -> None:
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=flaky_sink.url)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    await asyncio.to_thread(produce, HttpSpanExporter(endpoint=url))  # three spans, one each
    await eventually(lambda: len(flaky_sink.spans()) == 3)

    # The sink holds a span before the forwarder has read its answer: wait
    # for the forwarder's own count, then check every count.
    def all_forwarded() -> bool:
        forward = running.app.status_view().otlp_forward
        return forward is not None and forward.forwarded == 3

    await eventually(all_forwarded)
    forward = running.app.status_view().otlp_forward
    assert forward is not None
    assert flaky_sink.attempts == 4, "three exports plus the one retry"
    assert forward.retried == 1
    assert (forward.offered, forward.forwarded, forward.dropped) == (3, 3, {})
    names = sorted(span.name for span in flaky_sink.spans())  # type: ignore[attr-defined]
    assert names == ["db.query", "predict", "predict"], "each span delivered exactly once"
    assert flaky_sink.refused[0] in flaky_sink.bodies, "the refused request itself was resent"
    await eventually(lambda: len(running.collector.events()) == 2)  # predictions unaffected


async def test_spans_the_backend_refuses_are_counted_as_spans_not_as_lost_predictions(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    sink.status = 400  # permanent: never retried
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=sink.url)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    await asyncio.to_thread(produce, HttpSpanExporter(endpoint=url))  # three spans, one each
    await eventually(lambda: len(running.collector.events()) == 2)  # the predictions are kept

    def metrics() -> dict[str, float]:
        return {
            f"{sample.name}{sample.labels}": sample.value
            for family in SidecarMetrics(running.app).collect()
            for sample in family.samples
        }

    await eventually(
        lambda: (
            metrics().get("predtrace_sidecar_otlp_dropped_spans_total{'reason': 'permanent'}") == 3
        )
    )
    # An alert on lost predictions must not fire for best-effort spans.
    assert not [
        k for k in metrics() if k.startswith("predtrace_sidecar_dropped_events") and "otlp" in k
    ]
    assert running.app.status_view().dropped() == {}


def _camel_to_snake(document: object) -> object:
    """The same OTLP/JSON document with every key in snake_case."""
    if isinstance(document, list):
        return [_camel_to_snake(item) for item in document]
    if not isinstance(document, dict):
        return document
    snake = {
        "".join(f"_{c.lower()}" if c.isupper() else c for c in key): _camel_to_snake(value)
        for key, value in document.items()
    }
    if "key" in snake and "value" in snake:  # an attribute: its AnyValue keeps camelCase
        snake["value"] = document["value"]
    return snake


def _json_request(*spans: dict[str, object]) -> dict[str, object]:
    """An OTLP/JSON export request of ``spans``, lowerCamelCase keys."""
    return {"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]}


async def test_snake_case_otlp_json_gives_the_same_ids_as_camel_case(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running = await start(start_sidecar, sink)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    related = {
        "parentSpanId": "EEE19B7EC3C1B173",
        "links": [{"traceId": "0A" * 16, "spanId": "0B" * 8}],
    }
    camel = _json_request(_json_span("pred-camel", "EEE19B7EC3C1B174", **related))
    snake = _camel_to_snake(_json_request(_json_span("pred-snake", "EEE19B7EC3C1B174", **related)))
    span = snake["resource_spans"][0]["scope_spans"][0]["spans"][0]  # type: ignore[index]
    assert {"trace_id", "span_id", "parent_span_id"} <= span.keys()
    assert span["links"][0].keys() == {"trace_id", "span_id"}
    async with aiohttp.ClientSession() as session:
        for body in (camel, snake):
            async with session.post(url, json=body) as resp:
                assert resp.status == 200
    await eventually(lambda: len(running.collector.events()) == 2)
    await eventually(lambda: len(sink.spans()) == 2)
    ids = {(e.prediction_id, e.trace_id.hex(), e.span_id.hex()) for e in running.collector.events()}
    trace = "5b8efff798038103d269b633813fc60c"
    assert ids == {
        ("pred-camel", trace, "eee19b7ec3c1b174"),
        ("pred-snake", trace, "eee19b7ec3c1b174"),
    }
    forwarded = {
        (s.parent_span_id.hex(), s.links[0].trace_id.hex(), s.links[0].span_id.hex())  # type: ignore[attr-defined]
        for s in sink.spans()
    }
    assert forwarded == {("eee19b7ec3c1b173", "0a" * 16, "0b" * 8)}


# Spans whose predictions the intake must refuse, or keep clipped: (id suffix, attributes, start).
_REFUSABLE: list[tuple[str, dict[str, str], int]] = [
    ("ok", {}, 10),
    ("nul-model", {"predtrace.model.name": "churn\x00"}, 10),
    ("long-route", {"http.route": "/r" * 40_000}, 10),  # 80 KB: clipped, kept
    ("past-int64", {}, 2**63),
    ("long-id" + "x" * 257, {}, 10),
]


def _refusable_request() -> trace_service_pb2.ExportTraceServiceRequest:
    request = trace_service_pb2.ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for suffix, attributes, start in _REFUSABLE:
        span = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=b"s" * 8)
        span.start_time_unix_nano, span.end_time_unix_nano = start, start + 5
        for key, value in {"predtrace.prediction.id": "r-" + suffix, **attributes}.items():
            span.attributes.add(key=key).value.string_value = value
    return request


def _as_otlp_json(request: trace_service_pb2.ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON of a request: protobuf's JSON mapping, with hex ids instead of base64."""
    document = json_format.MessageToDict(request)
    for span in document["resourceSpans"][0]["scopeSpans"][0]["spans"]:
        for key in ("traceId", "spanId"):
            span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(document).encode()


async def _export_refusable(
    running: Running, transport: str
) -> trace_service_pb2.ExportTraceServiceResponse:
    """Export ``_REFUSABLE`` over ``transport``; the Export answer."""
    request = _refusable_request()
    response_type = trace_service_pb2.ExportTraceServiceResponse
    if transport == "grpc":
        method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
            export = channel.unary_unary(method, response_deserializer=response_type.FromString)
            answer: trace_service_pb2.ExportTraceServiceResponse = await export(
                request.SerializeToString()
            )
            return answer
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    as_json = transport == "http-json"
    body = _as_otlp_json(request) if as_json else request.SerializeToString()
    kind = "application/json" if as_json else "application/x-protobuf"
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": kind}) as resp,
    ):
        assert (resp.status, resp.content_type) == (200, kind)
        if as_json:
            return json_format.ParseDict(await resp.json(), response_type())
        return response_type.FromString(await resp.read())


@pytest.mark.parametrize("transport", ["grpc", "http-protobuf", "http-json"])
async def test_refused_predictions_are_named_in_partial_success_and_their_spans_forwarded(
    start_sidecar: StartSidecar, sink: OtlpSink, transport: str
) -> None:
    running = await start(start_sidecar, sink)
    answer = await _export_refusable(running, transport)
    assert answer.HasField("partial_success")
    assert answer.partial_success.rejected_spans == 0, "every span was accepted"
    message = answer.partial_success.error_message
    assert message.startswith("3 prediction event(s) refused"), message
    assert "span 1 of the request" in message and "NUL" in message, message
    await eventually(lambda: len(sink.spans()) == len(_REFUSABLE))
    await eventually(lambda: len(running.collector.events()) == 2)
    by_id = {e.prediction_id: e for e in running.collector.events()}
    assert by_id.keys() == {"r-ok", "r-long-route"}
    assert by_id["r-long-route"].endpoint == "/r" * 512, "clipped to 1024 characters"
    intake = running.app.status_view().intake
    assert (intake.received, intake.accepted, intake.rejected) == (5, 2, 3)


def _one_prediction(prediction_id: str) -> bytes:
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(name="p", trace_id=b"t" * 16)
    span.attributes.add(key="predtrace.prediction.id").value.string_value = prediction_id
    span.attributes.add(key="filler").value.string_value = "the same words again " * 40
    return request.SerializeToString()


async def test_a_compressed_body_cut_short_or_without_its_trailer_is_refused_400(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running = await start(start_sidecar, sink)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    body = _one_prediction("cut")
    gzipped, zlibbed = gzip.compress(body), zlib.compress(body)
    crc_flipped = gzipped[:-8] + bytes([gzipped[-8] ^ 1]) + gzipped[-7:]
    bad = {
        "gzip without its CRC and size trailer": ("gzip", gzipped[:-8]),
        "gzip missing the size": ("gzip", gzipped[:-4]),
        "gzip with a wrong CRC": ("gzip", crc_flipped),
        "gzip cut inside the deflate data": ("gzip", gzipped[: len(gzipped) // 2]),
        "gzip followed by other bytes": ("gzip", gzipped + b"junk"),
        "deflate without its adler32": ("deflate", zlibbed[:-4]),
        "deflate cut inside the data": ("deflate", zlibbed[: len(zlibbed) // 2]),
    }
    for name, (coding, data) in bad.items():
        headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": coding}
        # A fresh session each time: the server may close such a connection.
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=data, headers=headers) as r,
        ):
            assert r.status == 400, (name, r.status)
            assert "Content-Encoding" in await refusal_reason(r), name
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    good = {
        "gzip": ("gzip", gzip.compress(_one_prediction("gzip"))),
        "zlib deflate": ("deflate", zlib.compress(_one_prediction("zlib"))),
        "raw deflate": (
            "deflate",
            raw_deflate.compress(_one_prediction("raw")) + raw_deflate.flush(),
        ),
        "gzip twice": ("gzip", gzip.compress(gzip.compress(_one_prediction("twice")))),
        "two gzip members": ("gzip", gzip.compress(b"") + gzip.compress(_one_prediction("two"))),
    }
    async with aiohttp.ClientSession() as session:
        for name, (coding, data) in good.items():
            headers = {"Content-Type": "application/x-protobuf", "Content-Encoding": coding}
            async with session.post(url, data=data, headers=headers) as r:
                assert r.status == 200, (name, r.status, await r.text())
    await eventually(lambda: len(running.collector.events()) == len(good))
    ids = {e.prediction_id for e in running.collector.events()}
    assert ids == {"gzip", "zlib", "raw", "twice", "two"}, "nothing of the refused bodies was kept"


async def test_at_most_two_big_otlp_bodies_are_parsed_at_once_over_grpc_and_http(
    start_sidecar: StartSidecar, sink: OtlpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start(start_sidecar, sink)
    lock = threading.Lock()
    active, peak, parsed = [0], [0], [0]

    def slow_parse(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)  # long enough for the others to pile up, were they let in
        with lock:
            active[0] -= 1
            parsed[0] += 1
        return trace_service_pb2.ExportTraceServiceRequest()

    monkeypatch.setattr(_otlp, "parse_json", slow_parse)
    monkeypatch.setattr(_otlp, "parse_protobuf", slow_parse)
    # Over the size parsed on the loop; six other bodies, not one sent six times.
    bodies = iter(b"{}" + b" " * (300_000 + k) for k in range(6))
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

    async def over_http(session: aiohttp.ClientSession) -> None:
        big = next(bodies)
        async with session.post(url, data=big, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200

    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel,
    ):
        export = channel.unary_unary(method)
        await asyncio.gather(
            *[over_http(session) for _ in range(3)], *[export(next(bodies)) for _ in range(3)]
        )
    assert parsed[0] == 6
    assert peak[0] <= 2, f"{peak[0]} bodies parsed at once"


def test_a_json_body_of_too_many_objects_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 4 KiB gzip'd, 4 MiB of ``{}``: millions of objects, each walked in Python.
    bomb = b'{"resourceSpans":[' + b"{}," * 1_000_000 + b"{}]}"
    parsed: list[bytes] = []
    monkeypatch.setattr(json, "loads", parsed.append)
    with pytest.raises(_otlp.OtlpJsonError, match="more than 250000 JSON objects"):
        _otlp.parse_json(bomb)
    assert parsed == []  # refused from a count of braces, not after json.loads


def test_a_big_real_json_export_is_within_the_object_bound() -> None:
    # 4,500 spans of 30 attributes: 6.4 MiB, about 280,000 objects (a sidecar
    # with --max-message-bytes 8MiB takes such a body).
    attributes = [{"key": f"k{i}", "value": {"stringValue": "v" * 8}} for i in range(30)]
    span = {
        "traceId": "ab" * 16,
        "spanId": "cd" * 8,
        "name": "predict",
        "startTimeUnixNano": "1",
        "endTimeUnixNano": "2",
        "attributes": attributes,
    }
    document = {"resourceSpans": [{"scopeSpans": [{"spans": [span] * 4500}]}]}
    body = json.dumps(document).encode()
    assert body.count(b"{") > 250_000
    request = _otlp.parse_json(body)
    assert len(request.resource_spans[0].scope_spans[0].spans) == 4500


# OTLP/gRPC codes a sender retries whatever the details (the OTLP spec's
# "Failures" table); RESOURCE_EXHAUSTED only with a RetryInfo.
_ALWAYS_RETRYABLE = {
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS,
}


def _retry_info(status: status_pb2.Status) -> error_details_pb2.RetryInfo | None:
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info
    return None


def _otlp_retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The delay before an OTLP/gRPC sender retries, as the spec has it; None: it drops."""
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
    info = _retry_info(status_pb2.Status.FromString(details)) if details else None
    code = error.code()
    if code not in _ALWAYS_RETRYABLE and not (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED and info is not None
    ):
        return None
    return info.retry_delay.ToTimedelta().total_seconds() if info else 0.0


async def test_a_full_spool_answers_otlp_senders_with_a_retryable_refusal_and_takes_the_retry(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    disk = MemoryFileLayer()
    running: Running = await start_sidecar(
        files=disk,
        spool=SpoolConfig(directory="/spool"),
        otlp_listen="127.0.0.1:0",
        otlp_export=sink.url,
    )
    disk.capacity = disk.used_bytes() + 8  # less than any record
    body = _one_prediction("full")
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await export(body)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        assert _otlp_retry_delay(info.value) == 1.0, "retryable by the OTLP spec, in 1 s"
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers={"Content-Type": "application/x-protobuf"}) as r,
        ):
            assert (r.status, r.headers["Retry-After"]) == (503, "1")
            status = status_pb2.Status.FromString(await r.read())
            assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
            retry = _retry_info(status)
            assert retry is not None and retry.retry_delay.seconds == 1
        disk.capacity = None
        await export(body)  # the sender's retry
    await eventually(lambda: len(running.collector.events()) == 1)
    await eventually(lambda: len(sink.spans()) == 1)  # the refused attempts were not forwarded


def _ids_of_every_type() -> trace_service_pb2.ExportTraceServiceRequest:
    """Spans whose prediction ids are a string, then a bool, an int, bytes, an array, nothing."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    values = [
        common_pb2.AnyValue(string_value="typed-ok"),
        common_pb2.AnyValue(bool_value=True),
        common_pb2.AnyValue(int_value=7),
        common_pb2.AnyValue(bytes_value=b"\x01\x02"),
        common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[{"string_value": "a"}])),
        common_pb2.AnyValue(),
    ]
    for k, value in enumerate(values):
        span = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=bytes([k]) * 8)
        span.attributes.add(key="predtrace.prediction.id").value.CopyFrom(value)
    return request


async def test_a_prediction_id_that_is_not_a_string_refuses_the_prediction_not_the_span(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    running = await start(start_sidecar, sink)
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    response_type = trace_service_pb2.ExportTraceServiceResponse
    async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
        export = channel.unary_unary(method, response_deserializer=response_type.FromString)
        answer = await export(_ids_of_every_type().SerializeToString())
    assert answer.partial_success.rejected_spans == 0, "every span was accepted"
    message = answer.partial_success.error_message
    assert message.startswith("5 prediction event(s) refused, their spans accepted"), message
    assert message.endswith(
        "(span 1 of the request): predtrace.prediction.id must be a string, not bool_value"
    ), message
    await eventually(lambda: len(sink.spans()) == 6)
    await eventually(lambda: len(running.collector.events()) == 1)
    assert [e.prediction_id for e in running.collector.events()] == ["typed-ok"]
    intake = running.app.status_view().intake
    assert (intake.received, intake.accepted, intake.rejected) == (6, 1, 5)


async def test_a_refused_export_leaves_no_cycle_holding_its_body(
    start_sidecar: StartSidecar, sink: OtlpSink
) -> None:
    """A tester saw the sidecar grow by one body per refused export (MBs each), gRPC and HTTP.

    The body stayed in reference cycles (the retry check's task, the parse
    thread's future) that only the cyclic GC frees, which the sidecar runs seldom.
    """
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=sink.url)
    size = 512 * 1024
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    with CycleWatch() as watch:
        async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
            for i in range(3):
                malformed = _field(1, bytes([i]) + b"\xff" * size)  # parsed in a thread: > 16 KiB
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(method)(malformed)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                malformed = _field(1, bytes([i + 3]) + b"\xff" * size)
                proto = {"Content-Type": "application/x-protobuf"}
                async with session.post(url, data=malformed, headers=proto) as resp:
                    assert resp.status == 400
        await asyncio.sleep(0.1)
        assert watch.frames_holding(size) == []

"""The OTLP forwarder against real OTLP/HTTP receivers: partial success, loops, shutdown.

The backends are real aiohttp servers on 127.0.0.1 port 0, or the sidecar's
own receiver (an export URL that leads back to it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from predtrace.sidecar._otlp import OtlpReceiver
from predtrace.sidecar._otlp_export import FORWARDED_BY, OtlpForwarder
from predtrace.sidecar.pipeline import RetryPolicy
from tests.reliability.sidecar.polling import eventually

from .conftest import traces_endpoint
from .test_otlp_http_limits import MemoryIntake

PROTOBUF = "application/x-protobuf"
ExportRequest = trace_service_pb2.ExportTraceServiceRequest
ExportResponse = trace_service_pb2.ExportTraceServiceResponse
_FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.01, max_attempts=2)


def _request(spans: int, *, prediction: str = "") -> ExportRequest:
    request = ExportRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for k in range(spans):
        span = scope.spans.add(name="s", trace_id=b"t" * 16, span_id=k.to_bytes(8, "big"))
        if prediction and k == 0:
            span.attributes.add(key="predtrace.prediction.id").value.string_value = prediction
    return request


@dataclass
class _Partial:
    """The backend's answer: ``rejected`` of the spans, with ``message``, in ``encoding``."""

    rejected: int
    message: str
    encoding: str


@pytest.mark.parametrize("encoding", [PROTOBUF, "application/json"])
async def test_spans_the_backend_rejects_in_partial_success_are_counted_dropped_and_logged(
    encoding: str, caplog: pytest.LogCaptureFixture
) -> None:
    partial = _Partial(2, "2 spans lack a service.name", encoding)

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        answer = ExportResponse()
        answer.partial_success.rejected_spans = partial.rejected
        answer.partial_success.error_message = partial.message
        if partial.encoding == PROTOBUF:
            return web.Response(body=answer.SerializeToString(), content_type=PROTOBUF)
        return web.Response(text=json_format.MessageToJson(answer), content_type=encoding)

    caplog.set_level(logging.WARNING, "predtrace.sidecar.otlp")
    async with traces_endpoint(receive) as url:
        forwarder = OtlpForwarder(url, retry=_FAST)
        await forwarder.start()
        forwarder.offer(_request(3), 3)
        await eventually(lambda: forwarder.counters.forwarded + forwarder.counters.retried > 0)
        await forwarder.stop(timeout=1)
    counters = forwarder.counters
    assert (counters.offered, counters.forwarded, counters.dropped) == (3, 1, {"rejected": 2})
    assert "rejected 2 of 3 spans: 2 spans lack a service.name" in caplog.text


async def test_a_backend_claiming_more_rejected_spans_than_sent_drops_only_those_sent() -> None:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        answer = ExportResponse()
        answer.partial_success.rejected_spans = 1_000
        return web.Response(body=answer.SerializeToString(), content_type=PROTOBUF)

    async with traces_endpoint(receive) as url:
        forwarder = OtlpForwarder(url, retry=_FAST)
        await forwarder.start()
        forwarder.offer(_request(3), 3)
        await eventually(lambda: forwarder.counters.dropped.get("rejected") == 3)
        await forwarder.stop(timeout=1)
    assert forwarder.counters.forwarded == 0


async def test_spans_still_queued_at_shutdown_are_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=503)  # never takes anything

    caplog.set_level(logging.WARNING, "predtrace.sidecar.otlp")
    async with traces_endpoint(receive) as url:
        slow = RetryPolicy(initial_backoff=30, max_backoff=30, max_attempts=5)
        forwarder = OtlpForwarder(url, retry=slow)
        await forwarder.start()
        forwarder.offer(_request(3), 3)
        forwarder.offer(_request(2), 2)
        await eventually(lambda: forwarder.counters.retried == 1)
        await forwarder.stop(timeout=0.05)
    assert forwarder.counters.dropped == {"shutdown": 5}
    lines = [r.getMessage() for r in caplog.records if "not forwarded" in r.getMessage()]
    assert lines == ["OTLP forwarder stopped with 5 span(s) not forwarded: dropped"]


@dataclass
class _Sidecar:
    """A receiver and the forwarder it hands spans to (one sidecar's OTLP half)."""

    receiver: OtlpReceiver
    forwarder: OtlpForwarder
    intake: MemoryIntake
    url: str


@contextlib.asynccontextmanager
async def _sidecars(count: int) -> AsyncIterator[list[_Sidecar]]:
    """``count`` receivers with their forwarders, not yet pointed anywhere."""
    made: list[_Sidecar] = []
    try:
        for _ in range(count):
            intake = MemoryIntake()
            forwarder = OtlpForwarder("http://127.0.0.1:9/v1/traces", retry=_FAST)
            receiver = OtlpReceiver(intake, forwarder)  # type: ignore[arg-type]
            address = await receiver.start_http("127.0.0.1:0", max_body=1 << 20)
            made.append(_Sidecar(receiver, forwarder, intake, f"http://{address}/v1/traces"))
        yield made
    finally:
        for sidecar in made:
            await sidecar.forwarder.stop(timeout=0.5)
            await sidecar.receiver.stop()


async def _export(url: str, request: ExportRequest) -> int:
    body = request.SerializeToString()
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers={"Content-Type": PROTOBUF}) as resp,
    ):
        return resp.status


async def test_an_export_url_leading_back_to_the_sidecar_is_refused_508_not_looped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "predtrace.sidecar.otlp")
    async with _sidecars(1) as (sidecar,):
        sidecar.forwarder.url = sidecar.url  # --otlp-export at its own listener
        await sidecar.forwarder.start()
        assert await _export(sidecar.url, _request(2, prediction="p-1")) == 200
        await eventually(lambda: sidecar.forwarder.counters.dropped == {"loop": 2})
        assert [e.prediction_id for e in sidecar.intake.events] == ["p-1"], "spooled once"
        assert sidecar.forwarder.counters.forwarded == 0
    assert "leads back to this sidecar's own OTLP listener" in caplog.text


async def test_a_loop_through_two_sidecars_stops_where_it_started() -> None:
    async with _sidecars(2) as (first, second):
        first.forwarder.url, second.forwarder.url = second.url, first.url
        await first.forwarder.start()
        await second.forwarder.start()
        assert await _export(first.url, _request(1, prediction="p-2")) == 200
        await eventually(lambda: second.forwarder.counters.dropped == {"loop": 1})
        assert first.forwarder.counters.forwarded == 1, "the first hop is a real one"
        assert [e.prediction_id for e in first.intake.events] == ["p-2"]
        assert [e.prediction_id for e in second.intake.events] == ["p-2"]


async def test_a_request_naming_other_forwarders_only_is_taken() -> None:
    async with _sidecars(1) as (sidecar,):
        headers = {"Content-Type": PROTOBUF, FORWARDED_BY: "0123456789abcdef, another"}
        body = _request(1, prediction="p-3").SerializeToString()
        async with (
            aiohttp.ClientSession() as session,
            session.post(sidecar.url, data=body, headers=headers) as resp,
        ):
            assert resp.status == 200
        headers[FORWARDED_BY] += f", {sidecar.forwarder.token}"
        async with (
            aiohttp.ClientSession() as session,
            session.post(sidecar.url, data=body, headers=headers) as resp,
        ):
            assert (resp.status, resp.content_type) == (508, PROTOBUF)
            message = status_pb2.Status.FromString(await resp.read()).message
            assert message == "loop detected: this request was forwarded by this sidecar itself"
        assert [e.prediction_id for e in sidecar.intake.events] == ["p-3"]

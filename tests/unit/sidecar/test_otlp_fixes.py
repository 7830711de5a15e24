"""The OTLP receiver: misshapen OTLP/JSON, predtrace.* spans without a usable id, bind errors.

- A JSON value where a message belongs (``"value": "churn"``, ``"status":
  "ERROR"``) is refused 400 naming its place, not read as an empty message.
- A span with an empty ``predtrace.prediction.id``, or ``predtrace.model.*``
  attributes and no id, is named in ``partial_success`` (and logged), its
  span still forwarded, instead of being skipped unsaid.
- A busy OTLP/HTTP port is reported naming the address and the setting it came
  from (``--otlp-listen``'s port + 1 when not given), not asyncio's bare errno.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from predtrace.sidecar._intake import IntakeResult
from predtrace.sidecar._otlp import OtlpReceiver, http_listen_what
from predtrace.sidecar._otlp_body import OtlpJsonError, parse_json
from predtrace.sidecar._otlp_spans import request_to_events
from predtrace.wire import PredictionEvent
from predtrace.wire import Status as EventStatus
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar, traces_endpoint

ExportRequest = trace_service_pb2.ExportTraceServiceRequest
ExportResponse = trace_service_pb2.ExportTraceServiceResponse
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_TRACE = "5b8efff798038103d269b633813fc60c"


def _kv(key: str, value: object) -> dict[str, object]:
    return {"key": key, "value": value}


def _span(span_id: str, *attributes: dict[str, object], **extra: object) -> dict[str, object]:
    return {
        "traceId": _TRACE,
        "spanId": span_id,
        "name": "predict",
        "attributes": list(attributes),
        **extra,
    }


def _body(*spans: dict[str, object], resource: object = None) -> dict[str, Any]:
    resource_spans: dict[str, object] = {"scopeSpans": [{"spans": list(spans)}]}
    if resource is not None:
        resource_spans["resource"] = resource
    return {"resourceSpans": [resource_spans]}


_GOOD = _span("eee19b7ec3c1b174", _kv("predtrace.prediction.id", {"stringValue": "p-ok"}))
_SPAN3 = "resourceSpans[0].scopeSpans[0].spans[3]"

# (a body, where the refusal must say the misshapen field lies)
_MISSHAPEN = [
    pytest.param(  # the tester's reproducer: the model name silently emptied
        _body(
            _GOOD,
            _GOOD,
            _GOOD,
            _span(
                "eee19b7ec3c1b175",
                _kv("predtrace.prediction.id", {"stringValue": "typo"}),
                _kv("predtrace.model.name", "churn"),
            ),
        ),
        f"{_SPAN3}.attributes[1].value must be an object",
        id="attribute-value-string",
    ),
    pytest.param(
        _body(_span("eee19b7ec3c1b174", _kv("a", [])), _GOOD),
        "resourceSpans[0].scopeSpans[0].spans[0].attributes[0].value must be an object",
        id="attribute-value-list",
    ),
    pytest.param(  # an error span would have been stored as OK
        _body(_GOOD, _GOOD, _GOOD, {**_GOOD, "status": "STATUS_CODE_ERROR"}),
        f"{_SPAN3}.status must be an object",
        id="status-string",
    ),
    pytest.param(
        _body(
            _span(
                "eee19b7ec3c1b174", _kv("a", {"arrayValue": {"values": [{"intValue": "1"}, "x"]}})
            )
        ),
        "resourceSpans[0].scopeSpans[0].spans[0].attributes[0].value.arrayValue.values[1] "
        "must be an object",
        id="array-value-element",
    ),
    pytest.param(
        _body(_span("eee19b7ec3c1b174", _kv("a", {"kvlistValue": {"values": [_kv("b", 7)]}}))),
        "resourceSpans[0].scopeSpans[0].spans[0].attributes[0].value.kvlistValue.values[0].value "
        "must be an object",
        id="kvlist-value",
    ),
    pytest.param(
        _body(_GOOD, resource="service"),
        "resourceSpans[0].resource must be an object",
        id="resource-string",
    ),
    pytest.param(
        _body(_GOOD, resource={"attributes": [_kv("service.name", "api")]}),
        "resourceSpans[0].resource.attributes[0].value must be an object",
        id="resource-attribute",
    ),
    pytest.param(
        {"resourceSpans": [{"scopeSpans": [{"scope": "lib", "spans": [_GOOD]}]}]},
        "resourceSpans[0].scopeSpans[0].scope must be an object",
        id="scope-string",
    ),
    pytest.param(
        _body({**_GOOD, "events": ["started"]}),
        "resourceSpans[0].scopeSpans[0].spans[0].events[0] must be an object",
        id="event-string",
    ),
    pytest.param(
        _body({**_GOOD, "links": {"traceId": _TRACE}}),
        "resourceSpans[0].scopeSpans[0].spans[0].links must be a list",
        id="links-object",
    ),
    pytest.param(
        {"resourceSpans": [{"scopeSpans": ["spans"]}]},
        "resourceSpans[0].scopeSpans[0] must be an object",
        id="scope-spans-element",
    ),
    pytest.param(
        {"resource_spans": [{"scope_spans": [{"spans": [_GOOD, "span"]}]}]},
        "resource_spans[0].scope_spans[0].spans[1] must be an object",
        id="snake-case",
    ),
]


@pytest.mark.parametrize(("document", "where"), _MISSHAPEN)
def test_a_json_value_where_a_message_belongs_is_refused_naming_its_place(
    document: dict[str, Any], where: str
) -> None:
    with pytest.raises(OtlpJsonError) as raised:
        parse_json(json.dumps(document).encode())
    assert str(raised.value) == where


def test_well_shaped_json_with_nulls_and_nested_values_still_parses() -> None:
    nested = {
        "arrayValue": {"values": [{"kvlistValue": {"values": [_kv("b", {"boolValue": True})]}}]}
    }
    document = _body(
        {**_GOOD, "status": {"code": "STATUS_CODE_ERROR"}, "events": [{"name": "e"}]},
        _span("eee19b7ec3c1b175", _kv("nested", nested), _kv("unset", None), links=None),
        resource={"attributes": [_kv("service.name", {"stringValue": "api"})]},
    )
    request = parse_json(json.dumps(document).encode())
    spans = request.resource_spans[0].scope_spans[0].spans
    assert spans[0].status.code == 2 and spans[0].events[0].name == "e"
    value = spans[1].attributes[0].value.array_value.values[0].kvlist_value.values[0]
    assert (value.key, value.value.bool_value) == ("b", True)
    assert spans[1].span_id == bytes.fromhex("eee19b7ec3c1b175")


async def _refusal_reason(response: aiohttp.ClientResponse) -> str:
    return json_format.Parse(await response.read(), status_pb2.Status()).message


@dataclass
class Sink:
    """An OTLP/HTTP backend keeping what it is forwarded."""

    requests: list[ExportRequest] = field(default_factory=list)
    url: str = ""

    def spans(self) -> list[object]:
        return [
            s
            for r in self.requests
            for rs in r.resource_spans
            for ss in rs.scope_spans
            for s in ss.spans
        ]


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    state = Sink()

    async def receive(request: web.Request) -> web.Response:
        state.requests.append(ExportRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    async with traces_endpoint(receive) as state.url:
        yield state


async def test_a_bare_string_attribute_value_over_http_is_refused_400_and_nothing_stored(
    start_sidecar: StartSidecar, sink: Sink
) -> None:
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=sink.url)
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    typo = _span(
        "eee19b7ec3c1b174",
        _kv("predtrace.prediction.id", {"stringValue": "typo-1"}),
        _kv("predtrace.model.name", "churn"),
        _kv("predtrace.model.version", "3"),
    )
    error_status = {**_GOOD, "status": "STATUS_CODE_ERROR"}
    async with aiohttp.ClientSession() as session:
        for document, where in (
            (_body(typo), "spans[0].attributes[1].value must be an object"),
            (_body(error_status), "spans[0].status must be an object"),
        ):
            async with session.post(url, json=document) as resp:
                assert resp.status == 400
                reason = await _refusal_reason(resp)
                assert reason.startswith("malformed OTLP JSON body: resourceSpans[0]"), reason
                assert reason.endswith(where), reason
        good = _span(
            "eee19b7ec3c1b175",
            _kv("predtrace.prediction.id", {"stringValue": "typo-fixed"}),
            _kv("predtrace.model.name", {"stringValue": "churn"}),
        )
        async with session.post(url, json=_body(good)) as resp:
            assert resp.status == 200
    await eventually(lambda: len(running.collector.events()) == 1)
    (event,) = running.collector.events()
    assert (event.prediction_id, event.model.name) == ("typo-fixed", "churn")
    assert len(sink.spans()) == 1, "the refused bodies were not forwarded"


# -- spans with predtrace.* attributes that make no prediction ---------------------------


def _unusable_request() -> ExportRequest:
    """A good prediction, an empty id, model attributes without an id, a plain span."""
    request = ExportRequest()
    scope = request.resource_spans.add().scope_spans.add()

    def span(k: int, **attributes: str) -> None:
        added = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=bytes([k + 1]) * 8)
        added.start_time_unix_nano, added.end_time_unix_nano = 1_000, 2_000
        for key, value in attributes.items():
            added.attributes.add(key=key.replace("_", ".")).value.string_value = value

    span(0, predtrace_prediction_id="u-ok", predtrace_model_name="churn")
    span(1, predtrace_prediction_id="", predtrace_model_name="churn")
    span(2, predtrace_model_name="churn", predtrace_model_version="3")
    span(3, db_system="postgresql")  # not a prediction's: neither refused nor made one
    return request


async def _export(running: Running, transport: str, request: ExportRequest) -> ExportResponse:
    if transport == "grpc":
        async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
            export = channel.unary_unary(EXPORT, response_deserializer=ExportResponse.FromString)
            answer: ExportResponse = await export(request.SerializeToString())
            return answer
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    headers = {"Content-Type": "application/x-protobuf"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=request.SerializeToString(), headers=headers) as resp,
    ):
        assert resp.status == 200
        return ExportResponse.FromString(await resp.read())


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_spans_with_predtrace_attributes_but_no_usable_id_are_named_not_skipped(
    start_sidecar: StartSidecar, sink: Sink, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=sink.url)
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.otlp"):
        answer = await _export(running, transport, _unusable_request())
    assert answer.partial_success.rejected_spans == 0, "every span was accepted (and forwarded)"
    message = answer.partial_success.error_message
    assert message.startswith("2 prediction event(s) refused, their spans accepted"), message
    assert message.endswith(
        "(span 1 of the request): predtrace.prediction.id is empty: no prediction event made"
    ), message
    logged = [r.getMessage() for r in caplog.records if r.name == "predtrace.sidecar.otlp"]
    assert any("2 OTLP span(s) carrying predtrace.* attributes" in m for m in logged), logged
    assert any("span 1 of its request: predtrace.prediction.id is empty" in m for m in logged)
    await eventually(lambda: len(sink.spans()) == 4)
    await eventually(lambda: len(running.collector.events()) == 1)
    (event,) = running.collector.events()
    assert (event.prediction_id, event.model.name, event.status) == (
        "u-ok",
        "churn",
        EventStatus.OK,
    )
    intake = running.app.status_view().intake
    assert (intake.received, intake.accepted, intake.rejected) == (3, 1, 2)


async def test_model_attributes_without_an_id_are_named_in_partial_success(
    start_sidecar: StartSidecar, sink: Sink
) -> None:
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=sink.url)
    request = _unusable_request()
    del request.resource_spans[0].scope_spans[0].spans[1]  # the empty id: model attributes only
    answer = await _export(running, "grpc", request)
    message = answer.partial_success.error_message
    assert message.startswith("1 prediction event(s) refused, their spans accepted"), message
    assert message.endswith(
        "(span 1 of the request): predtrace.model.* attributes without "
        "predtrace.prediction.id: no prediction event made"
    ), message
    await eventually(lambda: len(sink.spans()) == 3)


# -- bind errors ------------------------------------------------------------------------


@dataclass
class _Intake:
    events: list[PredictionEvent] = field(default_factory=list)

    async def record(self, events: list[PredictionEvent]) -> IntakeResult:
        self.events.extend(events)
        return IntakeResult(len(events))

    def count_refused(self, count: int) -> None:
        pass


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("given", "named"),
    [
        (None, "OTLP/HTTP: --otlp-http-listen, or --otlp-listen's port + 1 without it"),
        (True, "--otlp-http-listen"),
        (False, "OTLP/HTTP: --otlp-listen's port + 1, as --otlp-http-listen is not given"),
    ],
)
async def test_a_busy_otlp_http_port_names_the_address_and_the_setting(
    busy_port: int, given: bool | None, named: str
) -> None:
    receiver = OtlpReceiver(_Intake(), None)  # type: ignore[arg-type]
    what = None if given is None else http_listen_what(given)
    try:
        with pytest.raises(OSError, match="cannot listen on") as raised:
            await receiver.start_http(f"127.0.0.1:{busy_port}", max_body=1024, what=what)
    finally:
        await receiver.stop()
    text = str(raised.value)
    assert text.startswith(f"cannot listen on 127.0.0.1:{busy_port} ({named}"), text
    assert text.endswith("): address already in use"), text
    assert "Errno" not in text and "attempting to bind" not in text, text


def _free_below(busy: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", busy - 1))
        except OSError:
            return False
    return True


async def test_a_sidecar_whose_derived_otlp_http_port_is_busy_says_which_listener(
    start_sidecar: StartSidecar,
) -> None:
    for _ in range(20):  # a busy port whose predecessor is free, for --otlp-listen
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            if port <= 1024 or not _free_below(port):
                continue
            with pytest.raises(OSError) as raised:
                await start_sidecar(otlp_listen=f"127.0.0.1:{port - 1}")
            text = str(raised.value)
            assert text.startswith(f"cannot listen on 127.0.0.1:{port} (OTLP/HTTP: "), text
            assert "--otlp-listen's port + 1, as --otlp-http-listen is not given" in text, text
            assert "Errno" not in text, text
            return
    pytest.skip("no busy port with a free one below it")


def test_a_span_with_opentelemetrys_invalid_all_zero_ids_makes_an_event_without_ids() -> None:
    request = trace_service_pb2.ExportTraceServiceRequest()
    span = (
        request.resource_spans.add()
        .scope_spans.add()
        .spans.add(name="predict", trace_id=bytes(16), span_id=bytes(8))
    )
    span.attributes.add(key="predtrace.prediction.id").value.string_value = "zero-ids"
    (event,) = request_to_events(request).events
    assert (event.prediction_id, event.trace_id, event.span_id) == ("zero-ids", b"", b"")


# -- ids of a length OTLP does not allow ---------------------------------------------------


def _misfit_id_request(where: str) -> ExportRequest:
    """A good prediction span, then one whose ``where`` id is 5 bytes long."""
    request = ExportRequest()
    scope = request.resource_spans.add().scope_spans.add()
    good = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=b"s" * 8)
    good.attributes.add(key="predtrace.prediction.id").value.string_value = "misfit-good"
    bad = scope.spans.add(name="predict", trace_id=b"t" * 16, span_id=b"u" * 8)
    bad.attributes.add(key="predtrace.prediction.id").value.string_value = "misfit-bad"
    if where == "link":
        bad.links.add(trace_id=b"t" * 16, span_id=b"x" * 5)
    else:
        setattr(bad, where, b"x" * 5)
    return request


_MISFITS = {
    "trace_id": "resource_spans[0].scope_spans[0].spans[1].trace_id is 5 bytes: it must be 16,",
    "span_id": "resource_spans[0].scope_spans[0].spans[1].span_id is 5 bytes: it must be 8",
    "parent_span_id": "spans[1].parent_span_id is 5 bytes: it must be 8",
    "link": "resource_spans[0].scope_spans[0].spans[1].links[0].span_id is 5 bytes: it must be 8",
}


@pytest.mark.parametrize("where", list(_MISFITS))
@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_an_id_of_a_length_otlp_does_not_allow_is_refused_and_nothing_kept(
    start_sidecar: StartSidecar, sink: Sink, transport: str, where: str
) -> None:
    # Forwarded, it would get the whole request refused by a strict backend
    # (the OpenTelemetry Collector refuses it): refused here, naming the id.
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0", otlp_export=sink.url)
    body = _misfit_id_request(where).SerializeToString()
    if transport == "grpc":
        async with grpc.aio.insecure_channel(running.app.addresses["otlp-grpc"]) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(EXPORT)(body)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reason = info.value.details() or ""
    else:
        url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
        headers = {"Content-Type": "application/x-protobuf"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, data=body, headers=headers) as resp,
        ):
            assert resp.status == 400
            reason = status_pb2.Status.FromString(await resp.read()).message  # as it was sent
    assert _MISFITS[where] in reason, reason
    # The good span of the same request was neither spooled nor forwarded;
    # a request with fitting (or empty) ids still goes through.
    fitting = _misfit_id_request("trace_id")
    fitting.resource_spans[0].scope_spans[0].spans[1].trace_id = b""
    answer = await _export(running, transport, fitting)
    assert not answer.partial_success.error_message
    await eventually(lambda: len(running.collector.events()) == 2)
    assert sorted(e.prediction_id for e in running.collector.events()) == [
        "misfit-bad",
        "misfit-good",
    ]
    await eventually(lambda: len(sink.spans()) == 2)
    assert len(sink.requests) == 1


_JSON_MISFITS = [
    pytest.param(
        {"traceId": "5b8efff798038103"},
        "spans[0].traceId is 16 hex digits: it must be 32, or empty",
        id="short-trace-id",
    ),
    pytest.param(  # odd: not "must be hex"
        {"traceId": _TRACE[:-1]},
        "spans[0].traceId is 31 hex digits: it must be 32, or empty",
        id="odd-trace-id",
    ),
    pytest.param(
        {"parent_span_id": "eee19b7ec3c1b17400"},
        "spans[0].parent_span_id is 18 hex digits: it must be 16, or empty",
        id="snake-case-parent",
    ),
    pytest.param(
        {"links": [{"traceId": _TRACE, "spanId": "eee19b"}]},
        "spans[0].links[0].spanId is 6 hex digits: it must be 16, or empty",
        id="link-span-id",
    ),
    pytest.param(  # bytes.fromhex would take the spaces
        {"traceId": "5b8efff7 98038103 d269b633 813fc60c"},
        "spans[0].traceId must be hex",
        id="spaces",
    ),
]


@pytest.mark.parametrize(("fields", "reason"), _JSON_MISFITS)
def test_an_otlp_json_id_of_the_wrong_length_or_not_hex_is_named_as_written(
    fields: dict[str, object], reason: str
) -> None:
    with pytest.raises(OtlpJsonError) as raised:
        parse_json(json.dumps(_body({**_GOOD, **fields})).encode())
    assert str(raised.value) == f"resourceSpans[0].scopeSpans[0].{reason}"


async def test_an_otlp_json_id_of_the_wrong_length_is_refused_400_naming_it(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar(otlp_listen="127.0.0.1:0")
    url = f"http://{running.app.addresses['otlp-http']}/v1/traces"
    short = {**_GOOD, "traceId": "5b8efff798038103"}  # 8 bytes where 16 belong
    async with aiohttp.ClientSession() as session, session.post(url, json=_body(short)) as resp:
        assert resp.status == 400
        reason = await _refusal_reason(resp)
    assert reason == (
        "malformed OTLP JSON body: resourceSpans[0].scopeSpans[0].spans[0].traceId is 16 hex"
        " digits: it must be 32, or empty"
    )
    assert running.collector.events() == []

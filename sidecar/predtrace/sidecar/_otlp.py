"""The OTLP receiver: OTLP/gRPC TraceService and OTLP/HTTP ``/v1/traces`` as a source.

**OtlpReceiver** -> intake -> spool, and every span -> ``OtlpForwarder``.
Spans carrying ``predtrace.prediction.id`` become prediction events (their
``predtrace.model.*`` attributes, status and timing); all spans, predictions
or not, are forwarded to the configured OTLP backend, so the sidecar can sit
in front of any OTLP receiver. Bodies are bounded; OTLP/HTTP accepts the
protobuf and the JSON encodings (gzip'd or not).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Final, TypeVar

import grpc
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from predtrace.cli._serving import quiet_client_errors
from predtrace.sidecar._config import parse_hostport
from predtrace.sidecar._errors import SpoolBusyError, SpoolError, SpoolFullError
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._otlp_export import OtlpForwarder
from predtrace.wire import (
    DeploymentRef,
    ModelRef,
    PredictionEvent,
    Status,
    WireError,
    WireTooLargeError,
    gunzip_bounded,
)

TRACE_SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"
_CODINGS: Final = frozenset({"", "identity", "gzip", "deflate"})
# Requests bigger than this are parsed and converted in a thread: a 4 MiB
# export must not stall every other connection of the loop for a second.
_THREAD_BYTES: Final = 256 * 1024
_In = TypeVar("_In")
_Out = TypeVar("_Out")


async def _off_loop(size: int, work: Callable[[_In], _Out], arg: _In) -> _Out:
    """``work(arg)``, in a thread when ``size`` says it is big."""
    if size > _THREAD_BYTES:
        return await asyncio.to_thread(work, arg)
    return work(arg)


_log = logging.getLogger("predtrace.sidecar.otlp")
PREDICTION_ID: Final = "predtrace.prediction.id"
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_MAX_ATTRIBUTES: Final = 64
_MAX_VALUE_LEN: Final = 1024
_ERROR: Final = trace_pb2.Status.STATUS_CODE_ERROR
ExportRequest = trace_service_pb2.ExportTraceServiceRequest


class OtlpJsonError(ValueError):
    """An OTLP/JSON body that does not describe an ExportTraceServiceRequest."""


# OTLP/JSON writes these bytes fields as hex, where protobuf's JSON mapping says base64.
_HEX_ID_FIELDS: Final = (
    "traceId",
    "spanId",
    "parentSpanId",
    "trace_id",
    "span_id",
    "parent_span_id",
)


def _hex_ids_to_base64(item: object) -> None:
    if not isinstance(item, dict):
        raise OtlpJsonError("spans and links must be objects")
    for key in _HEX_ID_FIELDS:
        value = item.get(key)
        if isinstance(value, str) and value:
            try:
                item[key] = base64.b64encode(bytes.fromhex(value)).decode()
            except ValueError:
                raise OtlpJsonError(f"{key} must be hex") from None


def _list(value: object, where: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise OtlpJsonError(f"{where} must be a list")
    return value


def parse_json(body: bytes) -> trace_service_pb2.ExportTraceServiceRequest:
    """Decode an OTLP/HTTP JSON body (hex ids, lowerCamelCase or snake_case keys).

    Unknown fields are ignored, as the OTLP spec asks of receivers.

    Raises:
        OtlpJsonError: not JSON, nested too deep, or not the request's shape.
    """
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise OtlpJsonError("not JSON (or nested too deep)") from None
    if not isinstance(document, dict):
        raise OtlpJsonError("the body must be a JSON object")
    for resource_spans in _list(document.get("resourceSpans"), "resourceSpans"):
        if not isinstance(resource_spans, dict):
            raise OtlpJsonError("resourceSpans[] must be objects")
        for scope_spans in _list(resource_spans.get("scopeSpans"), "scopeSpans"):
            if not isinstance(scope_spans, dict):
                raise OtlpJsonError("scopeSpans[] must be objects")
            for span in _list(scope_spans.get("spans"), "spans"):
                _hex_ids_to_base64(span)
                assert isinstance(span, dict)  # noqa: S101 - checked just above
                for link in _list(span.get("links"), "links"):
                    _hex_ids_to_base64(link)
    try:
        return json_format.ParseDict(document, ExportRequest(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, TypeError, ValueError) as exc:
        raise OtlpJsonError(str(exc)[:200]) from None


def _text(value: common_pb2.AnyValue) -> str:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind in ("int_value", "double_value"):
        return str(getattr(value, kind))
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    return ""


def _attrs(pairs: object) -> dict[str, str]:
    return {kv.key: _text(kv.value) for kv in pairs}  # type: ignore[attr-defined]


def span_to_event(span: trace_pb2.Span, resource: Mapping[str, str]) -> PredictionEvent | None:
    """The prediction event of a span, or None when it carries no prediction id."""
    attrs = _attrs(span.attributes)
    prediction_id = attrs.get(PREDICTION_ID, "")
    if not prediction_id or len(prediction_id) > 256:
        return None
    get = attrs.get
    model = ModelRef(
        name=get("predtrace.model.name", ""),
        version=get("predtrace.model.version", ""),
        alias=get("predtrace.model.alias", ""),
        registry_model_id=get("predtrace.model.id", ""),
        artifact_digest=get("predtrace.model.digest", ""),
    )
    deployment = DeploymentRef(
        id=get("predtrace.deployment.id", "") or resource.get("predtrace.deployment.id", ""),
        service=resource.get("service.name", ""),
        namespace=resource.get("k8s.namespace.name", ""),
        pod=resource.get("k8s.pod.name", ""),
        node=resource.get("k8s.node.name", ""),
        image_digest=resource.get("container.image.id", ""),
        image_name=resource.get("container.image.name", ""),
    )
    end = span.end_time_unix_nano
    start = span.start_time_unix_nano
    extra = {
        k: v[:_MAX_VALUE_LEN]
        for k, v in list(attrs.items())[:_MAX_ATTRIBUTES]
        if k != PREDICTION_ID and not k.startswith("predtrace.model.")
    }
    return PredictionEvent(
        prediction_id=prediction_id,
        trace_id=span.trace_id if len(span.trace_id) == 16 else b"",
        span_id=span.span_id if len(span.span_id) == 8 else b"",
        timestamp_unix_nano=start,
        duration_nanos=end - start if end >= start else 0,
        model=model,
        deployment=deployment,
        endpoint=get("http.route", "") or get("rpc.method", "") or span.name[:256],
        protocol=get("predtrace.inference.protocol", "") or "otlp",
        status=Status.ERROR if span.status.code == _ERROR else Status.OK,
        status_code=get("http.response.status_code", "") or get("rpc.grpc.status_code", ""),
        error_type=get("error.type", "")[:128],
        attributes=extra,
    )


def request_to_events(request: ExportRequest) -> tuple[list[PredictionEvent], int]:
    """Prediction events of an export request, and its total span count."""
    events: list[PredictionEvent] = []
    spans = 0
    for resource_spans in request.resource_spans:
        resource = _attrs(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            spans += len(scope_spans.spans)
            for span in scope_spans.spans:
                event = span_to_event(span, resource)
                if event is not None:
                    events.append(event)
    return events, spans


class _TraceService:
    """OTLP/gRPC ``TraceService.Export``, parsing the request bytes itself.

    gRPC's generated deserializer turns malformed bytes into UNKNOWN with a
    traceback in the log; here they are INVALID_ARGUMENT with a reason.
    """

    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def generic_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        serialize = trace_service_pb2.ExportTraceServiceResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            TRACE_SERVICE,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self.export, response_serializer=serialize
                )
            },
        )

    async def export(
        self,
        body: bytes,
        context: grpc.aio.ServicerContext[bytes, trace_service_pb2.ExportTraceServiceResponse],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        try:
            request = await _off_loop(len(body), ExportRequest.FromString, body)
        except (DecodeError, RecursionError):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "malformed ExportTraceServiceRequest"
            )
        try:
            await self._receiver.accept(request, len(body))
        except (SpoolBusyError, SpoolFullError) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except SpoolError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Receives OTLP traces over gRPC and HTTP; spools prediction events; forwards spans."""

    def __init__(self, intake: Intake, forwarder: OtlpForwarder | None) -> None:
        self._intake = intake
        self._forwarder = forwarder
        self._runner: web.AppRunner | None = None
        self._max_body = 4 * 1024 * 1024
        self.spans_received = 0

    async def accept(self, request: ExportRequest, size: int = 0) -> None:
        """Spool the request's prediction events (durably), then hand it to the forwarder."""
        events, spans = await _off_loop(size, request_to_events, request)
        self.spans_received += spans
        if events:
            await self._intake.record(events)
        if self._forwarder is not None:
            self._forwarder.offer(request, spans)

    def add_to_grpc_server(self, server: grpc.aio.Server) -> None:
        """Register the OTLP TraceService on a gRPC server."""
        server.add_generic_rpc_handlers((_TraceService(self).generic_handler(),))

    async def start_http(
        self, listen: str, *, max_body: int, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Serve ``POST /v1/traces`` (HTTPS given ``ssl_context``); return ``host:port``."""
        self._max_body = max_body
        app = web.Application(client_max_size=max_body)
        app.router.add_post("/v1/traces", self._http_export)
        quiet_client_errors()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        host, port = parse_hostport(listen, "--otlp-http-listen")
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = self._runner.addresses[0][1]
        return f"{host}:{bound}"

    async def _http_export(self, request: web.Request) -> web.Response:
        encoding = request.content_type
        decoded = await self._decode_http(request, encoding)
        if isinstance(decoded, web.Response):
            return decoded
        try:
            await self.accept(decoded, request.content_length or 0)
        except SpoolError as exc:
            return web.Response(status=503, text=str(exc), headers={"Retry-After": "1"})
        if encoding == JSON:  # answer in the encoding asked in (OTLP/HTTP spec)
            return web.Response(body=b"{}", content_type=JSON)
        response = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=response, content_type=PROTOBUF)

    async def _decode_http(  # noqa: PLR0911 - one answer per way a body can be bad
        self, request: web.Request, encoding: str
    ) -> ExportRequest | web.Response:
        """The request's spans, or the 4xx answer that says why there are none."""
        if encoding not in (PROTOBUF, JSON):
            return web.Response(status=415, text=f"send {PROTOBUF} or {JSON}")
        coding = request.headers.get("Content-Encoding", "").strip().lower()
        if coding not in _CODINGS:  # aiohttp would pass an unknown one through as is
            return web.Response(status=415, text="Content-Encoding must be gzip or deflate")
        try:
            # aiohttp already inflates a gzip Content-Encoding within
            # client_max_size; a body that is still gzip is inflated here, bounded.
            body = await request.read()
            if body[:2] == b"\x1f\x8b":
                body = gunzip_bounded(body, self._max_body)
            parse = ExportRequest.FromString if encoding == PROTOBUF else parse_json
            return await _off_loop(len(body), parse, body)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="body too large")
        except RequestPayloadError:  # a Content-Encoding that does not decode
            return web.Response(status=400, text="the body does not match its Content-Encoding")
        except WireTooLargeError:
            return web.Response(status=413, text="decompressed body too large")
        except (WireError, DecodeError):
            return web.Response(status=400, text="malformed OTLP protobuf body")
        except OtlpJsonError as exc:
            return web.Response(status=400, text=f"malformed OTLP JSON body: {exc}")

    async def stop(self) -> None:
        """Stop the HTTP listener. Safe twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

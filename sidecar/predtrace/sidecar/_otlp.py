"""The OTLP receiver: OTLP/gRPC TraceService and OTLP/HTTP ``/v1/traces`` as a source.

**OtlpReceiver** -> intake -> spool, and every span -> ``OtlpForwarder``.
Spans carrying ``predtrace.prediction.id`` become prediction events (their
``predtrace.model.*`` attributes, status and timing); all spans, predictions
or not, are forwarded to the configured OTLP backend, so the sidecar can sit
in front of any OTLP receiver. Bodies are bounded; OTLP/HTTP accepts the
protobuf and the JSON encodings (gzip'd, deflate'd or not). A span whose
prediction event is refused is still forwarded; the sender hears of the
refusal in ``partial_success`` (``rejected_spans`` stays 0: no span was).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
from predtrace.sidecar._otlp_body import (
    CODINGS,
    ExportRequest,
    OtlpJsonError,
    UndecodableBodyError,
    decompress,
    parse_json,
    parse_protobuf,
)
from predtrace.sidecar._otlp_export import OtlpForwarder
from predtrace.wire import (
    DeploymentRef,
    ModelRef,
    PredictionEvent,
    Status,
    WireTooLargeError,
)

TRACE_SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"
# Requests bigger than this are parsed and converted in a thread: a 4 MiB
# export must not stall every other connection of the loop for a second.
_THREAD_BYTES: Final = 256 * 1024
# At most this many of those big bodies, over gRPC and HTTP together, are
# parsed, converted and held as messages at once: a parsed request costs many
# times its body (every JSON object becomes a dict, then a message), so this
# bounds that peak whatever the thread pool's size or the number of concurrent
# exports. Smaller bodies are parsed on the loop, one at a time by construction.
_MAX_BIG_PARSES: Final = 2
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
_REASON_CHARS: Final = 512
_ERROR: Final = trace_pb2.Status.STATUS_CODE_ERROR
ExportResponse = trace_service_pb2.ExportTraceServiceResponse


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


# One rule for text taken from a span: what describes the call (the route, the
# status code, the protocol, the other attributes) is clipped to
# _MAX_VALUE_LEN, so an event with an 80 KB route is kept; what identifies
# (the prediction id, the model and deployment refs) is never clipped - a
# clipped model name would file the prediction under another model - so one
# past the wire's bounds gets the event refused, and the sender told.
def _described(attrs: Mapping[str, str], *keys: str) -> str:
    """The first of ``keys`` with a value, clipped."""
    return next((attrs[key] for key in keys if attrs.get(key)), "")[:_MAX_VALUE_LEN]


def span_to_event(span: trace_pb2.Span, resource: Mapping[str, str]) -> PredictionEvent | None:
    """The prediction event of a span, or None when it carries no prediction id."""
    attrs = _attrs(span.attributes)
    prediction_id = attrs.get(PREDICTION_ID, "")
    if not prediction_id:
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
        endpoint=_described(attrs, "http.route", "rpc.method") or span.name[:256],
        protocol=_described(attrs, "predtrace.inference.protocol") or "otlp",
        status=Status.ERROR if span.status.code == _ERROR else Status.OK,
        status_code=_described(attrs, "http.response.status_code", "rpc.grpc.status_code"),
        error_type=get("error.type", "")[:128],
        attributes=extra,
    )


@dataclass(slots=True)
class Conversion:
    """A request's span count and prediction events, with the span each came from."""

    spans: int = 0
    events: list[PredictionEvent] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # each event's span, in request order


def request_to_events(request: ExportRequest) -> Conversion:
    """Prediction events of an export request, and its span count."""
    out = Conversion()
    for resource_spans in request.resource_spans:
        resource = _attrs(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                position, out.spans = out.spans, out.spans + 1
                event = span_to_event(span, resource)
                if event is None:
                    continue
                out.events.append(event)
                out.positions.append(position)
    return out


def export_response(refused: list[tuple[int, str]]) -> ExportResponse:
    """The Export answer: a warning in ``partial_success`` if predictions were refused.

    Their spans were accepted (and forwarded), so ``rejected_spans`` stays 0;
    OTLP lets a server that took every span warn with a non-empty
    ``error_message`` (and a sender treats it as success: no retry).
    """
    response = ExportResponse()
    if refused:
        position, why = min(refused)
        response.partial_success.error_message = (
            f"{len(refused)} prediction event(s) refused, their spans accepted;"
            f" the first (span {position} of the request): {why[:_REASON_CHARS]}"
        )
    return response


class _TraceService:
    """OTLP/gRPC ``TraceService.Export``, parsing the request bytes itself.

    gRPC's generated deserializer turns malformed bytes into UNKNOWN with a
    traceback in the log; here they are INVALID_ARGUMENT with a reason.
    """

    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def generic_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        serialize = ExportResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            TRACE_SERVICE,
            {
                "Export": grpc.unary_unary_rpc_method_handler(
                    self.export, response_serializer=serialize
                )
            },
        )

    async def export(
        self, body: bytes, context: grpc.aio.ServicerContext[bytes, ExportResponse]
    ) -> ExportResponse:
        try:
            return await self._receiver.export(body, parse_protobuf)
        except (DecodeError, RecursionError):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "malformed ExportTraceServiceRequest"
            )
        except (SpoolBusyError, SpoolFullError) as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except SpoolError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


class OtlpReceiver:
    """Receives OTLP traces over gRPC and HTTP; spools prediction events; forwards spans."""

    def __init__(self, intake: Intake, forwarder: OtlpForwarder | None) -> None:
        self._intake = intake
        self._forwarder = forwarder
        self._runner: web.AppRunner | None = None
        self._max_body = 4 * 1024 * 1024
        self._big_parses = asyncio.Semaphore(_MAX_BIG_PARSES)
        self.spans_received = 0

    async def export(self, body: bytes, parse: Callable[[bytes], ExportRequest]) -> ExportResponse:
        """Parse ``body`` and ``accept`` it; a big one waits for one of the big-parse slots.

        Raises:
            DecodeError, RecursionError, OtlpJsonError: as ``parse``.
            SpoolError: as ``accept``.
        """
        if len(body) <= _THREAD_BYTES:
            return await self.accept(parse(body), len(body))
        async with self._big_parses:  # held while the parsed request lives
            request = await asyncio.to_thread(parse, body)
            return await self.accept(request, len(body))

    async def accept(self, request: ExportRequest, size: int = 0) -> ExportResponse:
        """Spool the request's prediction events (durably), then hand it to the forwarder.

        Returns:
            The Export answer, naming the prediction events refused, if any.

        Raises:
            SpoolError: the spool refused the write; nothing was forwarded.
        """
        converted = await _off_loop(size, request_to_events, request)
        self.spans_received += converted.spans
        refused: list[tuple[int, str]] = []
        if converted.events:
            result = await self._intake.record(converted.events)  # counts what it refuses
            refused = [(converted.positions[r.index], r.reason) for r in result.rejected]
        if self._forwarder is not None:
            self._forwarder.offer(request, converted.spans)
        return export_response(refused)

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
        # auto_decompress off: ``_inflate`` decodes the body, checking its end.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, auto_decompress=False
        )
        await self._runner.setup()
        host, port = parse_hostport(listen, "--otlp-http-listen")
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        bound = self._runner.addresses[0][1]
        return f"{host}:{bound}"

    async def _http_export(self, request: web.Request) -> web.Response:
        as_json = request.content_type == JSON
        body = await self._read_http(request)
        if isinstance(body, web.Response):
            return body
        try:
            answer = await self.export(body, parse_json if as_json else parse_protobuf)
        except (DecodeError, RecursionError):
            return web.Response(status=400, text="malformed OTLP protobuf body")
        except OtlpJsonError as exc:
            return web.Response(status=400, text=f"malformed OTLP JSON body: {exc}")
        except SpoolError as exc:
            return web.Response(status=503, text=str(exc), headers={"Retry-After": "1"})
        if as_json:  # answer in the encoding asked in (OTLP/HTTP spec)
            text = json.dumps(json_format.MessageToDict(answer))
            return web.Response(text=text, content_type=JSON)
        return web.Response(body=answer.SerializeToString(), content_type=PROTOBUF)

    async def _read_http(  # noqa: PLR0911 - one answer per way a body can be bad
        self, request: web.Request
    ) -> bytes | web.Response:
        """The request's body, decompressed, or the 4xx answer that says why there is none."""
        if request.content_type not in (PROTOBUF, JSON):
            return web.Response(status=415, text=f"send {PROTOBUF} or {JSON}")
        coding = request.headers.get("Content-Encoding", "").strip().lower()
        if coding not in CODINGS:  # the parser would get it still encoded
            return web.Response(status=415, text="Content-Encoding must be gzip or deflate")
        try:
            return decompress(await request.read(), coding, self._max_body)
        except web.HTTPRequestEntityTooLarge:
            return web.Response(status=413, text="body too large")
        except RequestPayloadError:
            return web.Response(status=400, text="the body could not be read")
        except WireTooLargeError:
            return web.Response(status=413, text="decompressed body too large")
        except UndecodableBodyError as exc:
            text = f"cannot decompress the body (Content-Encoding: {coding or 'none'}): {exc}"
            return web.Response(status=400, text=text)

    async def stop(self) -> None:
        """Stop the HTTP listener. Safe twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

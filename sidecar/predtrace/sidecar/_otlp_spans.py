"""OTLP spans as prediction events: the conversion behind the OTLP receiver (``_otlp``).

A span carrying ``predtrace.prediction.id`` (a string) becomes one
PredictionEvent: its ``predtrace.model.*`` attributes, status, timing and
the resource's deployment identity; other attributes are kept bounded. A
span that carries ``predtrace.*`` attributes but cannot become one (its id
empty or not a string, or ``predtrace.model.*`` attributes without an id) is
refused, not skipped unsaid. A request's conversion lists the spans whose
event it refused, with why, for the Export answer's ``partial_success``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from predtrace.sidecar._otlp_body import ExportRequest
from predtrace.wire import (
    DeploymentRef,
    ModelRef,
    PredictionEvent,
    Status,
)

PREDICTION_ID: Final = "predtrace.prediction.id"
_MODEL_PREFIX: Final = "predtrace.model."
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


class SpanIdLengthError(ValueError):
    """A span or link id of a length OTLP does not allow: the request is malformed.

    An id is 16 bytes (a trace's) or 8 (a span's), or empty. The
    OpenTelemetry Collector refuses such a request whole, as a backend the
    sidecar forwards to may: it is refused here, before anything of it is
    spooled or forwarded, naming the id.
    """


# (field, bytes) of a span's ids, and of a link's.
_SPAN_IDS: Final = (("trace_id", 16), ("span_id", 8), ("parent_span_id", 8))
_LINK_IDS: Final = (("trace_id", 16), ("span_id", 8))


def _check_ids(span: trace_pb2.Span, where: str) -> None:
    """Raise ``SpanIdLengthError`` if an id of ``span`` (at ``where``) or its links is misfit."""
    for name, size in _SPAN_IDS:
        have = len(getattr(span, name))
        if have and have != size:
            raise SpanIdLengthError(_misfit(f"{where}.{name}", have, size))
    for index, link in enumerate(span.links):
        for name, size in _LINK_IDS:
            have = len(getattr(link, name))
            if have and have != size:
                raise SpanIdLengthError(_misfit(f"{where}.links[{index}].{name}", have, size))


def _ids_fit(span: trace_pb2.Span) -> bool:
    """The common case, quickly: the span's ids fit and it has no links."""
    return (
        len(span.trace_id) in (0, 16)
        and len(span.span_id) in (0, 8)
        and len(span.parent_span_id) in (0, 8)
        and not span.links
    )


def _misfit(field: str, have: int, size: int) -> str:
    # (An OTLP/JSON body's ids are checked as hex, with their names as written.)
    return f"{field} is {have} bytes: it must be {size}, or empty"


class UnusablePredictionSpanError(ValueError):
    """A span that carries ``predtrace.*`` attributes but cannot become a prediction event."""


class PredictionIdTypeError(UnusablePredictionSpanError):
    """A span whose ``predtrace.prediction.id`` is not a string: no prediction is made of it."""


def _prediction_id(span: trace_pb2.Span) -> str:
    """The span's prediction id (its last ``predtrace.prediction.id``), as sent.

    Raises:
        PredictionIdTypeError: the value is not a string (a bool would read
            "true", an int its digits: ids that were never meant).
    """
    value = next(kv.value for kv in reversed(span.attributes) if kv.key == PREDICTION_ID)
    kind = value.WhichOneof("value")
    if kind != "string_value":
        raise PredictionIdTypeError(f"{PREDICTION_ID} must be a string, not {kind or 'empty'}")
    return value.string_value


def span_to_event(span: trace_pb2.Span, resource: Mapping[str, str]) -> PredictionEvent | None:
    """The prediction event of a span, or None when it is not a prediction's.

    Raises:
        PredictionIdTypeError: its prediction id is not a string.
        UnusablePredictionSpanError: its prediction id is empty, or it has
            ``predtrace.model.*`` attributes and no prediction id (a prediction
            meant, the id forgotten or misspelt).
    """
    attrs = _attrs(span.attributes)
    if PREDICTION_ID not in attrs:
        if any(key.startswith(_MODEL_PREFIX) for key in attrs):
            raise UnusablePredictionSpanError(
                f"{_MODEL_PREFIX}* attributes without {PREDICTION_ID}: no prediction event made"
            )
        return None
    prediction_id = _prediction_id(span)
    if not prediction_id:
        raise UnusablePredictionSpanError(f"{PREDICTION_ID} is empty: no prediction event made")
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
        if k != PREDICTION_ID and not k.startswith(_MODEL_PREFIX)
    }
    return PredictionEvent(
        prediction_id=prediction_id,
        # OpenTelemetry's invalid ids (all zeros) are no ids, as in the decoder.
        trace_id=span.trace_id if len(span.trace_id) == 16 and any(span.trace_id) else b"",
        span_id=span.span_id if len(span.span_id) == 8 and any(span.span_id) else b"",
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
    refused: list[tuple[int, str]] = field(default_factory=list)  # (span, why): no event made


def request_to_events(request: ExportRequest) -> Conversion:
    """Prediction events of an export request, its span count, and the spans refused one.

    A span refused one (``UnusablePredictionSpanError``) is listed with why.

    Raises:
        SpanIdLengthError: an id of a span or link has a length OTLP does not allow.
    """
    out = Conversion()
    for r, resource_spans in enumerate(request.resource_spans):
        resource = _attrs(resource_spans.resource.attributes)
        for s, scope_spans in enumerate(resource_spans.scope_spans):
            for k, span in enumerate(scope_spans.spans):
                if not _ids_fit(span):
                    _check_ids(span, f"resource_spans[{r}].scope_spans[{s}].spans[{k}]")
                position, out.spans = out.spans, out.spans + 1
                try:
                    event = span_to_event(span, resource)
                except UnusablePredictionSpanError as exc:
                    out.refused.append((position, str(exc)))
                    continue
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

"""Span handling of the middleware: join the server span that is there, or start one.

When OpenTelemetry's ASGI/FastAPI instrumentation or FastAPI's built-in
telemetry already made a SERVER span, the middleware adds its ``predtrace.*``
attributes to it; otherwise it starts a SERVER span ``predict {model}`` whose
parent comes from the request's W3C headers. A prediction served inside
another one (an ensemble calling a sub-model of the same app in-process) never
joins the span of the outer prediction: it starts a SERVER span of its own,
a child of that one. Only the OpenTelemetry API is used, so the app's own SDK
setup decides sampling and export.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

RawHeaders = Iterable[tuple[bytes, bytes]]

ATTR_PREDICTION_ID: Final = "predtrace.prediction.id"
ATTR_MODEL_NAME: Final = "predtrace.model.name"
ATTR_MODEL_VERSION: Final = "predtrace.model.version"
ATTR_MODEL_ALIAS: Final = "predtrace.model.alias"
ATTR_MODEL_ID: Final = "predtrace.model.id"
ATTR_MODEL_DIGEST: Final = "predtrace.model.digest"
ATTR_TRAINING_RUN_ID: Final = "predtrace.training.run_id"
ATTR_DEPLOYMENT_ID: Final = "predtrace.deployment.id"
ATTR_PROTOCOL: Final = "predtrace.inference.protocol"


class _AsgiHeadersGetter(Getter[RawHeaders]):
    """Reads W3C (or any configured) propagation headers from raw ASGI headers."""

    def get(self, carrier: RawHeaders, key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1")
        values = [v.decode("latin-1") for k, v in carrier if k == wanted]
        return values or None

    def keys(self, carrier: RawHeaders) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_GETTER: Final = _AsgiHeadersGetter()


def enclosing_server_span(context: Context | None = None) -> Span | None:
    """The current span when it is a recording SERVER span (made by someone else)."""
    span = trace.get_current_span(context)
    if span.is_recording() and getattr(span, "kind", None) is SpanKind.SERVER:
        return span
    return None


def is_predtrace_span(span: Span) -> bool:
    """Whether a prediction started or joined ``span`` already (it carries a prediction id).

    Only asked for a prediction inside another one: reads the span's attributes.
    """
    attributes = getattr(span, "attributes", None)  # the SDK's span; the API has none
    return attributes is not None and ATTR_PREDICTION_ID in attributes


def extract_parent(headers: RawHeaders) -> Context:
    """The parent context carried by the request's propagation headers."""
    return propagate.extract(headers, getter=_GETTER)


def ids_of(span: Span) -> tuple[bytes, bytes]:
    """(trace id, span id) as bytes for the event; empty when the span has none."""
    ctx = span.get_span_context()
    if not ctx.trace_id:
        return b"", b""
    return ctx.trace_id.to_bytes(16, "big"), ctx.span_id.to_bytes(8, "big")


def end_own_span(
    span: Span,
    attributes: dict[str, str | int],
    error_type: str,
    status: int | None,
    delivered: bool,
) -> None:
    """End a span the middleware started, with the attributes learnt late.

    Error status for an exception (``status`` None), no answer, an answer
    not delivered whole, or a 5xx; a 4xx is the client's error, not the span's.
    """
    if error_type and (not status or status >= 500 or not delivered):
        attributes["error.type"] = error_type
        if status:
            attributes["http.response.status_code"] = status
        span.set_status(Status(StatusCode.ERROR, error_type))
    if attributes:
        span.set_attributes(attributes)
    span.end()

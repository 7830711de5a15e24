"""The gRPC metadata the OIP proxy passes on, and what it adds to it.

Client <-> OipProxy <-> model server: every call's metadata passes both
ways (``forwardable``), but for what gRPC and the transport write
themselves. The proxy adds the prediction id to what the caller gets back
(``with_prediction_id``: the ``x-prediction-id`` header, or trailer) and
gives each ModelInfer call a W3C ``traceparent`` on its way to the model
server (``trace_context``: the caller's, or a new one).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# Metadata the proxy does not pass on, either way: HTTP/2 pseudo-headers
# (":..."), what gRPC writes itself (status, message, compression, deadline,
# retry attempts; a grpc-timeout it is given to send aborts the process, a
# CHECK in gRPC core) and the transport's own headers. Every other key
# passes, grpc-status-details-bin (rich error details) and
# grpc-retry-pushback-ms included.
_RESERVED_KEYS: Final = frozenset(
    {
        "grpc-status",
        "grpc-message",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-timeout",
        "grpc-internal-encoding-request",
        "grpc-internal-stream-encoding-request",
        "grpc-previous-rpc-attempts",
        "user-agent",
        "te",
        "content-type",
        "host",
    }
)
# The prediction id, as the ASGI middleware names it in its response headers.
PREDICTION_ID_HEADER: Final = "x-prediction-id"
# W3C Trace Context's rules (lower-case hex, no version ff, four fields in
# version 00, no all-zero ids), as OpenTelemetry's propagator applies them.
_TRACE_CONTEXT: Final = TraceContextTextMapPropagator()

Metadata = list[tuple[str, str | bytes]]


def forwardable(metadata: Iterable[Any] | None) -> Metadata:
    """The entries of ``metadata`` the proxy passes on (none of ``_RESERVED_KEYS``)."""
    return [
        (key, value)
        for key, value in metadata or ()
        if key not in _RESERVED_KEYS and not key.startswith(":")
    ]


def with_prediction_id(metadata: Metadata, prediction_id: str) -> Metadata:
    """``metadata`` and the prediction id (not twice, if the model server sent the same)."""
    entry = (PREDICTION_ID_HEADER, prediction_id)
    if entry not in metadata:
        metadata.append(entry)
    return metadata


def trace_context(metadata: Metadata) -> tuple[bytes, bytes]:
    """Trace and span id of the caller's traceparent; a missing or invalid one is replaced."""
    for key, value in metadata:
        if key == "traceparent":
            parsed = _parse_traceparent(value) if isinstance(value, str) else None
            if parsed is not None:
                return parsed
            break
    metadata[:] = [(key, value) for key, value in metadata if key != "traceparent"]
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    metadata.append(("traceparent", f"00-{trace_id.hex()}-{span_id.hex()}-01"))
    return trace_id, span_id


def _parse_traceparent(value: str) -> tuple[bytes, bytes] | None:
    """Trace and span id of a traceparent W3C Trace Context accepts, else None."""
    carrier = {"traceparent": value}
    context = trace.get_current_span(_TRACE_CONTEXT.extract(carrier)).get_span_context()
    if not context.is_valid:
        return None
    return context.trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big")

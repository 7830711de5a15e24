"""Exporter of the in-process pipeline that hands batches to the local sidecar over gRPC.

The last stage of sidecar mode: the queued pipeline's worker thread calls
``predtrace.v1.Sidecar/RecordBatch``; the sidecar answers once the events are
durable in its spool. gRPC status codes are translated into the pipeline's
errors at this boundary: UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED
and ABORTED are retryable (a retry pushback from the server is honoured), as
is UNIMPLEMENTED (a target that is some other gRPC server: a setting to fix,
not a batch to drop); every other code (INVALID_ARGUMENT, UNAUTHENTICATED,
...) is permanent. A batch is sent in as many calls as keep each request
under the sidecar's message limit; an event that alone is over it is
rejected (counted), not retried for ever.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import weakref
from pathlib import Path
from typing import Final

import grpc

from predtrace.middleware._errors import ConfigError
from predtrace.sidecar.pipeline import (
    ExportResult,
    OutgoingBatch,
    PermanentExportError,
    RetryableExportError,
)
from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import PredictionEvent, Rejection, event_to_proto, pack_events

RETRYABLE_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# The sidecar's default --max-message-bytes (4 MiB), less room for the
# request's own framing: a request is never bigger.
MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024 - 64 * 1024
# gRPC's refusal of a message over the server's limit: "... larger than max (N vs. LIMIT)".
_LIMIT_IN_DETAILS: Final = re.compile(r"larger than max \(\d+ vs\. (\d+)\)")
_FRAMING_BYTES: Final = 1024
# A sidecar that was down is tried again within seconds once it is back, not
# after gRPC's own reconnect backoff (up to two minutes).
_CHANNEL_OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
_log = logging.getLogger("predtrace.middleware.sidecar")
_INSTANCES: weakref.WeakSet[SidecarGrpcExporter] = weakref.WeakSet()
# Channels a forked child inherited: never touched, never collected (closing a
# parent's channel in the child can hang on gRPC's internal threads).
_INHERITED: list[object] = []


def _read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the sidecar {what} {path}: {exc.strerror}") from None


class SidecarGrpcExporter:
    """Sends each batch to the sidecar with one ``RecordBatch`` call.

    Example:
        >>> QueuedExporter(SidecarGrpcExporter("127.0.0.1:4555"))
    """

    def __init__(
        self,
        target: str,
        *,
        timeout: float = 5.0,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.max_request_bytes = max_request_bytes
        ca = _read_pem(tls_ca, "CA file")
        cert = _read_pem(tls_cert, "client certificate")
        key = _read_pem(tls_key, "client key")
        self._credentials = grpc.ssl_channel_credentials(ca, key, cert) if ca or cert else None
        self._channel: grpc.Channel | None = None
        self._stub: sidecar_pb2_grpc.SidecarStub | None = None
        self._packed = True
        # Batch ids (see ``_batch_id``): this exporter's prefix, then a number per batch.
        self._id_prefix = os.urandom(8)
        self._batches = 0
        _INSTANCES.add(self)

    def _connect(self) -> sidecar_pb2_grpc.SidecarStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.insecure_channel(self.target, _CHANNEL_OPTIONS)
            else:
                self._channel = grpc.secure_channel(
                    self.target, self._credentials, _CHANNEL_OPTIONS
                )
            self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)  # type: ignore[no-untyped-call]  # generated stub has no annotations
        return self._stub

    def export(self, batch: OutgoingBatch) -> ExportResult:
        """Deliver one batch; raise Retryable/PermanentExportError on failure.

        Usually one call. A batch whose request would pass the message limit
        goes in halves (a call failing part way resends the whole batch:
        at-least-once, as everywhere).
        """
        packed = self._packed
        if not batch.seq:  # the first attempt: number the batch for its retries
            self._batches += 1
            batch.seq = self._batches
        requests, too_large = self._requests(list(batch.events), 0)
        accepted, rejected = 0, list(too_large)
        for request, offset, count in requests:
            request.batch_id = self._batch_id(batch.seq, offset, count)
            ack = self._call(request)
            if packed and count and not ack.read_packed:
                # A sidecar from before packed_events ignores the field (and spools
                # nothing): fall back to protobuf events for good.
                _log.warning(
                    "the sidecar at %s does not read packed events: sending protobuf", self.target
                )
                self._packed = False
                return self.export(batch)
            accepted += ack.accepted
            rejected += (
                Rejection(index=offset + r.index, reason=r.reason, prediction_id=r.prediction_id)
                for r in ack.rejected
            )
        return ExportResult(accepted=accepted, rejected=tuple(rejected))

    def _requests(
        self, events: list[PredictionEvent], offset: int
    ) -> tuple[list[tuple[sidecar_pb2.RecordBatchRequest, int, int]], list[Rejection]]:
        """(request, offset of its first event, events) under the limit; events alone over it."""
        if self._packed:
            # msgpack: about half the CPU of building protobuf messages.
            request = sidecar_pb2.RecordBatchRequest(packed_events=pack_events(events))
        else:
            request = sidecar_pb2.RecordBatchRequest(events=[event_to_proto(e) for e in events])
        size = request.ByteSize()
        if len(events) <= 1 or size <= self.max_request_bytes:
            if events and size > self.max_request_bytes:
                reason = f"event larger than the sidecar's message limit ({self.max_request_bytes})"
                return [], [Rejection(offset, reason, events[0].prediction_id)]
            return [(request, offset, len(events))], []
        half = len(events) // 2
        first, first_too_large = self._requests(events[:half], offset)
        second, second_too_large = self._requests(events[half:], offset + half)
        return first + second, first_too_large + second_too_large

    def _batch_id(self, seq: int, offset: int, count: int) -> bytes:
        """The id of one call's events, the same on every attempt of the batch.

        A retry of a call that timed out while the sidecar spooled it is then
        answered instead of spooled twice. The events' range is in the id: a
        batch split otherwise on a retry (a smaller limit learnt) names new
        calls, never an old id with other bytes.
        """
        return self._id_prefix + struct.pack(">QII", seq, offset, count)

    def _call(self, request: sidecar_pb2.RecordBatchRequest) -> sidecar_pb2.RecordAck:
        try:
            return self._connect().RecordBatch(request, timeout=self.timeout)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            self._learn_limit(exc)
            raise _classify(exc, self.target) from None

    def _learn_limit(self, exc: grpc.RpcError) -> None:
        """A sidecar with a smaller message limit says so: the next attempt splits to fit it."""
        details = exc.details() if isinstance(exc, grpc.Call) else None
        found = _LIMIT_IN_DETAILS.search(details or "")
        if found is not None:
            limit = int(found.group(1)) - _FRAMING_BYTES
            if 0 < limit < self.max_request_bytes:
                self.max_request_bytes = limit

    def shutdown(self, timeout: float) -> None:
        """Close the channel. Safe twice."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def _after_fork_in_child(self) -> None:
        self._id_prefix = os.urandom(8)  # the parent's batch numbers go on in the parent
        if self._channel is not None:
            _INHERITED.append(self._channel)
        self._channel = None
        self._stub = None


def _classify(exc: grpc.RpcError, target: str) -> RetryableExportError | PermanentExportError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    name = code.name if code is not None else "UNKNOWN"
    details = exc.details() if isinstance(exc, grpc.Call) else None
    # gRPC's details name the cause: a refused connection, a certificate, an
    # HTTP/1 server, an unknown host.
    reason = f": {details[:200]}" if details else ""
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return RetryableExportError(
            f"the gRPC server at {target} is not a predtrace sidecar ({name}{reason}); is "
            "PREDTRACE_SIDECAR_TARGET the sidecar's --listen port?"
        )
    if code in RETRYABLE_CODES:
        pushback = _pushback(exc) if isinstance(exc, grpc.Call) else None
        return RetryableExportError(
            f"sidecar at {target} answered {name}{reason}", retry_after=pushback
        )
    return PermanentExportError(f"sidecar at {target} answered {name}{reason}")


def _pushback(call: grpc.Call) -> float | None:
    for key, value in call.trailing_metadata() or ():
        text = value.decode() if isinstance(value, bytes) else value
        try:
            if key == "grpc-retry-pushback-ms":
                return max(0.0, int(text) / 1000)
            if key == "retry-after":
                return max(0.0, float(text))
        except ValueError:
            return None
    return None


def _reset_after_fork() -> None:
    for exporter in list(_INSTANCES):
        exporter._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_after_fork)

"""Exporter of the in-process pipeline that hands batches to the local sidecar over gRPC.

The last stage of sidecar mode: the queued pipeline's worker thread calls
``predtrace.v1.Sidecar/RecordBatch``; the sidecar answers once the events are
durable in its spool. gRPC status codes are translated into the pipeline's
errors at this boundary: UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED
and ABORTED are retryable (a retry pushback from the server is honoured);
every other code (INVALID_ARGUMENT, UNAUTHENTICATED, ...) is permanent.
"""

from __future__ import annotations

import logging
import os
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
from predtrace.wire import Rejection, event_to_proto, pack_events

RETRYABLE_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
    }
)
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
    ) -> None:
        self.target = target
        self.timeout = timeout
        ca = _read_pem(tls_ca, "CA file")
        cert = _read_pem(tls_cert, "client certificate")
        key = _read_pem(tls_key, "client key")
        self._credentials = grpc.ssl_channel_credentials(ca, key, cert) if ca or cert else None
        self._channel: grpc.Channel | None = None
        self._stub: sidecar_pb2_grpc.SidecarStub | None = None
        self._packed = True
        _INSTANCES.add(self)

    def _connect(self) -> sidecar_pb2_grpc.SidecarStub:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.insecure_channel(self.target)
            else:
                self._channel = grpc.secure_channel(self.target, self._credentials)
            self._stub = sidecar_pb2_grpc.SidecarStub(self._channel)  # type: ignore[no-untyped-call]  # generated stub has no annotations
        return self._stub

    def export(self, batch: OutgoingBatch) -> ExportResult:
        """Deliver one batch; raise Retryable/PermanentExportError on failure."""
        if self._packed:
            # msgpack: about half the CPU of building protobuf messages.
            request = sidecar_pb2.RecordBatchRequest(packed_events=pack_events(batch.events))
        else:
            request = sidecar_pb2.RecordBatchRequest(
                events=[event_to_proto(e) for e in batch.events]
            )
        ack = self._call(request)
        if self._packed and batch.events and not ack.read_packed:
            # A sidecar from before packed_events ignores the field (and spools
            # nothing): fall back to protobuf events for good.
            _log.warning(
                "the sidecar at %s does not read packed events: sending protobuf", self.target
            )
            self._packed = False
            return self.export(batch)
        rejected = tuple(
            Rejection(index=r.index, reason=r.reason, prediction_id=r.prediction_id)
            for r in ack.rejected
        )
        return ExportResult(accepted=ack.accepted, rejected=rejected)

    def _call(self, request: sidecar_pb2.RecordBatchRequest) -> sidecar_pb2.RecordAck:
        try:
            return self._connect().RecordBatch(request, timeout=self.timeout)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            raise _classify(exc) from None

    def shutdown(self, timeout: float) -> None:
        """Close the channel. Safe twice."""
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()

    def _after_fork_in_child(self) -> None:
        if self._channel is not None:
            _INHERITED.append(self._channel)
        self._channel = None
        self._stub = None


def _classify(exc: grpc.RpcError) -> RetryableExportError | PermanentExportError:
    code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    name = code.name if code is not None else "UNKNOWN"
    if code in RETRYABLE_CODES:
        pushback = _pushback(exc) if isinstance(exc, grpc.Call) else None
        return RetryableExportError(f"sidecar answered {name}", retry_after=pushback)
    details = exc.details() if isinstance(exc, grpc.Call) else None
    reason = f": {details[:200]}" if details else ""
    return PermanentExportError(f"sidecar answered {name}{reason}")


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

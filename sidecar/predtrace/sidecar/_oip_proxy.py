"""The OIP v2 gRPC proxy: a transparent, byte-level source in front of a model server.

Client -> **OipProxy** -> model server (``inference.GRPCInferenceService``,
over a few connections: ``_oip_upstream.ChannelPool``). Every method is
passed through as bytes (``_oip_passthrough``: a generic stream handler, so
any cardinality works; a single request to a method known to take one goes
upstream as a single request, ``_cardinality``), with its metadata, trailers and status (rich
error details and retry pushback included; ``_oip_metadata``). ``ModelInfer``
alone is looked into: the proxy reads model_name, model_version and id from
the request and response bytes (``_oip_fields``, without copying the
tensors), picks the prediction id (``_oip_ids``, DESIGN §3: the OIP id, then
``x-request-id``, then ``ce-id``, else a new UUIDv7), adds it when the
request has no id and the message limit leaves room (rewriting the request
bytes; a caller's id is never replaced), tells the caller the id
(``x-prediction-id`` in the headers, or in the trailers of an error without
headers), forwards or starts a W3C ``traceparent``, and records a prediction
event with the version actually served, or with the error (a deadline or a
cancellation included; ``_oip_exchange``). Requests in flight to the model
server are held under a byte budget (``_oip_upstream.ByteBudget``), ModelInfer's
and the other methods' apart: past it, calls wait their turn, before their
request is read (its bytes stay with the caller; ``_oip_reads``). Events are
recorded off the response path (``_oip_recorder``): the model's answer never
waits for telemetry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Final

import grpc

from predtrace.sidecar._config import DeploymentConfig
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._oip_exchange import cancel_status, forward
from predtrace.sidecar._oip_fields import NO_FIELDS, OipFields, clean_text, read_fields
from predtrace.sidecar._oip_ids import PredictionIds
from predtrace.sidecar._oip_metadata import Metadata, forwardable, trace_context
from predtrace.sidecar._oip_passthrough import Reads, passthrough_handler
from predtrace.sidecar._oip_reads import (
    INFLIGHT_MESSAGES,
    PASSTHROUGH_MESSAGES,
    Cardinality,
    RequestReads,
    TooManySlowError,
    too_many_slow,
)
from predtrace.sidecar._oip_recorder import Recorder
from predtrace.sidecar._oip_upstream import RECONNECT_BACKOFF, ByteBudget, ChannelPool
from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.wire import ModelRef, PredictionEvent

_log = logging.getLogger("predtrace.sidecar.oip")
SERVICE: Final = "inference.GRPCInferenceService"
MODEL_INFER: Final = f"/{SERVICE}/ModelInfer"
PROTOCOL: Final = "oip-v2-grpc"
# How much bigger than the message limit a model server's answer may be: an
# answer that echoes the id the proxy added (up to 256 characters) is that
# much longer than the one the caller would have had directly.
RESPONSE_MARGIN: Final = 1024
# The listener's HTTP/2 flow control. gRPC core lets a caller send as much of
# a call's request as the call's window allows, read or not, and by default
# grows that window (BDP probing) to whole messages. Without probing it stays
# at 64 KiB until the handler reads (and then opens to the message being
# read): a ModelInfer call waiting for room in the byte budget leaves its
# request with its caller, instead of the proxy holding it in full. Loopback
# throughput of 4 MiB requests is not lower for it (their read opens the
# window); across a long, slow link (not measured) one upload may be.
LISTENER_OPTIONS: Final = (("grpc.http2.bdp_probe", 0),)


# The methods of the OIP v2 service (KServe's, with Triton's additions) known
# to take one request and answer once: passed through as unary calls. Any
# other method of the service but the streaming one (a model server's own,
# or one it lacks) still takes one request, but may answer any number of
# times; any other service's method streams at once, since its caller may
# wait for an answer before it sends again.
_UNARY_NAMES: Final = (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
    "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
    "RepositoryModelUnload", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister", "TraceSetting", "LogSettings",
)  # fmt: skip
_UNARY_METHODS: Final = frozenset(
    {f"/{SERVICE}/{name}" for name in _UNARY_NAMES} | {"/grpc.health.v1.Health/Check"}
)
_STREAM_INFER: Final = f"/{SERVICE}/ModelStreamInfer"


def _cardinality(method: str) -> Cardinality:
    if method in _UNARY_METHODS:
        return "unary"
    if method.startswith(f"/{SERVICE}/") and method != _STREAM_INFER:
        return "one-request"
    return "stream"


if TYPE_CHECKING:
    _Handler = grpc.GenericRpcHandler[bytes, bytes]
else:  # grpc's runtime class is not generic; only its stubs are
    _Handler = grpc.GenericRpcHandler


class OipProxy(_Handler):
    """Handles every method of the service; register it on a grpc.aio server."""

    def __init__(
        self,
        intake: Intake,
        upstream: str,
        *,
        deployment: DeploymentConfig | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        max_inflight_bytes: int | None = None,
    ) -> None:
        """``max_inflight_bytes``: ModelInfer request bytes in flight to the model server
        at once (default 16 maximum messages); past it, calls wait their turn."""
        self.upstream = upstream
        # The same message limit towards the model server as towards its
        # clients (a tensor the proxy's listener takes must also come back);
        # the model server is assumed to take requests up to it too, and no
        # more: the proxy adds no id that would take a request over it. An
        # answer may be a little longer than the limit (the echoed id): the
        # proxy takes it, and so must its listener (``server_options``).
        self._max_message_bytes = max_message_bytes
        options = [
            ("grpc.max_receive_message_length", max_message_bytes + RESPONSE_MARGIN),
            ("grpc.max_send_message_length", max_message_bytes),
            *RECONNECT_BACKOFF,
        ]
        self._pool = ChannelPool(upstream, options, MODEL_INFER)
        self.budget = ByteBudget(max_inflight_bytes or INFLIGHT_MESSAGES * max_message_bytes)
        # The methods passed through read theirs within a budget of their own.
        self.passthrough = Reads(
            ByteBudget(PASSTHROUGH_MESSAGES * max_message_bytes),
            max_message_bytes,
            RequestReads(most_outside=PASSTHROUGH_MESSAGES),
        )
        self._recorder = Recorder(intake)
        self._log = RateLimitedLog(_log)
        self._ids = PredictionIds(max_message_bytes, self._log)
        self.reads = RequestReads()
        self.requests = 0
        self.unreadable_requests = 0  # malformed: forwarded untouched, recorded under a new id
        del deployment  # identity is stamped by the intake's enricher

    @property
    def dropped(self) -> int:
        """Events the proxy could not record (buffer full or spool refused)."""
        return self._recorder.dropped

    @property
    def rejected_events(self) -> int:
        """Events the intake refused (a reason logged for each, rate-limited)."""
        return self._recorder.rejected

    @property
    def invalid_caller_ids(self) -> int:
        """Caller ids skipped as unusable (not 1-256 printable ASCII characters)."""
        return self._ids.invalid_caller_ids

    @property
    def ids_not_added(self) -> int:
        """Requests without an id too close to the message limit for the proxy to add one."""
        return self._ids.ids_not_added

    @property
    def slow_reads(self) -> int:
        """ModelInfer requests read outside the budget (not arrived ``READ_GRACE_S`` after
        their room)."""
        return self.reads.slow_reads

    @property
    def reading_outside(self) -> int:
        """Of those, being read now (at most ``MAX_READS_OUTSIDE``)."""
        return self.reads.reading_outside

    @property
    def slow_refused(self) -> int:
        """Calls refused (UNAVAILABLE) as slow past ``MAX_READS_OUTSIDE``, or as streams
        past ``MAX_STREAMS`` (``_oip_reads``)."""
        passed = self.passthrough.reads
        return self.reads.slow_refused + passed.slow_refused + passed.streams_refused

    @property
    def inflight_bytes(self) -> int:
        """Request bytes held for the model server now, in both budgets."""
        return self.budget.used + self.passthrough.budget.used

    @property
    def budget_waits(self) -> int:
        """Calls that waited for room in an in-flight byte budget (ModelInfer's, or the
        other methods')."""
        return self.budget.waits + self.passthrough.budget.waits

    @property
    def upstream_connections(self) -> int:
        """Connections opened to the model server (at most ``_oip_upstream.MAX_CHANNELS``)."""
        return len(self._pool.upstreams)

    def server_options(self, options: Iterable[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """A listener's gRPC ``options`` with room to send the answers the proxy takes.

        The model server's answer may be up to ``RESPONSE_MARGIN`` bytes over
        the message limit (an echo of the id the proxy added); gRPC takes the
        first value of an option, so the raised send limit comes first, with
        ``LISTENER_OPTIONS`` (a request not yet read stays with its caller).
        """
        send = ("grpc.max_send_message_length", self._max_message_bytes + RESPONSE_MARGIN)
        return [send, *LISTENER_OPTIONS, *(option for option in options if option[0] != send[0])]

    def generic_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        """This proxy as a handler for ``server.add_generic_rpc_handlers``."""
        return self

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        """ModelInfer is looked into; every other method passes through untouched."""
        method = handler_call_details.method
        if method == MODEL_INFER:
            # A request stream, though the caller sends one request (HTTP/2
            # does not tell the two apart): a unary handler is called only
            # once gRPC has taken the whole request from the caller.
            return grpc.stream_unary_rpc_method_handler(self.model_infer)
        return passthrough_handler(self._pool, method, self.passthrough, kind=_cardinality(method))

    async def model_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        """Forward one inference; record it (with the id and version actually used).

        The request is read only once the byte budget has room for the
        largest one (its size is unknown until then); until that, its bytes
        stay with the caller (HTTP/2 flow control, ``LISTENER_OPTIONS``).
        Once read, the call holds its own size (and the id added) instead.
        """
        self.requests += 1
        start_ns, started = time.time_ns(), time.perf_counter_ns()
        metadata = forwardable(context.invocation_metadata())
        share = self.budget.share()
        try:
            try:
                await share.take(self._max_message_bytes)
                request = await self.reads.read(context, share)
            except TooManySlowError:
                unavailable = grpc.StatusCode.UNAVAILABLE
                self._unread(metadata, start_ns, started, context, status=unavailable)
                await context.abort(
                    unavailable, too_many_slow("ModelInfer", self.reads.most_outside())
                )
            except (asyncio.CancelledError, Exception):
                # Cancelled (a deadline, the caller), or the call ended under
                # the read (grpc.aio then raises its own errors): recorded as
                # a call whose request was never read.
                self._unread(metadata, start_ns, started, context)
                raise
            if not isinstance(request, bytes):  # EOF: no request came
                # The call ended under the read (grpc.aio's read then gives EOF,
                # and may do so before the context says it was cancelled), or a
                # caller half-closed without a request: either way a call that
                # never reached the model server, recorded as such.
                self._unread(metadata, start_ns, started, context)
                await context.abort(grpc.StatusCode.INTERNAL, "ModelInfer: no request message")
            parsed = read_fields(request)
            if parsed is None:
                self._count_unreadable()
            # "": the request has no id (or the proxy cannot read the request
            # at all); None: it has one the proxy cannot read (over 4 KiB, not
            # UTF-8).
            oip_id = "" if parsed is None else parsed.id
            prediction_id = self._ids.pick(oip_id, metadata)
            # The model server echoes the prediction id. An id of the caller's,
            # usable or not, and bytes the proxy cannot read pass untouched: an
            # appended id would override the caller's own.
            field = self._ids.field(request, prediction_id) if parsed and oip_id == "" else b""
            event = self._event(prediction_id, parsed or NO_FIELDS, metadata, start_ns)
            # The bytes sent upstream, held (by gRPC) until the answer. A
            # request read outside the budget (slow) goes at once too, past
            # the cap if need be: queued, it would sit here whole.
            share.hold(len(request) + len(field))
            upstream = self._pool.take()
            try:
                if field:  # the one copy of the request the proxy makes, counted in the share
                    request += field
                return await forward(
                    upstream,
                    request,
                    metadata,
                    context,
                    event=event,
                    started=started,
                    unreadable=parsed is None,
                    recorder=self._recorder,
                )
            finally:
                self._pool.give_back(upstream)
        finally:
            share.release()

    @staticmethod
    def _event(
        prediction_id: str, fields: OipFields, metadata: Metadata, start_ns: int
    ) -> PredictionEvent:
        """The call's event (its trace context taken, or started, in ``metadata``)."""
        trace_id, span_id = trace_context(metadata)
        return PredictionEvent(
            prediction_id=prediction_id,
            trace_id=trace_id,
            span_id=span_id,
            timestamp_unix_nano=start_ns,
            model=ModelRef(clean_text(fields.model_name), clean_text(fields.model_version)),
            endpoint=MODEL_INFER,
            protocol=PROTOCOL,
        )

    def _unread(
        self,
        metadata: Metadata,
        start_ns: int,
        started: int,
        context: grpc.aio.ServicerContext[bytes, bytes],
        status: grpc.StatusCode | None = None,
    ) -> None:
        """Record a call that ended (deadline, cancellation) before its request was read.

        ``status``: the proxy's own refusal; else the cancellation's (``cancel_status``).

        It never reached the model server; its event has the caller's id
        from the metadata (``x-request-id``, ``ce-id``) or a new one, and no
        model (both are in the request the proxy did not take).
        """
        prediction_id = self._ids.pick("", metadata)
        event = self._event(prediction_id, NO_FIELDS, metadata, start_ns)
        self._recorder.finish(event, started, status=status or cancel_status(context))

    def _count_unreadable(self) -> None:
        self.unreadable_requests += 1
        self._log.warning(
            "unreadable-request",
            "OIP proxy: a ModelInfer request is not a well-formed protobuf message;"
            " forwarded untouched",
        )

    async def close(self) -> None:
        """Flush recorded events briefly and close the upstream channels. Safe twice."""
        await self._recorder.close()
        await self._pool.close()

"""The OIP v2 gRPC proxy: a transparent, byte-level source in front of a model server.

Client -> **OipProxy** -> model server (``inference.GRPCInferenceService``,
over a few connections: ``_oip_upstream.ChannelPool``). Every method is
passed through as bytes (a generic stream handler, so any cardinality works;
a single request to a method known to be unary goes upstream as a unary
request, see ``_passthrough``), with its metadata, trailers and status (rich
error details and retry pushback included). ``ModelInfer`` alone is looked
into: the proxy reads model_name, model_version and id from the request and
response bytes (``_oip_fields``, without copying the tensors), picks the
prediction id (DESIGN §3: the OIP id, then ``x-request-id``, then ``ce-id``,
else a new UUIDv7), adds it when the request has no id and the message limit
leaves room (rewriting the request bytes; a caller's id is never replaced),
tells the caller the id (``x-prediction-id`` in the headers, or in the
trailers of an error without headers), forwards or starts a W3C
``traceparent``, and records a prediction event with the version actually
served, or with the error (a deadline or a cancellation included). Requests
in flight to the model server are held under a byte budget
(``_oip_upstream.ByteBudget``): past it, calls wait their turn, before their
request is read (its bytes stay with the caller, see ``model_infer``). Events
are recorded off the response path: the model's answer never waits for
telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Final, TypeGuard

import grpc
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from predtrace.sidecar._config import DeploymentConfig
from predtrace.sidecar._errors import SpoolError
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._oip_fields import OipFields, clean_text, id_field, read_fields
from predtrace.sidecar._oip_upstream import BudgetShare, ByteBudget, ChannelPool, Upstream
from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.wire import CALLER_ID_RE, ModelRef, PredictionEvent, Status, new_prediction_id

_log = logging.getLogger("predtrace.sidecar.oip")
SERVICE: Final = "inference.GRPCInferenceService"
MODEL_INFER: Final = f"/{SERVICE}/ModelInfer"
PROTOCOL: Final = "oip-v2-grpc"
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
# How much bigger than the message limit a model server's answer may be: an
# answer that echoes the id the proxy added (up to 256 characters) is that
# much longer than the one the caller would have had directly.
RESPONSE_MARGIN: Final = 1024
# Requests in flight to the model server, in maximum messages, by default.
INFLIGHT_MESSAGES: Final = 16
# The listener's HTTP/2 flow control. gRPC core lets a caller send as much of
# a call's request as the call's window allows, read or not, and by default
# grows that window (BDP probing) to whole messages. Without probing it stays
# at 64 KiB until the handler reads (and then opens to the message being
# read): a ModelInfer call waiting for room in the byte budget leaves its
# request with its caller, instead of the proxy holding it in full. Loopback
# throughput of 4 MiB requests is not lower for it (their read opens the
# window); across a long, slow link (not measured) one upload may be.
LISTENER_OPTIONS: Final = (("grpc.http2.bdp_probe", 0),)
# A ModelInfer request not read this long after its call got room in the
# budget is read outside it (see ``OipProxy._read_request``).
READ_GRACE_S: Final = 0.25
# Requests read outside the budget at once, at most: each holds what of it has
# arrived, up to a whole message, uncounted until read. Past that, a call whose
# request has not arrived is refused, retryable (UNAVAILABLE): kept waiting
# with its room, it would hold up the calls behind it (callers that never send
# would stall the proxy); read outside the budget, it would hold bytes beyond
# any bound. The proxy's requests stay within twice the budget (the reads
# outside it, then the budget, which takes no new call while they drain past
# its cap).
MAX_READS_OUTSIDE: Final = INFLIGHT_MESSAGES
_TOO_MANY_SLOW: Final = (
    f"ModelInfer: the request had not arrived {READ_GRACE_S:g} s after the proxy had room "
    f"for it, and {MAX_READS_OUTSIDE} other calls' requests are arriving slowly; retry"
)


class _TooManySlowError(Exception):
    """A request slow to arrive while ``MAX_READS_OUTSIDE`` others are (see ``_read_request``)."""


# A cancellation this close to the call's deadline is the deadline's (see _cancel_status).
_DEADLINE_SLACK_S: Final = 0.05
# A caller id outside the wire's rule (CALLER_ID_RE, as in the middleware) is
# refused by the intake (a NUL) or cannot be looked up in the collector (a
# space, non-ASCII, over 256 characters).
# Where a caller's id may come from after the OIP ``id``, in order (DESIGN §3).
_CALLER_ID_KEYS: Final = ("x-request-id", "ce-id")
# W3C Trace Context's rules (lower-case hex, no version ff, four fields in
# version 00, no all-zero ids), as OpenTelemetry's propagator applies them.
_TRACE_CONTEXT: Final = TraceContextTextMapPropagator()
# gRPC's connection backoff (1 s, growing to 120 s) would keep answering
# UNAVAILABLE for up to two minutes after the model server next to the proxy
# restarts. Retry from 100 ms, growing to at most 1 s: a local server that
# comes back is reached within about a second, at the cost of one refused
# connect a second while it is down. (grpc.min_reconnect_backoff_ms is not a
# backoff but the time one connection attempt may take, 20 s by default: it
# stays, so a slow handshake is not cut short.)
_RECONNECT_BACKOFF: Final = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# Methods known to take exactly one request: every method of the OIP v2
# service but the streaming one (and any the model server lacks), and health
# checks. Only these are read ahead to be sent as unary requests; any other
# method streams at once, since its caller may wait for an answer before it
# sends again.
_STREAM_INFER: Final = f"/{SERVICE}/ModelStreamInfer"
_HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"


def _takes_one_request(method: str) -> bool:
    if method == _HEALTH_CHECK:
        return True
    return method.startswith(f"/{SERVICE}/") and method != _STREAM_INFER


Metadata = list[tuple[str, str | bytes]]
if TYPE_CHECKING:
    _Handler = grpc.GenericRpcHandler[bytes, bytes]
else:  # grpc's runtime class is not generic; only its stubs are
    _Handler = grpc.GenericRpcHandler


def _forwardable(metadata: Iterable[Any] | None) -> Metadata:
    return [
        (key, value)
        for key, value in metadata or ()
        if key not in _RESERVED_KEYS and not key.startswith(":")
    ]


def _with_prediction_id(metadata: Metadata, prediction_id: str) -> Metadata:
    """``metadata`` and the prediction id (not twice, if the model server sent the same)."""
    entry = (PREDICTION_ID_HEADER, prediction_id)
    if entry not in metadata:
        metadata.append(entry)
    return metadata


def _trace_context(metadata: Metadata) -> tuple[bytes, bytes]:
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


def _usable(caller_id: object) -> TypeGuard[str]:
    return isinstance(caller_id, str) and CALLER_ID_RE.fullmatch(caller_id) is not None


def _cancel_status(context: grpc.aio.ServicerContext[bytes, bytes]) -> grpc.StatusCode:
    """Why grpc.aio cancelled a handler: its deadline passed, or the call was cancelled.

    The caller's own deadline fires first and cancels the call: the server
    sees the cancellation a few milliseconds before its copy of the deadline.
    """
    if _past_deadline(context):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _past_deadline(context: grpc.aio.ServicerContext[bytes, bytes]) -> bool:
    """Whether the call's deadline has passed (or is within ``_DEADLINE_SLACK_S``)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_SLACK_S


class _Recorder:
    """A bounded buffer between the proxy and the intake (drops and rejections counted)."""

    def __init__(self, intake: Intake, capacity: int = 10_000) -> None:
        self._intake = intake
        self._queue: asyncio.Queue[PredictionEvent] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
        self.rejected = 0
        """Events the intake refused (also in its counters): logged, with the reason."""
        self._log = RateLimitedLog(_log)

    def record(self, event: PredictionEvent) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="predtrace-oip-recorder")
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 1000:
                batch.append(self._queue.get_nowait())
            try:
                result = await self._intake.record(batch)
            except SpoolError as exc:
                self.dropped += len(batch)
                self._log.warning("spool", "OIP proxy events not spooled: %s", exc)
            except Exception as exc:  # noqa: BLE001 - the recorder must go on recording
                self.dropped += len(batch)
                self._log.warning("error", "OIP proxy events not recorded: %r", exc)
            else:
                for rejection in result.rejected:
                    self.rejected += 1
                    reason = rejection.reason
                    self._log.warning("rejected", "OIP proxy: an event was refused: %s", reason)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109 - a flush deadline
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.dropped += self._queue.qsize()


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
            *_RECONNECT_BACKOFF,
        ]
        self._pool = ChannelPool(upstream, options, MODEL_INFER)
        self.budget = ByteBudget(max_inflight_bytes or INFLIGHT_MESSAGES * max_message_bytes)
        self._recorder = _Recorder(intake)
        self._log = RateLimitedLog(_log)
        self.requests = 0
        self.invalid_caller_ids = 0
        self.unreadable_requests = 0  # malformed: forwarded untouched, recorded under a new id
        self.ids_not_added = 0  # no room under the message limit for the id the proxy adds
        self.slow_reads = 0  # requests read outside the budget: not arrived in READ_GRACE_S
        self.reading_outside = 0  # of those, being read now (at most MAX_READS_OUTSIDE)
        self.slow_refused = 0  # calls refused as slow past MAX_READS_OUTSIDE (UNAVAILABLE)
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
    def budget_waits(self) -> int:
        """ModelInfer calls that waited for room in the in-flight byte budget."""
        return self.budget.waits

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

        async def passthrough(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
        ) -> AsyncIterator[bytes]:
            async for item in self._passthrough(method, requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(passthrough)

    async def _passthrough(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[bytes, bytes],
    ) -> AsyncIterator[bytes]:
        """Forward one call of any cardinality; the upstream's status reaches the caller.

        A call to a method known to take one request (``_takes_one_request``)
        that sent exactly one goes upstream as unary-stream, not as a request
        stream: grpc.aio reports a request write that fails because the
        upstream already ended the call (an unknown method, an early abort) as
        INTERNAL "Internal error from Core", overwriting the upstream's status
        (grpc/grpc#36066); a unary request is sent in one batch whose failure
        defers to the status the upstream sent. Calls that stream requests (or
        may: methods of other services) keep that race.
        """
        metadata = _forwardable(context.invocation_metadata())
        head: list[bytes] = []
        if _takes_one_request(method):
            head = [item async for item in _take(requests, 2)]
        upstream = self._pool.take()
        try:
            call = self._open_call(
                upstream.channel,
                method,
                head,
                requests,
                metadata=metadata,
                timeout=context.time_remaining(),
            )
        except BaseException:
            self._pool.give_back(upstream)
            raise
        try:
            # Before the first response, and also when there is none: the
            # caller may read the headers before (or without) a message.
            initial = _forwardable(await call.initial_metadata())
            if initial:  # none: grpc sends its own headers, or a trailers-only error
                await context.send_initial_metadata(initial)
            async for response in call:
                yield response
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                exc.code(), exc.details() or "", tuple(_forwardable(exc.trailing_metadata()))
            )
        finally:
            # A caller that cancels (or whose deadline passes) ends the
            # upstream call too; grpc.aio does not cancel a call a cancelled
            # task was iterating. Cancelling a finished call does nothing.
            call.cancel()
            self._pool.give_back(upstream)

    @staticmethod
    def _open_call(
        channel: grpc.aio.Channel,
        method: str,
        head: list[bytes],
        requests: AsyncIterator[bytes],
        *,
        metadata: Metadata,
        timeout: float | None,
    ) -> grpc.aio.UnaryStreamCall[bytes, bytes] | grpc.aio.StreamStreamCall[bytes, bytes]:
        """The upstream call: unary-stream for a single request to a one-request method."""
        if len(head) == 1:
            return channel.unary_stream(method, None, None)(
                head[0], metadata=metadata, timeout=timeout
            )
        return channel.stream_stream(method, None, None)(
            _chain(head, requests) if head else requests, metadata=metadata, timeout=timeout
        )

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
        metadata = _forwardable(context.invocation_metadata())
        share = self.budget.share()
        try:
            try:
                await share.take(self._max_message_bytes)
                request = await self._read_request(context, share)
            except _TooManySlowError:
                unavailable = grpc.StatusCode.UNAVAILABLE
                self._unread(metadata, start_ns, started, context, status=unavailable)
                await context.abort(unavailable, _TOO_MANY_SLOW)
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
            prediction_id = self._caller_id(oip_id, metadata) or new_prediction_id()
            # The model server echoes the prediction id. An id of the caller's,
            # usable or not, and bytes the proxy cannot read pass untouched: an
            # appended id would override the caller's own.
            field = self._id_field(request, prediction_id) if parsed and oip_id == "" else b""
            event = self._event(prediction_id, parsed or _NO_FIELDS, metadata, start_ns)
            # The bytes sent upstream, held (by gRPC) until the answer. A
            # request read outside the budget (slow) goes at once too, past
            # the cap if need be: queued, it would sit here whole.
            share.hold(len(request) + len(field))
            upstream = self._pool.take()
            try:
                if field:  # the one copy of the request the proxy makes, counted in the share
                    request += field
                return await self._forward(
                    upstream,
                    request,
                    metadata,
                    context,
                    event=event,
                    started=started,
                    unreadable=parsed is None,
                )
            finally:
                self._pool.give_back(upstream)
        finally:
            share.release()

    async def _read_request(
        self, context: grpc.aio.ServicerContext[bytes, bytes], share: BudgetShare
    ) -> object:
        """The call's one request (``EOF`` if none came), read within ``share`` if it is quick.

        Read from the context (an iterator over the request stream left
        suspended after it would keep the request alive). A request still
        arriving ``READ_GRACE_S`` after the call got its room (a slow link,
        or a caller that has not sent it yet) gives the room back and is read
        outside the budget: calls that wait on their callers never hold up
        the others. At most ``MAX_READS_OUTSIDE`` at once.

        Raises:
            _TooManySlowError: past that (the call is to be refused).
        """
        read = asyncio.ensure_future(context.read())
        outside = False
        try:
            done, _ = await asyncio.wait((read,), timeout=READ_GRACE_S)
            if not done:
                if self.reading_outside >= MAX_READS_OUTSIDE:
                    self.slow_refused += 1
                    raise _TooManySlowError
                outside = True
                self.reading_outside += 1
                share.release()
                self.slow_reads += 1
            return await read
        finally:
            read.cancel()  # nothing once it is done; else the call is ending
            if outside:
                self.reading_outside -= 1

    @staticmethod
    def _event(
        prediction_id: str, fields: OipFields, metadata: Metadata, start_ns: int
    ) -> PredictionEvent:
        """The call's event (its trace context taken, or started, in ``metadata``)."""
        trace_id, span_id = _trace_context(metadata)
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

        ``status``: the proxy's own refusal; else the cancellation's (``_cancel_status``).

        It never reached the model server; its event has the caller's id
        from the metadata (``x-request-id``, ``ce-id``) or a new one, and no
        model (both are in the request the proxy did not take).
        """
        prediction_id = self._caller_id("", metadata) or new_prediction_id()
        event = self._event(prediction_id, _NO_FIELDS, metadata, start_ns)
        self._finish(event, started, status=status or _cancel_status(context))

    def _id_field(self, request: bytes, prediction_id: str) -> bytes:
        """The id field to add to the request; none if that takes it over the message limit.

        A request the model server would take without the id must not be
        refused because of it (telemetry never changes a prediction): it
        goes untouched, and its event keeps the id (the answer lacks it).
        """
        field = id_field(prediction_id)
        if len(request) + len(field) <= self._max_message_bytes:
            return field
        self.ids_not_added += 1
        self._log.warning(
            "id-not-added",
            "OIP proxy: a request without an id is too close to the %d-byte message limit"
            " for the proxy to add one; forwarded without it (its event keeps the id)",
            self._max_message_bytes,
        )
        return b""

    def _count_unreadable(self) -> None:
        self.unreadable_requests += 1
        self._log.warning(
            "unreadable-request",
            "OIP proxy: a ModelInfer request is not a well-formed protobuf message;"
            " forwarded untouched",
        )

    async def _forward(
        self,
        upstream: Upstream,
        request: bytes,
        metadata: Metadata,
        context: grpc.aio.ServicerContext[bytes, bytes],
        *,
        event: PredictionEvent,
        started: int,
        unreadable: bool,
    ) -> bytes:
        """Send the request upstream; answer the caller and record the outcome, whatever it is.

        The caller learns the prediction id in the ``x-prediction-id`` header
        (after the model server's own headers), also when the model server
        does not echo it, the call fails, or the caller's id was unusable.
        """
        call = upstream.infer(request, metadata=metadata, timeout=context.time_remaining())
        try:
            response: bytes = await call
            _note_served(event, response, unreadable_request=unreadable)
            initial = _forwardable(await call.initial_metadata())
            await context.send_initial_metadata(_with_prediction_id(initial, event.prediction_id))
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as exc:
            self._finish(event, started, status=exc.code())
            # Headers the model server sent before it failed (a retry hint,
            # say) reach the caller as they would directly, with the id; a
            # trailers-only error stays trailers-only, the id in its trailers.
            initial = _forwardable(exc.initial_metadata())
            trailing = _forwardable(exc.trailing_metadata())
            if initial:
                await context.send_initial_metadata(
                    _with_prediction_id(initial, event.prediction_id)
                )
            else:
                _with_prediction_id(trailing, event.prediction_id)
            await context.abort(exc.code(), exc.details() or "", tuple(trailing))
        except asyncio.CancelledError:
            # grpc.aio cancels the handler when the call's deadline passes, the
            # client cancels or the server stops: the model server may have run
            # the prediction, so it is recorded (without waiting: the recorder
            # only buffers), and the cancellation goes on.
            self._finish(event, started, status=_cancel_status(context))
            raise
        self._finish(event, started, status=grpc.StatusCode.OK)
        return response

    def _caller_id(self, oip_id: str | None, metadata: Metadata) -> str | None:
        """The first usable caller id: the OIP id, then ``x-request-id``, then ``ce-id``.

        An unusable one is skipped, counted and logged (never its value).
        """
        candidates: list[tuple[str, str | bytes | None]] = [] if oip_id == "" else [("id", oip_id)]
        for name in _CALLER_ID_KEYS:
            candidates += [(key, value) for key, value in metadata if key == name][:1]
        for source, value in candidates:
            if _usable(value):
                return value
            self.invalid_caller_ids += 1
            self._log.warning(
                f"caller-id-{source}",
                "OIP proxy: a caller's %s is not 1-256 printable ASCII characters; not used",
                source,
            )
        return None

    def _finish(self, event: PredictionEvent, started: int, *, status: grpc.StatusCode) -> None:
        event.duration_nanos = time.perf_counter_ns() - started
        event.status = Status.OK if status == grpc.StatusCode.OK else Status.ERROR
        event.status_code = status.name
        if event.status == Status.ERROR:
            event.error_type = "grpc"
        self._recorder.record(event)

    async def close(self) -> None:
        """Flush recorded events briefly and close the upstream channels. Safe twice."""
        await self._recorder.close()
        await self._pool.close()


async def _take(items: AsyncIterator[bytes], n: int) -> AsyncIterator[bytes]:
    """The first ``n`` items (fewer if the caller half-closes), leaving the rest."""
    for _ in range(n):
        item = await anext(items, None)
        if item is None:
            return
        yield item


async def _chain(head: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for item in head:
        yield item
    async for item in rest:
        yield item


_NO_FIELDS: Final = OipFields("", "", "")


def _note_served(event: PredictionEvent, response: bytes, *, unreadable_request: bool) -> None:
    """The model and version that answered; for an unreadable request, the answer's id."""
    served = read_fields(response) or _NO_FIELDS
    if unreadable_request and _usable(served.id):
        event.prediction_id = served.id
    event.model.name = clean_text(served.model_name) or event.model.name
    event.model.version = clean_text(served.model_version) or event.model.version

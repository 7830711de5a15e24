"""The OIP v2 gRPC proxy: a transparent, byte-level source in front of a model server.

Client -> **OipProxy** -> model server (``inference.GRPCInferenceService``).
Every method is passed through as bytes (a generic stream handler, so any
cardinality works; a single request to a method known to be unary goes
upstream as a unary request, see ``_passthrough``). ``ModelInfer`` alone is
looked into: the proxy reads model_name, model_version and id from the
request and response bytes (``_oip_fields``, protobuf's C parser), picks the
prediction id (DESIGN §3: the OIP id, then ``x-request-id``, then ``ce-id``,
else a new UUIDv7), adds it when the request has no id and the message limit
leaves room (rewriting the request bytes; a caller's id is never replaced),
forwards or starts a W3C ``traceparent``, and records a prediction
event with the version actually served, or with the error (a deadline or a
cancellation included). Events are recorded off the response path: the
model's answer never waits for telemetry.
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
from predtrace.sidecar._oip_fields import OipFields, id_field, read_fields
from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.wire import CALLER_ID_RE, ModelRef, PredictionEvent, Status, new_prediction_id

_log = logging.getLogger("predtrace.sidecar.oip")
SERVICE: Final = "inference.GRPCInferenceService"
MODEL_INFER: Final = f"/{SERVICE}/ModelInfer"
PROTOCOL: Final = "oip-v2-grpc"
_SKIP_METADATA: Final = ("grpc-", ":")
_SKIP_KEYS: Final = frozenset({"user-agent", "te", "content-type", "host"})
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
        if key not in _SKIP_KEYS and not key.startswith(_SKIP_METADATA)
    ]


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
    """Why grpc.aio cancelled a handler: its deadline passed, or the call was cancelled."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class _Recorder:
    """A bounded buffer between the proxy and the intake (drops counted)."""

    def __init__(self, intake: Intake, capacity: int = 10_000) -> None:
        self._intake = intake
        self._queue: asyncio.Queue[PredictionEvent] = asyncio.Queue(capacity)
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0
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
                await self._intake.record(batch)
            except SpoolError as exc:
                self.dropped += len(batch)
                self._log.warning("spool", "OIP proxy events not spooled: %s", exc)
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
    ) -> None:
        self.upstream = upstream
        # The same message limit towards the model server as towards its
        # clients (a tensor the proxy's listener takes must also come back);
        # the model server is assumed to take requests up to it too, and no
        # more: the proxy adds no id that would take a request over it.
        self._max_message_bytes = max_message_bytes
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *_RECONNECT_BACKOFF,
        ]
        self._channel = grpc.aio.insecure_channel(upstream, options=options)
        self._infer = self._channel.unary_unary(MODEL_INFER, None, None)
        self._recorder = _Recorder(intake)
        self._log = RateLimitedLog(_log)
        self.requests = 0
        self.invalid_caller_ids = 0
        self.unreadable_requests = 0  # malformed: forwarded untouched, recorded under a new id
        self.ids_not_added = 0  # no room under the message limit for the id the proxy adds
        del deployment  # identity is stamped by the intake's enricher

    @property
    def dropped(self) -> int:
        """Events the proxy could not record (buffer full or spool refused)."""
        return self._recorder.dropped

    def generic_handler(self) -> grpc.GenericRpcHandler[bytes, bytes]:
        """This proxy as a handler for ``server.add_generic_rpc_handlers``."""
        return self

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        """ModelInfer is looked into; every other method passes through untouched."""
        method = handler_call_details.method
        if method == MODEL_INFER:
            return grpc.unary_unary_rpc_method_handler(self.model_infer)

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
        call: grpc.aio.UnaryStreamCall[bytes, bytes] | grpc.aio.StreamStreamCall[bytes, bytes]
        if not _takes_one_request(method):
            call = self._channel.stream_stream(method, None, None)(
                requests, metadata=metadata, timeout=context.time_remaining()
            )
        else:
            head = [item async for item in _take(requests, 2)]
            if len(head) == 1:
                call = self._channel.unary_stream(method, None, None)(
                    head[0], metadata=metadata, timeout=context.time_remaining()
                )
            else:
                call = self._channel.stream_stream(method, None, None)(
                    _chain(head, requests), metadata=metadata, timeout=context.time_remaining()
                )
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

    async def model_infer(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        """Forward one inference; record it (with the id and version actually used)."""
        self.requests += 1
        start_ns, started = time.time_ns(), time.perf_counter_ns()
        parsed = read_fields(request)
        if parsed is None:
            self._count_unreadable()
        metadata = _forwardable(context.invocation_metadata())
        # "": the request has no id (or the proxy cannot read the request at
        # all); None: it has one the proxy cannot read (over 4 KiB, not UTF-8).
        oip_id = "" if parsed is None else parsed.id
        prediction_id = self._caller_id(oip_id, metadata) or new_prediction_id()
        if parsed is not None and oip_id == "":
            # The model server echoes the prediction id. An id of the caller's,
            # usable or not, and bytes the proxy cannot read pass untouched:
            # an appended id would override the caller's own.
            request = self._with_id(request, prediction_id)
        trace_id, span_id = _trace_context(metadata)
        fields = parsed or _NO_FIELDS
        event = PredictionEvent(
            prediction_id=prediction_id,
            trace_id=trace_id,
            span_id=span_id,
            timestamp_unix_nano=start_ns,
            model=ModelRef(fields.model_name or "", fields.model_version or ""),
            endpoint=MODEL_INFER,
            protocol=PROTOCOL,
        )
        return await self._forward(
            request, metadata, context, event=event, started=started, unreadable=parsed is None
        )

    def _with_id(self, request: bytes, prediction_id: str) -> bytes:
        """The request with the prediction id added, unless that takes it over the message limit.

        A request the model server would take without the id must not be
        refused because of it (telemetry never changes a prediction): it
        goes untouched, and its event keeps the id (the answer lacks it).
        """
        field = id_field(prediction_id)
        if len(request) + len(field) <= self._max_message_bytes:
            return request + field
        self.ids_not_added += 1
        self._log.warning(
            "id-not-added",
            "OIP proxy: a request without an id is too close to the %d-byte message limit"
            " for the proxy to add one; forwarded without it (its event keeps the id)",
            self._max_message_bytes,
        )
        return request

    def _count_unreadable(self) -> None:
        self.unreadable_requests += 1
        self._log.warning(
            "unreadable-request",
            "OIP proxy: a ModelInfer request is not a well-formed protobuf message;"
            " forwarded untouched",
        )

    async def _forward(
        self,
        request: bytes,
        metadata: Metadata,
        context: grpc.aio.ServicerContext[bytes, bytes],
        *,
        event: PredictionEvent,
        started: int,
        unreadable: bool,
    ) -> bytes:
        """Send the request upstream; answer the caller and record the outcome, whatever it is."""
        call = self._infer(request, metadata=metadata, timeout=context.time_remaining())
        try:
            response: bytes = await call
            _note_served(event, response, unreadable_request=unreadable)
            await context.send_initial_metadata(_forwardable(await call.initial_metadata()))
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as exc:
            self._finish(event, started, status=exc.code())
            # Headers the model server sent before it failed (a retry hint,
            # say) reach the caller as they would directly; a trailers-only
            # error stays trailers-only.
            initial = _forwardable(exc.initial_metadata())
            if initial:
                await context.send_initial_metadata(initial)
            await context.abort(
                exc.code(), exc.details() or "", tuple(_forwardable(exc.trailing_metadata()))
            )
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
        """Flush recorded events briefly and close the upstream channel. Safe twice."""
        await self._recorder.close()
        await self._channel.close(None)


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
    event.model.name = served.model_name or event.model.name
    event.model.version = served.model_version or event.model.version

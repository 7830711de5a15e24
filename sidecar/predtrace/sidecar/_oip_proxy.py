"""The OIP v2 gRPC proxy: a transparent, byte-level source in front of a model server.

Client -> **OipProxy** -> model server (``inference.GRPCInferenceService``).
Every method is passed through as bytes (a generic stream handler, so any
cardinality works; a single request to a method known to be unary goes
upstream as a unary request, see ``_passthrough``). ``ModelInfer`` alone is
looked into: the proxy reads model_name, model_version and id from the
request and response bytes, adds an id when the caller sent none (rewriting
the request bytes), forwards or starts a W3C ``traceparent``, and records a
prediction event with the version actually served, or with the error. Events
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
from typing import TYPE_CHECKING, Any, Final

import grpc

from predtrace.sidecar._config import DeploymentConfig
from predtrace.sidecar._errors import SpoolError
from predtrace.sidecar._intake import Intake
from predtrace.sidecar._protowire import ProtoWireError, append_string_field, top_level_strings
from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.wire import ModelRef, PredictionEvent, Status, new_prediction_id

_log = logging.getLogger("predtrace.sidecar.oip")
SERVICE: Final = "inference.GRPCInferenceService"
MODEL_INFER: Final = f"/{SERVICE}/ModelInfer"
PROTOCOL: Final = "oip-v2-grpc"
_SKIP_METADATA: Final = ("grpc-", ":")
_SKIP_KEYS: Final = frozenset({"user-agent", "te", "content-type", "host"})
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
    """Trace and span id of the caller's traceparent, adding a new one when absent."""
    for key, value in metadata:
        if key == "traceparent" and isinstance(value, str):
            parts = value.split("-")
            if len(parts) == 4 and len(parts[1]) == 32 and len(parts[2]) == 16:
                with contextlib.suppress(ValueError):
                    return bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    metadata.append(("traceparent", f"00-{trace_id.hex()}-{span_id.hex()}-01"))
    return trace_id, span_id


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
        # clients: a tensor the proxy's listener takes must also come back.
        limits = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channel = grpc.aio.insecure_channel(upstream, options=limits)
        self._infer = self._channel.unary_unary(MODEL_INFER, None, None)
        self._recorder = _Recorder(intake)
        self.requests = 0
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
            async for response in call:
                yield response
            context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as exc:
            await context.abort(
                exc.code(), exc.details() or "", tuple(_forwardable(exc.trailing_metadata()))
            )

    async def model_infer(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        """Forward one inference; record it (with the id and version actually used)."""
        self.requests += 1
        start_ns, started = time.time_ns(), time.perf_counter_ns()
        parsed = _fields(request)
        fields = parsed or {}
        prediction_id = fields.get(3, "")
        if parsed is not None and not prediction_id:
            prediction_id = new_prediction_id()
            request = append_string_field(request, 3, prediction_id)
        # Bytes it cannot read (an id over 4 KiB, group fields) pass through
        # untouched: an appended id would override the caller's own.
        metadata = _forwardable(context.invocation_metadata())
        trace_id, span_id = _trace_context(metadata)
        event = PredictionEvent(
            prediction_id=(prediction_id or new_prediction_id())[:256],
            trace_id=trace_id,
            span_id=span_id,
            timestamp_unix_nano=start_ns,
            model=ModelRef(fields.get(1, ""), fields.get(2, "")),
            endpoint=MODEL_INFER,
            protocol=PROTOCOL,
        )
        call = self._infer(request, metadata=metadata, timeout=context.time_remaining())
        try:
            response: bytes = await call
        except grpc.aio.AioRpcError as exc:
            self._finish(event, started, status=exc.code())
            await context.abort(
                exc.code(), exc.details() or "", tuple(_forwardable(exc.trailing_metadata()))
            )
        await context.send_initial_metadata(_forwardable(await call.initial_metadata()))
        context.set_trailing_metadata(_forwardable(await call.trailing_metadata()))
        served = _fields(response) or {}
        if parsed is None and served.get(3):  # unreadable request: the answer's id
            event.prediction_id = served[3][:256]
        event.model.name = served.get(1) or event.model.name
        event.model.version = served.get(2) or event.model.version
        self._finish(event, started, status=grpc.StatusCode.OK)
        return response

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


def _fields(message: bytes) -> dict[int, str] | None:
    """model_name, model_version and id; None if the bytes are not readable."""
    try:
        return top_level_strings(message, (1, 2, 3))
    except ProtoWireError:
        return None

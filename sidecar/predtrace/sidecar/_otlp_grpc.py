"""The OTLP receiver's gRPC side: ``TraceService.Export`` in front of ``OtlpReceiver``.

gRPC client -> **TraceService** -> ``OtlpReceiver.export`` (``_otlp``). The
service takes the request's bytes whole, charges them to the receiver's
in-flight budget and parses them itself, so that every refusal has a reason:
malformed bytes are INVALID_ARGUMENT, a busy spool or a spent budget
UNAVAILABLE with a RetryInfo (retryable by the OTLP spec).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import grpc
from google.protobuf.message import DecodeError

from predtrace.sidecar._errors import SpoolError
from predtrace.sidecar._grpc_answers import Trailers, fail_call
from predtrace.sidecar._otlp_body import (
    BudgetSpentError,
    TooManySpansError,
    decode_reason,
    rpc_status,
)
from predtrace.sidecar._otlp_spans import ExportResponse, SpanIdLengthError

if TYPE_CHECKING:
    from predtrace.sidecar._otlp import OtlpReceiver

TRACE_SERVICE: Final = "opentelemetry.proto.collector.trace.v1.TraceService"
# How long a sender is told to wait when the spool is busy or full (over gRPC
# in a RetryInfo, over HTTP in Retry-After: ``_otlp_http`` reads it here).
RETRY_AFTER_S: Final = 1
_STATUS_DETAILS: Final = "grpc-status-details-bin"


def add_trace_service(server: grpc.aio.Server, receiver: OtlpReceiver) -> None:
    """Register ``TraceService`` on ``server``, its exports taken by ``receiver``."""
    server.add_generic_rpc_handlers((_TraceService(receiver).generic_handler(),))


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
        # gRPC read the request whole: its bytes are held until the call ends,
        # however it ends. Past the budget the call is refused at once, rather
        # than left waiting, its body held, for a big-parse slot.
        reservation = self._receiver.reservation()
        try:
            reservation.grow_to(len(body))
        except BudgetSpentError as exc:
            self._receiver.budget_refusals["grpc"] += 1
            failed = _unavailable(exc.reason)
        else:
            try:
                parse = self._receiver.parser(as_json=False)
                return await self._receiver.export(body, parse, reservation=reservation)
            except (DecodeError, RecursionError) as exc:
                reason = f"malformed ExportTraceServiceRequest: {decode_reason(exc)}"
                failed = grpc.StatusCode.INVALID_ARGUMENT, reason, ()
            except (TooManySpansError, SpanIdLengthError) as exc:
                failed = grpc.StatusCode.INVALID_ARGUMENT, str(exc), ()
            except SpoolError as exc:
                failed = _unavailable(str(exc))
            finally:
                reservation.release()  # the body and its parsed request are gone
        # Out of the except block, its traceback gone (see ``fail_call``).
        code, details, trailing = failed
        fail_call(context, code, details, metadata=trailing)
        return ExportResponse()  # not sent: the status is the answer


def _unavailable(message: str) -> tuple[grpc.StatusCode, str, Trailers]:
    """UNAVAILABLE with a RetryInfo: busy, full or failing, retry shortly.

    OTLP senders retry UNAVAILABLE (a RESOURCE_EXHAUSTED is retried only with
    a RetryInfo, and some senders drop it whatever); the RetryInfo says when.
    """
    unavailable = grpc.StatusCode.UNAVAILABLE
    details = rpc_status(unavailable.value[0], message, RETRY_AFTER_S)
    return unavailable, message, ((_STATUS_DETAILS, details),)

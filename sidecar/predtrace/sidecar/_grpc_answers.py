"""What a call of the sidecar's gRPC API answers: an ack, or a refusal.

GrpcSource (``_grpc_api``, ``_grpc_streams``) -> **answers**. Events are
checked here (``convert_events``) and handed to the intake
(``spool_events``); the events it rejects are listed in the ack (the first
ones by position, as many as fit the message size limit), the rest counted
by the sender. A call the handler fails itself raises ``RefusedError``:
spool pressure becomes RESOURCE_EXHAUSTED with a retry pushback, shutdown
UNAVAILABLE; ``abort`` answers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, TypeVar

import grpc

from predtrace.sidecar._errors import SpoolBusyError, SpoolClosedError, SpoolError, SpoolFullError
from predtrace.sidecar._grpc_requests import ID_CHARS
from predtrace.sidecar._intake import EventItems, Intake
from predtrace.v1 import batch_pb2, event_pb2, sidecar_pb2
from predtrace.wire import PredictionEvent, Rejection, WireError, event_from_proto

# Trailing metadata; a key ending in -bin takes bytes.
Trailers = tuple[tuple[str, str | bytes], ...]
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_PUSHBACK_MS: Final = "1000"
# An ack lists at most this many rejections (the first ones by position), and
# fewer when they would not fit the message size limit; the sender counts the
# rest as sent - accepted - listed.
MAX_LISTED_REJECTIONS: Final = 1000
# A listed rejection echoes at most this much of its reason (of its id: ID_CHARS).
_REASON_CHARS: Final = 512
_ACK_HEADROOM: Final = 64  # bytes for the ack's own fields


def convert_events(
    messages: Sequence[event_pb2.PredictionEvent],
) -> tuple[list[PredictionEvent], list[int], list[Rejection]]:
    """Validate protobuf events: the good ones, their request positions, and rejections."""
    events: list[PredictionEvent] = []
    positions: list[int] = []
    rejected: list[Rejection] = []
    for index, message in enumerate(messages):
        try:
            events.append(event_from_proto(message))
        except WireError as exc:
            rejected.append(Rejection(index, str(exc), message.prediction_id[:256]))
            continue
        positions.append(index)
    return events, positions, rejected


def ack(accepted: int, rejected: Sequence[Rejection], max_bytes: int) -> sidecar_pb2.RecordAck:
    """The ack: the first rejections by position, as many as fit ``max_bytes``.

    Its events are spooled by the time it is built: an ack the server cannot
    send would fail a call whose events go out anyway (and come back as
    duplicates when the sender retries).
    """
    answer = sidecar_pb2.RecordAck(accepted=accepted)
    budget = max_bytes - _ACK_HEADROOM
    for r in sorted(rejected, key=lambda r: r.index)[:MAX_LISTED_REJECTIONS]:
        entry = batch_pb2.Rejection(
            index=r.index,
            prediction_id=r.prediction_id[:ID_CHARS],
            reason=r.reason[:_REASON_CHARS],
        )
        budget -= entry.ByteSize() + 4  # the field's tag and length prefix
        if budget < 0:
            break
        answer.rejected.append(entry)
    return answer


def note(rejected: list[Rejection], more: Sequence[Rejection]) -> None:
    """Keep the rejections the ack may list: the first by position, no more than it lists.

    Noted in any order (a request's protobuf events are checked before the
    intake checks the rest), kept in order of position; memory stays bounded.
    """
    rejected.extend(more)
    if len(rejected) > MAX_LISTED_REJECTIONS:
        rejected.sort(key=lambda r: r.index)
        del rejected[MAX_LISTED_REJECTIONS:]


class RefusedError(Exception):
    """A call the handler fails itself: the status to answer with."""

    def __init__(self, code: grpc.StatusCode, details: str, *, pushback: bool = False) -> None:
        super().__init__(details)
        self.code, self.details, self.pushback = code, details, pushback


async def spool_events(
    intake: Intake,
    events: EventItems,
    positions: list[int],
    rejected: list[Rejection],
) -> int:
    """Hand ``events`` to the intake; the number spooled.

    Raises:
        RefusedError: the spool refused them: none of them spooled, unless
            they were more than a spool segment holds and the disk filled
            part way (the parts written stay: sent again, they are
            delivered twice, never lost).
    """
    if not events:
        return 0
    try:
        result = await intake.record(events)
    except (SpoolBusyError, SpoolFullError) as exc:
        raise RefusedError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), pushback=True) from None
    except SpoolClosedError:
        raise RefusedError(grpc.StatusCode.UNAVAILABLE, "the sidecar is shutting down") from None
    except SpoolError as exc:
        raise RefusedError(grpc.StatusCode.UNAVAILABLE, str(exc), pushback=True) from None
    note(
        rejected,
        [Rejection(positions[r.index], r.reason, r.prediction_id) for r in result.rejected],
    )
    return result.accepted


def fail_call(
    context: grpc.aio.ServicerContext[_Req, _Resp],
    code: grpc.StatusCode,
    details: str,
    *,
    pushback: bool = False,
    metadata: Trailers = (),
) -> None:
    """End the call with ``code`` when its handler returns (the response it returns is not sent).

    A pushback asks the client to wait before it retries. Not
    ``context.abort()``: the exception it raises through the handler takes
    the handler's frames, the request's bytes in them, into a reference cycle
    that only the cyclic garbage collector frees, which the sidecar runs
    seldom (``tune_gc``): under a full spool every refused request kept its
    bytes. A handler catches ``RefusedError`` at its top, leaves the
    ``except`` block (the traceback with it), then calls this.
    """
    if pushback:
        metadata += (("grpc-retry-pushback-ms", _PUSHBACK_MS),)
    context.set_code(code)
    context.set_details(details)
    context.set_trailing_metadata(metadata)

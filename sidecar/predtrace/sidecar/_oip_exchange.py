"""One ModelInfer exchange of the OIP proxy with the model server, and its outcome.

Client -> OipProxy -> **forward** -> model server. The request the proxy
read (and perhaps gave an id) goes upstream on one connection of the pool;
the answer, or the error, goes back to the caller as the model server sent
it, with the prediction id added (``x-prediction-id``); the call's event is
finished with the outcome: the model and version that served it
(``note_served``), or the error, a deadline or a cancellation included
(``cancel_status``).
"""

from __future__ import annotations

import asyncio
from typing import Final

import grpc

from predtrace.sidecar._oip_fields import NO_FIELDS, clean_text, read_fields
from predtrace.sidecar._oip_ids import usable
from predtrace.sidecar._oip_metadata import Metadata, forwardable, with_prediction_id
from predtrace.sidecar._oip_passthrough import fail_with
from predtrace.sidecar._oip_recorder import Recorder
from predtrace.sidecar._oip_upstream import Upstream
from predtrace.wire import PredictionEvent

# A cancellation this close to the call's deadline is the deadline's (see cancel_status).
_DEADLINE_SLACK_S: Final = 0.05


async def forward(
    upstream: Upstream,
    request: bytes,
    metadata: Metadata,
    context: grpc.aio.ServicerContext[bytes, bytes],
    *,
    event: PredictionEvent,
    started: int,
    unreadable: bool,
    recorder: Recorder,
) -> bytes:
    """Send the request upstream; answer the caller and record the outcome, whatever it is.

    The caller learns the prediction id in the ``x-prediction-id`` header
    (after the model server's own headers), also when the model server
    does not echo it, the call fails, or the caller's id was unusable.
    """
    call = upstream.infer(request, metadata=metadata, timeout=context.time_remaining())
    try:
        response: bytes = await call
        note_served(event, response, unreadable_request=unreadable)
        initial = forwardable(await call.initial_metadata())
        await context.send_initial_metadata(with_prediction_id(initial, event.prediction_id))
        context.set_trailing_metadata(forwardable(await call.trailing_metadata()))
    except grpc.aio.AioRpcError as exc:
        recorder.finish(event, started, status=exc.code())
        # Headers the model server sent before it failed (a retry hint,
        # say) reach the caller as they would directly, with the id; a
        # trailers-only error stays trailers-only, the id in its trailers.
        initial = forwardable(exc.initial_metadata())
        trailing = forwardable(exc.trailing_metadata())
        if initial:
            await context.send_initial_metadata(with_prediction_id(initial, event.prediction_id))
        else:
            with_prediction_id(trailing, event.prediction_id)
        fail_with(context, exc, trailing)  # not abort(): see fail_with
        return b""  # no message: the status is the answer
    except asyncio.CancelledError:
        # grpc.aio cancels the handler when the call's deadline passes, the
        # client cancels or the server stops: the model server may have run
        # the prediction, so it is recorded (without waiting: the recorder
        # only buffers), and the cancellation goes on.
        recorder.finish(event, started, status=cancel_status(context))
        raise
    recorder.finish(event, started, status=grpc.StatusCode.OK)
    return response


def note_served(event: PredictionEvent, response: bytes, *, unreadable_request: bool) -> None:
    """The model and version that answered; for an unreadable request, the answer's id."""
    served = read_fields(response) or NO_FIELDS
    if unreadable_request and usable(served.id):
        event.prediction_id = served.id
    event.model.name = clean_text(served.model_name) or event.model.name
    event.model.version = clean_text(served.model_version) or event.model.version


def cancel_status(context: grpc.aio.ServicerContext[bytes, bytes]) -> grpc.StatusCode:
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

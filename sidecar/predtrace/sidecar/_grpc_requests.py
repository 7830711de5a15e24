"""Reading the sidecar's gRPC requests: a RecordBatchRequest, and each message of a stream.

Part of ``GrpcSource`` (``_grpc_api``): requests are parsed here, not by
gRPC's deserializer, so malformed bytes get INVALID_ARGUMENT with a reason.
A request protobuf refuses whole (one event with invalid UTF-8 in a string
field, which a C++ producer can send) is read event by event, with protobuf's
C parser (``_raw_fields``): that event alone is then rejected, with the
reason, like any other that is not readable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.message import DecodeError

from predtrace.sidecar._protowire import ProtoWireError, read_varint
from predtrace.sidecar._raw_fields import bytes_message
from predtrace.v1 import event_pb2, sidecar_pb2
from predtrace.wire import Rejection

UTF8_REASON: Final = "invalid UTF-8 in a string field"
UNREADABLE_REASON: Final = "malformed PredictionEvent"
# A listed rejection echoes at most this much of the event's id and reason.
ID_CHARS: Final = 256


@dataclass(slots=True)
class Batch:
    """A ``RecordBatchRequest`` as read: its protobuf events and packed bytes."""

    events: Sequence[event_pb2.PredictionEvent]
    packed: bytes
    count: int
    """Protobuf events in the request, readable or not (packed positions follow them)."""
    places: list[int] | None = None
    """Each readable event's position in the request; None when all were readable."""
    unreadable: list[Rejection] = field(default_factory=list)
    batch_id: bytes = b""
    """The sender's id of the batch, kept across its retries (empty: none given)."""


def read_batch(request: bytes) -> Batch:
    """Parse a ``RecordBatchRequest``; one that protobuf refuses whole is read event by event.

    protobuf refuses a whole request for one event with invalid UTF-8 in a
    string field (which a C++ producer can send): that event alone is then
    rejected, with the reason, like any other that is not readable.

    Raises:
        ProtoWireError: the request itself is malformed (the cause named).
    """
    try:
        message = sidecar_pb2.RecordBatchRequest.FromString(request)
    except (DecodeError, UnicodeDecodeError):  # the latter from the pure-Python protobuf
        return _split_batch(request)
    return Batch(
        message.events, message.packed_events, len(message.events), batch_id=message.batch_id
    )


# A RecordBatchRequest with its events as bytes, and an event's id: read by
# protobuf's C parser whatever the fields around them (see _raw_fields).
_RAW_BATCH: Final = bytes_message(
    "RawBatch", [(1, "events", True), (2, "packed_events", False), (3, "batch_id", False)]
)
_RAW_ID: Final = bytes_message("RawId", [(1, "prediction_id", False)])
# Fields walked in Python to name what is wrong with a request protobuf refused
# (a cap: a request of a million tiny fields must not hold the event loop).
_DIAGNOSED_FIELDS: Final = 10_000
_MAX_RAW_ID_BYTES: Final = 4096  # a longer "id" is not one to echo


def _split_batch(request: bytes) -> Batch:
    try:
        raw_batch = _RAW_BATCH.FromString(request)
    except DecodeError:
        raise ProtoWireError(_malformed_cause(request)) from None
    events: list[event_pb2.PredictionEvent] = []
    places: list[int] = []
    unreadable: list[Rejection] = []
    for index, raw in enumerate(raw_batch.events):  # type: ignore[attr-defined]
        parsed = parse_event(raw)
        if isinstance(parsed, str):
            unreadable.append(Rejection(index, parsed, raw_id(raw, parsed)))
        else:
            events.append(parsed)
            places.append(index)
    packed: bytes = raw_batch.packed_events  # type: ignore[attr-defined]
    batch_id: bytes = raw_batch.batch_id  # type: ignore[attr-defined]
    return Batch(events, packed, len(places) + len(unreadable), places, unreadable, batch_id)


def _malformed_cause(request: bytes) -> str:
    """What is wrong with a request that is not a protobuf message, where found soon."""
    try:
        for count, _ in enumerate(_fields(request)):
            if count >= _DIAGNOSED_FIELDS:
                break
    except ProtoWireError as exc:
        return str(exc)
    return "not a protobuf message"


_LENGTH_DELIMITED: Final = 2


def _fields(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(number, wire type, start, end) of each top-level field; a length-delimited one's value.

    Raises:
        ProtoWireError: a field cut short or of an unknown wire type, with its offset.
    """
    pos, end = 0, len(data)
    while pos < end:
        at = pos
        try:
            key, pos = read_varint(data, pos)
            number, wire_type, start = key >> 3, key & 7, pos
            if wire_type == 0:
                _, pos = read_varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == _LENGTH_DELIMITED:
                length, start = read_varint(data, pos)
                pos = start + length
            else:
                raise ProtoWireError(f"unsupported wire type {wire_type}")
        except ProtoWireError as exc:
            raise ProtoWireError(f"{exc} at byte {at}") from None
        if number == 0:
            raise ProtoWireError(f"field number 0 at byte {at}")
        if pos > end:
            raise ProtoWireError(
                f"field {number} at byte {at} runs past the end of the request ({end} bytes)"
            )
        yield number, wire_type, start, pos


def parse_event(raw: bytes) -> event_pb2.PredictionEvent | str:
    """The event in ``raw``, or why it is not readable."""
    try:
        return event_pb2.PredictionEvent.FromString(raw)
    except (DecodeError, UnicodeDecodeError) as exc:  # the latter from the pure-Python protobuf
        utf8 = isinstance(exc, UnicodeDecodeError) or "UTF-8" in str(exc)
        return UTF8_REASON if utf8 else UNREADABLE_REASON


def raw_id(raw: bytes, reason: str) -> str:
    """The prediction id of an event not parsed (empty when it cannot be read).

    Not of a malformed one: its fields may be read out of step, and a wrong
    id is worse than none.
    """
    if reason == UNREADABLE_REASON:
        return ""
    try:
        found: bytes = _RAW_ID.FromString(raw).prediction_id  # type: ignore[attr-defined]
    except DecodeError:
        return ""
    if len(found) > _MAX_RAW_ID_BYTES:
        return ""
    try:
        return found.decode("utf-8")[:ID_CHARS]
    except UnicodeDecodeError:
        return ""

"""model_name, model_version and id of an OIP v2 ModelInfer message, read without copying it.

Client -> OipProxy (reads these three fields of each ModelInfer request and
response, adds an id) -> model server. The fields are 1-3 of both
ModelInferRequest and ModelInferResponse. A message is first walked field
by field at its top level (``_scan``): the tensors (``inputs``,
``raw_input_contents``, ``outputs``...) are skipped by their length, never
copied, and only the three fields are sliced out. protobuf's C parser
(``_raw_fields``, a private message of three ``bytes`` fields) copies every
field it does not know, a 4 MiB tensor included, into the parsed message; it
answers only when the walk is unsure: a group, a malformed or cut message
(the parser says which), or more than ``_MAX_SCAN_FIELDS`` top-level fields
(a message of a million tiny fields is parsed in C, not walked in Python on
the event loop). Both follow proto3: the last occurrence of a field wins, a
field of another wire type is an unknown one, and an id that is not UTF-8
leaves the message readable, itself marked unreadable.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple, Protocol, cast

from google.protobuf.message import DecodeError

from predtrace.sidecar._raw_fields import bytes_message

_MAX_TEXT: Final = 4096
# Real ModelInfer messages have a handful of top-level fields (name,
# version, id, parameters, one per tensor and raw tensor); past this many
# the walk hands over to the C parser, whose cost does not grow in Python.
_MAX_SCAN_FIELDS: Final = 64
_MAX_FIELD_NUMBER: Final = (1 << 29) - 1
# What a store cannot hold or a log should not print in a model name or
# version: NUL, other C0 and C1 control characters and DEL (UTF-8 decoding
# leaves no lone surrogate). Replaced, not refused: the prediction is kept.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class OipFields(NamedTuple):
    """The three fields as text: "" when absent (or empty), None when unreadable."""

    model_name: str | None
    model_version: str | None
    id: str | None


# What an event has of a message the proxy did not read (or could not).
NO_FIELDS: Final = OipFields("", "", "")


class _Raw(Protocol):
    model_name: bytes
    model_version: bytes
    id: bytes


_FIELDS: Final = bytes_message(
    "OipFields", [(1, "model_name", False), (2, "model_version", False), (3, "id", False)]
)


def read_fields(message: bytes) -> OipFields | None:
    """The three fields of a ModelInfer request or response; None if the bytes are malformed."""
    spans = _scan(message)
    if spans is not None:
        return OipFields(
            _span_text(message, spans[0]),
            _span_text(message, spans[1]),
            _span_text(message, spans[2]),
        )
    try:
        raw = cast("_Raw", _FIELDS.FromString(message))
    except DecodeError:
        return None
    return OipFields(_text(raw.model_name), _text(raw.model_version), _text(raw.id))


def id_field(value: str) -> bytes:
    """The id field, to append to a request (the last occurrence wins when parsed)."""
    return _FIELDS(id=value.encode("utf-8")).SerializeToString()


_Span = tuple[int, int]  # (start, length) of a field's value in the message
_NO_SPAN: Final[_Span] = (0, 0)


class _UnsureError(Exception):
    """The walk cannot say: the C parser decides."""


def _scan(data: bytes) -> tuple[_Span, _Span, _Span] | None:
    """Where fields 1-3 (wire type 2) last occur; None when the C parser must decide.

    Bounded: at most ``_MAX_SCAN_FIELDS`` fields, varints of at most ten
    bytes (tags and lengths of at most five), every length checked against
    the message.
    """
    try:
        return _walk(data)
    except (_UnsureError, IndexError):  # IndexError: a field cut short
        return None


def _walk(data: bytes) -> tuple[_Span, _Span, _Span]:
    spans = [_NO_SPAN, _NO_SPAN, _NO_SPAN]
    end, pos = len(data), 0
    for _ in range(_MAX_SCAN_FIELDS + 1):
        if pos == end:
            return spans[0], spans[1], spans[2]
        tag, pos = _short_varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if not 0 < number <= _MAX_FIELD_NUMBER:
            break
        if wire_type == 2:
            length, pos = _short_varint(data, pos)
            if number <= 3:
                spans[number - 1] = (pos, length)
            pos += length
        elif wire_type == 0:
            _, pos = _varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:  # a group (3, 4) or no wire type at all (6, 7)
            break
        if pos > end:
            break
    raise _UnsureError  # malformed, a group, or more fields than the walk takes


def _short_varint(data: bytes, pos: int) -> tuple[int, int]:
    """A tag or a length: at most five bytes and 32 bits, else unsure.

    protobuf's C parser refuses a longer one (padded with 0x80 bytes, say)
    as corrupt where a walk that took it would read the fields.
    """
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, after = _varint(data, pos)
    if after - pos > 5 or value > 0xFFFFFFFF:
        raise _UnsureError
    return value, after


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (IndexError if cut short)."""
    byte = data[pos]
    if byte < 0x80:
        return byte, pos + 1
    value, shift = byte & 0x7F, 7
    for i in range(pos + 1, min(pos + 10, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise _UnsureError  # cut short or over ten bytes


def _span_text(data: bytes, span: _Span) -> str | None:
    start, length = span
    if length > _MAX_TEXT:
        return None
    return _text(data[start : start + length])


def _text(raw: bytes) -> str | None:
    """The field as text; None when it is over 4 KiB or not UTF-8."""
    if len(raw) > _MAX_TEXT:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def clean_text(text: str | None) -> str:
    """A model name or version for an event: control characters replaced by U+FFFD.

    A store refuses a NUL: an event with one would be rejected whole, and
    the prediction not recorded at all. None (unreadable) becomes "".
    """
    if not text or text.isprintable():
        return text or ""
    return _CONTROL.sub("\ufffd", text)

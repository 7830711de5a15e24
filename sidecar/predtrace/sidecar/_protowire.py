"""Just enough of the protobuf wire format to split a request protobuf refused whole.

The sidecar's RecordBatch reads a request whose parse failed field by field,
so one event with bad UTF-8 is rejected alone, and names a rejected event by
its prediction id (field 1). Parsing is bounded: varints of at most ten
bytes, lengths checked against the buffer, a cap on the number of fields. A
wanted field that is not text it can use (over 4 KiB, not UTF-8) is marked
unreadable on its own: the other fields of the message stay readable. (The
OIP proxy reads its three fields with protobuf's own parser: ``_oip_fields``.)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from predtrace.sidecar._errors import SidecarError

_MAX_FIELDS: Final = 1_000_000
_MAX_STRING: Final = 4096


class ProtoWireError(SidecarError, ValueError):
    """Bytes that are not a well-formed protobuf message."""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a varint at ``pos``; return (value, next position).

    Raises:
        ProtoWireError: truncated or longer than ten bytes.
    """
    value, shift = 0, 0
    for i in range(pos, min(pos + 10, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise ProtoWireError("truncated or overlong varint")


def encode_varint(value: int) -> bytes:
    """Encode a non-negative int as a varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def top_level_strings(data: bytes, fields: Collection[int]) -> dict[int, str | None]:
    """The values of the given top-level string fields (the last occurrence wins).

    A wanted field that is present but not UTF-8 text of at most 4 KiB maps to
    None (unreadable), so a caller can tell it from an absent one.

    Raises:
        ProtoWireError: malformed bytes.
    """
    found: dict[int, str | None] = {}
    pos, count, end = 0, 0, len(data)
    while pos < end:
        count += 1
        if count > _MAX_FIELDS:
            raise ProtoWireError("too many fields")
        key, pos = read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ProtoWireError("field number 0")
        if wire_type == 0:
            _, pos = read_varint(data, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = read_varint(data, pos)
            if pos + length > end:
                raise ProtoWireError("length beyond the end of the message")
            if number in fields:
                found[number] = _text(data[pos : pos + length])
            pos += length
        else:
            raise ProtoWireError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise ProtoWireError("field beyond the end of the message")
    return found


def _text(raw: bytes) -> str | None:
    """The field as text; None when it is over 4 KiB or not UTF-8."""
    if len(raw) > _MAX_STRING:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None

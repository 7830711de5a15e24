"""Just enough of the protobuf wire format to say why a request is not a protobuf message.

The sidecar's RecordBatch reads a request protobuf refused whole with a
message of bytes fields (``_raw_fields``); when even that fails, it walks the
first fields here to name the cause (a field cut short, at which byte).
Bounded: varints of at most ten bytes, lengths checked against the buffer.
"""

from __future__ import annotations

from predtrace.sidecar._errors import SidecarError


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

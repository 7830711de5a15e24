"""Reading a batch in two steps: its header, then its events one at a time, each bounded.

The batch codec (``_codec``) and the collector's ingest read batches here. The
header comes first, without building one event: a collector refuses a token
not allowed for the batch's producer_id after a pass over the bytes, not after
their decode. Values under batch keys the reader does not know are skipped,
never built (FORMAT.md: a decoder ignores them). Events are then built one by
one, each within bounds of its own (``_event_reader``, which also reads
``pack_events`` bytes), through the bounded unpacker of ``_unpacker``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from predtrace.wire._errors import WireError, WireTooLargeError
from predtrace.wire._event_reader import (
    _event_starts,
    _events,
    _meter,
)
from predtrace.wire._limits import DEFAULT_LIMITS, INT63_MAX, DecodeLimits
from predtrace.wire._maps import _is_uint
from predtrace.wire._unpacker import _MSGPACK_ERRORS, _malformed, _unpacker

FORMAT_MAJOR: Final = 1
_EVENTS: Final = 6
_HEADER_KEYS: Final = (0, 1, 2, 3, 4, 5)
# First bytes of msgpack maps and arrays (fix, 16- and 32-bit lengths).
_MAP_HEADS: Final = frozenset((*range(0x80, 0x90), 0xDE, 0xDF))
_CONTAINER_HEADS: Final = _MAP_HEADS | frozenset((*range(0x90, 0xA0), 0xDC, 0xDD))
# A header value that is a map or an array is built only when it is this
# small (the format version, three bytes, is the only valid one): a larger one
# is invalid whatever it holds, and is refused without being built.
_SMALL_VALUE: Final = 256


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """A batch's header fields, checked, and where its events are (``read_batch_events``).

    ``events_span`` is the (start, end) byte offsets of the events array in
    the msgpack payload the header was read from; (0, 0) when there is none.
    """

    producer_id: str
    seq: int
    batch_id: bytes
    created_at_unix_nano: int
    prev_digest: bytes
    event_count: int
    events_span: tuple[int, int]


def read_batch_header(payload: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> BatchHeader:
    """Check the header of uncompressed batch bytes; step over the events, building none.

    Costs a pass over the bytes and the header's few values, whatever the
    events or unknown keys hold.

    Raises:
        WireTooLargeError: more events than ``limits.max_events``.
        WireError: the batch is malformed (the whole body is refused).
    """
    unpacker = _unpacker(payload, limits, 0, hook=None)
    try:
        fields = _read_fields(unpacker, payload, limits)
    except WireError:
        raise
    except _MSGPACK_ERRORS as exc:
        raise _malformed(exc) from None
    _check_version(fields.get(0))
    producer_id = _batch_str(fields, 1, "producer_id", max_len=limits.max_id_len)
    seq = fields.get(2)
    if not isinstance(seq, int) or not _is_uint(seq) or seq == 0 or seq > INT63_MAX:
        raise WireError("seq must be a positive integer below 2**63")
    span = fields.get(_EVENTS, (0, 0))
    return BatchHeader(
        producer_id=producer_id,
        seq=seq,
        batch_id=_batch_bytes(fields, 3, "batch_id"),
        created_at_unix_nano=_batch_uint(fields, 4, "created_at_unix_nano"),
        prev_digest=_batch_bytes(fields, 5, "prev_digest"),
        event_count=_event_count(payload, span, limits),
        events_span=span,
    )


def read_batch_events(
    payload: bytes, header: BatchHeader, limits: DecodeLimits = DEFAULT_LIMITS
) -> Iterator[object]:
    """The batch's events, built one at a time: int-keyed maps, not yet checked.

    ``event_from_map`` checks one. Each event is bounded in maps and arrays and
    in their entries (bounds every valid event stays under), and the batch in
    maps and arrays per byte. An event past its own bounds, or one msgpack
    cannot build (invalid UTF-8, a key that is a map), is yielded as an
    ``UnreadableEvent`` in its place, to be rejected alone: where each event
    starts is known from a first pass that steps over them, building nothing.

    Raises:
        WireError: the batch's bound on maps and arrays exceeded, or malformed
            msgpack between events (raised by the iteration, once the events
            before have been yielded).
    """
    start, _ = header.events_span
    if not header.event_count:
        return
    starts = _event_starts(payload, start, header.event_count, limits)
    yield from _events(payload, starts, limits, _meter(len(payload), limits))


def _read_fields(
    unpacker: msgpack.Unpacker, payload: bytes, limits: DecodeLimits
) -> dict[Any, Any]:
    """The header's values by key (the events as their span), the rest stepped over."""
    if not payload or payload[0] not in _MAP_HEADS:
        unpacker.skip()  # malformed bytes are named as such, before "not a map"
        _check_end(unpacker, payload)
        raise WireError("batch must be a msgpack map")
    size = unpacker.read_map_header()
    if size > limits.max_map_len:
        raise WireError(f"malformed msgpack: {size} exceeds max_map_len({limits.max_map_len})")
    fields: dict[Any, Any] = {}
    for _ in range(size):
        if _next_is_container(unpacker, payload):
            raise WireError("malformed msgpack: a map key is a map or an array")
        key = unpacker.unpack()
        if key in _HEADER_KEYS:
            fields[key] = _header_value(unpacker, payload, limits)
        elif key == _EVENTS:
            start = unpacker.tell()
            unpacker.skip()
            fields[key] = (start, unpacker.tell())
        else:
            unpacker.skip()  # a key from a newer minor version: ignored, never built
    _check_end(unpacker, payload)
    return fields


def _header_value(unpacker: msgpack.Unpacker, payload: bytes, limits: DecodeLimits) -> object:
    if not _next_is_container(unpacker, payload):
        return unpacker.unpack()  # a scalar: its length is bounded by the limits
    start = unpacker.tell()
    unpacker.skip()
    end = unpacker.tell()
    if end - start > _SMALL_VALUE:
        return _TOO_BIG  # refused by the field's check, as any value of a wrong type
    return msgpack.unpackb(
        payload[start:end],
        raw=False,
        strict_map_key=False,
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        max_array_len=_SMALL_VALUE,
        max_map_len=_SMALL_VALUE,
        max_ext_len=0,
    )


_TOO_BIG: Final = object()


def _next_is_container(unpacker: msgpack.Unpacker, payload: bytes) -> bool:
    """Whether the next value (at the unpacker's offset) is a map or an array."""
    offset = unpacker.tell()  # the stream began at 0: the offset in ``payload``
    if offset >= len(payload):
        raise msgpack.OutOfData
    return payload[offset] in _CONTAINER_HEADS


def _check_end(unpacker: msgpack.Unpacker, payload: bytes) -> None:
    if unpacker.tell() != len(payload):
        raise WireError("trailing bytes after the msgpack value")


def _event_count(payload: bytes, span: tuple[int, int], limits: DecodeLimits) -> int:
    """The events array's declared length, checked before one event is built."""
    start, end = span
    if start == end:
        return 0
    first = payload[start]
    if 0x90 <= first <= 0x9F:
        count = first & 0x0F
    elif first in (0xDC, 0xDD):
        width = 2 if first == 0xDC else 4
        count = int.from_bytes(payload[start + 1 : start + 1 + width], "big")
    else:
        raise WireError("events must be an array")
    most = max(limits.max_events, limits.max_map_len)
    if count > most:
        # The words msgpack's own check used when the whole batch was built.
        raise WireError(f"malformed msgpack: {count} exceeds max_array_len({most})")
    if count > limits.max_events:
        raise WireTooLargeError(f"batch holds more than {limits.max_events} events")
    return count


def _check_version(version: object) -> None:
    if version is None:
        raise WireError("missing format version (key 0)")
    if (
        not isinstance(version, list)
        or len(version) < 2
        or not all(_is_uint(part) for part in version[:2])
    ):
        raise WireError("format version must be [major, minor]")
    if version[0] != FORMAT_MAJOR:
        raise WireError(f"unsupported format major version {version[0]}; this is {FORMAT_MAJOR}")


def _batch_str(fields: dict[Any, Any], key: int, name: str, *, max_len: int) -> str:
    value = fields.get(key, "")
    if not isinstance(value, str):
        raise WireError(f"{name} must be a string")
    if not value:
        raise WireError(f"{name} is required")
    if len(value) > max_len:
        raise WireError(f"{name} longer than {max_len} characters")
    if "\x00" in value:
        raise WireError(f"{name} must not contain NUL characters")
    return value


def _batch_bytes(fields: dict[Any, Any], key: int, name: str) -> bytes:
    value = fields.get(key, b"")
    if not isinstance(value, bytes):
        raise WireError(f"{name} must be bytes")
    return value


def _batch_uint(fields: dict[Any, Any], key: int, name: str) -> int:
    value = fields.get(key, 0)
    if not _is_uint(value):
        raise WireError(f"{name} must be a non-negative integer")
    return int(value)

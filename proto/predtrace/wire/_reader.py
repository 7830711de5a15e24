"""Reading a batch in two steps: its header, then its events one at a time, each bounded.

The batch codec (``_codec``) and the collector's ingest read batches here. The
header comes first, without building one event: a collector refuses a token
not allowed for the batch's producer_id after a pass over the bytes, not after
their decode. Values under batch keys the reader does not know are skipped,
never built (FORMAT.md: a decoder ignores them). Events are then built one by
one, each within bounds of its own (maps and arrays, and their entries) that
every event ``event_problem`` passes stays under: a consumer that keeps a row
per event instead of the maps holds one event's objects at a time.

Why bounds on containers at all: an empty map is one byte on the wire and 64
in memory, a map of one entry three bytes and 224. Declared lengths are
checked by msgpack before anything is allocated; what is built is counted by
the hooks here.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import msgpack

from predtrace.wire._errors import UnreadableEvent, WireError, WireTooLargeError
from predtrace.wire._limits import DEFAULT_LIMITS, INT63_MAX, DecodeLimits
from predtrace.wire._maps import _is_uint

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
# The reader's buffer: what it reads at once, plus the longest string or
# binary it must hold whole to step over it.
_READ_SIZE: Final = 256 * 1024
# At most one map or array per this many bytes of the whole batch (FORMAT.md).
BYTES_PER_CONTAINER: Final = 2
# An event that ``event_problem`` passes holds at most 7 maps and arrays
# (itself, model, deployment, output, features, attributes, the array of
# additional models) and one map per additional model (up to ``max_map_len``);
# its entries are its own fields and those of what it holds (four of them up
# to ``max_map_len``, the additional models 6 each). These bounds leave room
# for keys a newer minor version adds. No array in an event is longer than
# ``max_map_len`` either: that also bounds what a decode holds before any
# hook has seen it (an array is counted once complete, and arrays nest up to
# msgpack's 1,024 levels), to some 80 MB however the bytes are arranged.
_EVENT_CONTAINERS_BEYOND_MODELS: Final = 16
_EVENT_ENTRIES_PER_MODEL: Final = 9
_EVENT_MAPS_OF_MAX_LEN: Final = 4


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


class PackedEvents:
    """``pack_events`` bytes whose layout is checked, their events not yet built.

    ``len()`` is the array's length. Iterating builds the events one at a
    time, as ``read_batch_events`` does, with the same bounds per event; an
    event past them is an ``UnreadableEvent`` in its place, and nothing else
    is raised (there is no bound on the whole: each event is let go before
    the next is built). A consumer that keeps bytes per event, not the maps,
    holds one event's objects at a time, however the bytes are arranged.
    """

    __slots__ = ("_limits", "_payload", "_starts")

    def __init__(self, payload: bytes, starts: list[int], limits: DecodeLimits) -> None:
        self._payload, self._starts, self._limits = payload, starts, limits

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __iter__(self) -> Iterator[object]:
        if len(self) == 0:
            return iter(())
        # No bound per byte of the whole: an event past its own bounds
        # stays one unreadable event, whatever came before it.
        meter = _meter(len(self._payload), self._limits, whole_bound=False)
        return _events(self._payload, self._starts, self._limits, meter)


def open_packed_events(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> PackedEvents:
    """Check ``pack_events`` bytes (an array, its length, nothing after it), building no event.

    Strings and binaries are bounded by ``len(data)`` only, maps and arrays
    by ``limits.max_map_len``: a value over a field's own limit is that
    event's problem (``event_problem``), not the others'.

    Raises:
        WireTooLargeError: more bytes than ``limits.max_bytes``, or more
            events than ``limits.max_events`` (read from the array header).
        WireError: not a msgpack array, malformed, or trailing bytes.
    """
    if len(data) > limits.max_bytes:
        raise WireTooLargeError(f"packed events exceed {limits.max_bytes} bytes")
    declared = _declared_array_len(data)
    if declared is None:
        raise WireError("packed events must be a msgpack array")
    if declared > limits.max_events:
        # Refused from the array header, before one item is stepped over.
        raise WireTooLargeError(f"more than {limits.max_events} packed events")
    size = max(len(data), 1)
    per_event = replace(limits, max_str_len=size, max_bin_len=size)
    starts = _event_starts(data, 0, declared, per_event)
    if starts[-1] != len(data):
        raise WireError("trailing bytes after the msgpack value")
    return PackedEvents(data, starts, per_event)


def _declared_array_len(data: bytes) -> int | None:
    """The item count an msgpack array header at the start of ``data`` declares.

    None when ``data`` does not start with an array header (or is cut in it).
    """
    if not data:
        return None
    first = data[0]
    if 0x90 <= first <= 0x9F:  # fixarray
        return first & 0x0F
    width = {0xDC: 2, 0xDD: 4}.get(first)
    if width is None or len(data) < 1 + width:
        return None
    return int.from_bytes(data[1 : 1 + width], "big")


def _events(
    payload: bytes, starts: list[int], limits: DecodeLimits, meter: _Meter
) -> Iterator[object]:
    """The events beginning at ``starts`` (the last entry: where the last one ends)."""
    unpacker = _unpacker(payload, limits, starts[0], hook=meter.hook)
    for index in range(len(starts) - 1):
        meter.next_event()
        item: object
        try:
            item = unpacker.unpack()
        except _TooManyContainersError:
            if meter.over_batch():
                raise WireError(meter.reason()) from None
            item = UnreadableEvent(meter.reason())
        except _MSGPACK_ERRORS as exc:
            item = UnreadableEvent(str(_malformed(exc)))
        if isinstance(item, UnreadableEvent):
            # On from the next event's first byte, with a new decoder: this
            # one stopped somewhere inside the event.
            unpacker = _unpacker(payload, limits, starts[index + 1], hook=meter.hook)
        yield item


def _event_starts(payload: bytes, start: int, count: int, limits: DecodeLimits) -> list[int]:
    """Where each of the ``count`` events begins in ``payload``, then where the last ends.

    Steps over the events (msgpack's ``skip`` builds nothing and checks no
    bound), as the header's pass already did whole.

    Raises:
        WireError: malformed msgpack.
    """
    unpacker = _unpacker(payload, limits, start, hook=None)
    starts: list[int] = []
    try:
        unpacker.read_array_header()  # its count was checked with the header
        for _ in range(count):
            starts.append(start + unpacker.tell())
            unpacker.skip()
    except _MSGPACK_ERRORS as exc:
        raise _malformed(exc) from None
    starts.append(start + unpacker.tell())
    return starts


class _TooManyContainersError(Exception):
    """Raised inside the decoder's hooks; becomes a WireError."""


_C = TypeVar("_C", dict[Any, Any], list[Any])


@dataclass(frozen=True, slots=True)
class _Meter:
    """The hook of an events decode, and how to move it on to the next event.

    ``hook`` counts maps and arrays, and their entries, as they are built: a
    hook sees a container once it is complete, so an event is checked as it
    grows and the decode stops at the first container past a bound.
    """

    hook: Callable[[Any], Any]
    next_event: Callable[[], None]
    reason: Callable[[], str]
    over_batch: Callable[[], bool]


def _meter(payload_len: int, limits: DecodeLimits, *, whole_bound: bool = True) -> _Meter:
    # Closures over plain ints: the hook runs once per map or array decoded,
    # and this is about a fifth cheaper than attributes of an object.
    models = limits.max_map_len
    most_batch = payload_len // BYTES_PER_CONTAINER + 64 if whole_bound else INT63_MAX
    per_event = models + _EVENT_CONTAINERS_BEYOND_MODELS
    per_event_entries = (_EVENT_MAPS_OF_MAX_LEN + _EVENT_ENTRIES_PER_MODEL) * models
    containers = entries = most_containers = most_entries = 0

    def hook(container: _C) -> _C:
        nonlocal containers, entries
        containers += 1
        entries += len(container)
        if containers > most_containers or entries > most_entries:
            raise _TooManyContainersError
        return container

    def next_event() -> None:
        nonlocal most_containers, most_entries
        most_containers = min(most_batch, containers + per_event)
        most_entries = entries + per_event_entries

    def reason() -> str:
        if containers > most_batch:
            return f"more than one map or array per {BYTES_PER_CONTAINER} bytes of msgpack"
        if entries > most_entries:
            return f"an event holds more than {per_event_entries} map entries and array items"
        return f"an event holds more than {per_event} maps or arrays"

    def over_batch() -> bool:
        return containers > most_batch

    return _Meter(hook, next_event, reason, over_batch)


def _unpacker(
    payload: bytes, limits: DecodeLimits, start: int, hook: Callable[[Any], Any] | None
) -> msgpack.Unpacker:
    """An unpacker reading ``payload`` from ``start`` with every declared length bounded."""
    stream = io.BytesIO(payload)  # shares the bytes object: no copy
    stream.seek(start)
    hooks: dict[str, object] = {"object_hook": hook, "list_hook": hook} if hook else {}
    longest = max(limits.max_str_len, limits.max_bin_len)
    return msgpack.Unpacker(
        stream,
        raw=False,
        strict_map_key=False,
        use_list=True,
        max_str_len=limits.max_str_len,
        max_bin_len=limits.max_bin_len,
        # Arrays in an event (the events array's own length is read apart).
        max_array_len=limits.max_map_len,
        max_map_len=limits.max_map_len,
        max_ext_len=0,
        read_size=_READ_SIZE,
        # Stepping over a string needs it whole in the buffer: one longer
        # than the limits (which building it would refuse) is refused too.
        max_buffer_size=_READ_SIZE + longest + 16,
        **hooks,
    )


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


# What msgpack raises on bad bytes: its own errors, and ValueError or TypeError
# (a length over a limit, invalid UTF-8, an unhashable key) building a value.
_MSGPACK_ERRORS: Final = (msgpack.UnpackException, ValueError, TypeError)


def _malformed(exc: Exception) -> WireError:
    """Our error for one of msgpack's (or a value error building what it read)."""
    if isinstance(exc, msgpack.BufferFull):
        # Only a value the reader must hold whole to step over it fills its
        # buffer: a string or binary longer than any field's bound, under a
        # key this version does not know.
        return WireError(
            "a string or binary value under an unknown key too long to step over "
            "(longer than the reader's buffer, some hundreds of KiB)"
        )
    if isinstance(exc, msgpack.OutOfData | msgpack.FormatError | msgpack.StackError):
        return WireError(f"malformed msgpack: {type(exc).__name__}")
    return WireError(f"malformed msgpack: {short_reason(exc)}")


def short_reason(exc: BaseException) -> str:
    """The first line of an exception's message, at most 120 characters."""
    return str(exc).split("\n", 1)[0][:120]


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

"""Events read one at a time, each within bounds of its own: of a batch, or packed.

A batch's events (``read_batch_events`` in ``_reader``, once its header is
checked) and ``pack_events`` bytes (``open_packed_events``) are read here.
Where each event starts is known first, from a pass that steps over them,
building nothing; then the events are built one by one, each within bounds
of its own (maps and arrays, and their entries) that every event
``event_problem`` passes stays under: a consumer that keeps a row per event
instead of the maps holds one event's objects at a time. An event past its
bounds, or one msgpack cannot build, is an ``UnreadableEvent`` in its place.

Why bounds on containers at all: an empty map is one byte on the wire and 64
in memory, a map of one entry three bytes and 224. Declared lengths are
checked by msgpack before anything is allocated; what is built is counted by
the hooks here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

from predtrace.wire._errors import UnreadableEvent, WireError, WireTooLargeError
from predtrace.wire._limits import DEFAULT_LIMITS, INT63_MAX, DecodeLimits
from predtrace.wire._unpacker import _MSGPACK_ERRORS, _malformed, _unpacker

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

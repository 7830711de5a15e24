"""Reading a batch in parts: the header without the events, then events one at a time, bounded."""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgpack
import pytest

from predtrace.wire import (
    DecodeLimits,
    EventBatch,
    ModelRef,
    PredictionEvent,
    WireError,
    WireTooLargeError,
    decode_batch,
    encode_batch,
    event_problem,
    event_to_map,
    open_packed_events,
    pack_events,
    read_batch_events,
    read_batch_header,
)

# A batch header (version, producer_id "p", seq 1) as a map of ``n`` keys,
# the caller writing the remaining keys and values.
_HEADER = b"\x00\x92\x01\x00\x01\xa1p\x02\x01"


def _map(n: int) -> bytes:
    return bytes([0x80 | n])


def _array(n: int) -> bytes:
    return b"\xdc" + n.to_bytes(2, "big")


def _junk(mib: float) -> bytes:
    """An array of arrays of alternating empty maps and nils: a map per 2 bytes.

    The densest the batch-wide bound allows; some 36 bytes of Python objects
    a byte when built.
    """
    inner = _array(1024) + b"\x80\xc0" * 512
    count = int(mib * 1024 * 1024) // len(inner)
    return _array(count) + inner * count


@contextmanager
def _peak() -> Iterator[list[int]]:
    """The peak of traced allocations inside the block (in ``result[0]``)."""
    result = [0]
    tracemalloc.start()
    try:
        yield result
        result[0] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_values_under_unknown_batch_keys_are_stepped_over_never_built(
    make_event: Callable[[int], PredictionEvent],
) -> None:
    # Was: the whole value built (some 36 times its bytes) before anyone
    # looked at the producer_id, and then ignored.
    event = make_event(0)
    events = msgpack.packb([event_to_map(event)], use_bin_type=True)
    body = _map(5) + _HEADER + b"\x07" + _junk(2) + b"\x06" + events
    with _peak() as peak:
        decoded = decode_batch(body)
    assert decoded.batch.events == [event] and decoded.rejected == ()
    assert peak[0] < len(body) // 2


def test_the_header_is_read_without_building_an_event(
    make_event: Callable[[int], PredictionEvent],
) -> None:
    body = encode_batch(EventBatch("edge-7", 42, [make_event(i) for i in range(5000)]))
    with _peak() as peak:
        header = read_batch_header(body)
    assert (header.producer_id, header.seq, header.event_count) == ("edge-7", 42, 5000)
    # The reader's buffer, whatever the size: the events would take some 12 MB built.
    assert peak[0] < 1024 * 1024


def test_the_producer_id_is_found_wherever_it_is_in_the_map() -> None:
    # Keys in any order (the events before the producer_id), the last of a
    # repeated key winning, as a dict would have it.
    events = msgpack.packb([{1: "a"}])
    body = _map(5) + b"\x06" + events + b"\x02\x07\x00\x92\x01\x00\x01\xa1x\x01\xa1y"
    header = read_batch_header(body)
    assert (header.producer_id, header.seq, header.event_count) == ("y", 7, 1)
    assert list(read_batch_events(body, header)) == [{1: "a"}]


def test_events_are_built_one_at_a_time() -> None:
    body = encode_batch(EventBatch("p", 1, [PredictionEvent(f"id-{i}") for i in range(3)]))
    header = read_batch_header(body)
    events = read_batch_events(body, header)
    assert next(events) == {1: "id-0"}
    assert next(events) == {1: "id-1"}
    assert next(events) == {1: "id-2"}
    assert next(events, None) is None


def _rejected_alone(body: bytes, reason: str) -> None:
    """The batch decodes, and its one event is rejected alone, for ``reason`` (a regex)."""
    decoded = decode_batch(body)
    assert decoded.batch.events == []
    (rejection,) = decoded.rejected
    assert rejection.index == 0 and re.search(reason, rejection.reason), rejection


def test_an_event_of_more_maps_than_any_valid_one_is_rejected_as_it_is_built() -> None:
    # One event, an unknown key holding 10,240 maps (a valid event: at most
    # 1,040); was built whole, some 40 times its bytes.
    event = _map(2) + b"\x01\xa1x\x63" + _junk(0.02)
    body = _map(4) + _HEADER + b"\x06" + _array(1) + event
    with _peak() as peak:
        _rejected_alone(body, "an event holds more than 1040 maps")
    assert peak[0] < 1024 * 1024


def test_an_event_of_more_entries_than_any_valid_one_is_rejected_as_it_is_built() -> None:
    nils = _array(1024) + b"\xc0" * 1024
    event = _map(2) + b"\x01\xa1x\x63" + _array(16) + nils * 16
    body = _map(4) + _HEADER + b"\x06" + _array(1) + event
    _rejected_alone(body, "an event holds more than 13312 map entries")


def test_an_array_in_an_event_longer_than_a_map_may_be_is_rejected_from_its_header() -> None:
    # Arrays nest 1,024 deep and are counted once complete: 10,000 items a
    # level (the old bound) let 30 MB of nested two-character strings cost
    # 600 MB before the first count; 1,024 a level, some 60 MB.
    event = _map(2) + b"\x01\xa1x\x63" + _array(1025) + b"\xc0" * 1025
    body = _map(4) + _HEADER + b"\x06" + _array(1) + event
    _rejected_alone(body, r"1025 exceeds max_array_len\(1024\)")


def test_arrays_nested_as_deep_as_msgpack_allows_cost_a_bounded_memory() -> None:
    level = _array(1024) + b"\xa2ab" * 1023
    event = _map(2) + b"\x01\xa1x\x63" + level * 1000 + b"\xc0"
    body = _map(4) + _HEADER + b"\x06" + _array(1) + event
    with _peak() as peak:
        _rejected_alone(body, "an event holds more than")
    assert peak[0] < 80 * 1024 * 1024


def test_the_most_additional_models_a_valid_event_holds_decode() -> None:
    most = DecodeLimits().max_map_len
    event = PredictionEvent("x", additional_models=[ModelRef("m", "1", role="r")] * most)
    assert event_problem(event) is None
    decoded = decode_batch(encode_batch(EventBatch("p", 1, [event] * 10)))
    assert len(decoded.batch.events) == 10 and decoded.rejected == ()
    one_more = PredictionEvent("x", additional_models=[ModelRef(role="r")] * (most + 1))
    assert event_problem(one_more) == f"too many additional_models (at most {most})"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            _map(3) + b"\x00" + msgpack.packb([1, 0, *[0] * 300]) + b"\x01\xa1p\x02\x01",
            "format version must be",
        ),
        (
            _map(3) + b"\x00\x92\x01\x00\x01" + msgpack.packb(["p"] * 300) + b"\x02\x01",
            "producer_id must be a string",
        ),
    ],
    ids=["version", "producer_id"],
)
def test_a_header_value_too_big_to_be_valid_is_refused_unbuilt(body: bytes, reason: str) -> None:
    with pytest.raises(WireError, match=reason):
        read_batch_header(body)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_map(4) + _HEADER + b"\x90\x01", "a map key is a map or an array"),
        (_map(4) + _HEADER + b"\x07\xc1", "malformed msgpack"),
        (_map(4) + _HEADER + b"\x07\x92\xc0", "malformed msgpack"),
        (_map(4) + _HEADER + b"\x07" + b"\x91" * 2000 + b"\xc0", "malformed msgpack"),
        (_map(4) + _HEADER + b"\x07\xda\xff\xff" + b"a" * 10, "malformed msgpack"),
        (_map(4) + _HEADER + b"\x06\xc0", "events must be an array"),
        (_map(4) + _HEADER + b"\x06\x80", "events must be an array"),
        (_map(3) + _HEADER + b"\xc0", "trailing bytes"),
        (b"\xdf\xff\xff\xff\xff", r"exceeds max_map_len\(1024\)"),
    ],
    ids=[
        "container key",
        "bad byte in an unknown value",
        "unknown value cut short",
        "unknown value nested too deep",
        "unknown string past the buffer",
        "nil events",
        "map events",
        "trailing",
        "huge map",
    ],
)
def test_a_malformed_batch_is_refused_with_a_reason_from_the_header_pass(
    body: bytes, reason: str
) -> None:
    with pytest.raises(WireError, match=reason):
        read_batch_header(body)


def test_the_events_around_an_unreadable_one_are_read_and_it_is_rejected_in_its_place() -> None:
    good = [{1: f"g{i}"} for i in range(3)]
    unreadable = [
        {1: "long", 16: {"emb": [0.5] * 1536}},  # an array past its bound
        {1: "utf8", 9: b"x"},  # then bytes that are no UTF-8 text, below
    ]
    events = [good[0], unreadable[0], good[1], unreadable[1], good[2]]
    payload = msgpack.packb({0: [1, 0], 1: "p", 2: 1, 6: events}, use_bin_type=True)
    # Field 9 as a str header over bytes that are not UTF-8.
    payload = payload.replace(b"\x09\xc4\x01x", b"\x09\xa1\xff")
    decoded = decode_batch(payload)
    assert [e.prediction_id for e in decoded.batch.events] == ["g0", "g1", "g2"]
    assert [(r.index, "malformed msgpack" in r.reason) for r in decoded.rejected] == [
        (1, True),
        (3, True),
    ]


def test_a_value_too_long_to_step_over_under_an_unknown_key_is_named_as_such() -> None:
    payload = msgpack.packb({0: [1, 0], 1: "p", 2: 1, 9: "x" * 400_000, 6: [{1: "e"}]})
    with pytest.raises(WireError, match="under an unknown key too long to step over"):
        decode_batch(payload)


# -- packed events (the sidecar's RecordBatch) --------------------------------


def _packed_heavy(events: int) -> bytes:
    """``events`` events, each an id and an unknown key of 1,000 maps of one entry.

    Within the bounds of one event (1,040 maps), and some 70 times their
    bytes in Python objects when built.
    """
    inner = _array(1000) + b"\x81\x00\x00" * 1000
    return _array(events) + b"".join(
        _map(2) + b"\x01" + msgpack.packb(f"e{i}") + b"\x63" + inner for i in range(events)
    )


def test_packed_events_are_built_one_at_a_time_each_let_go_before_the_next() -> None:
    body = _packed_heavy(600)  # 1.8 MB; built whole (as before), some 130 MB
    with _peak() as peak:
        packed = open_packed_events(body)
        assert len(packed) == 600
        ids = [item[1] for item in packed]  # type: ignore[index]
    assert ids == [f"e{i}" for i in range(600)]
    assert peak[0] < 2 * 1024 * 1024


def test_a_packed_event_past_its_bounds_is_unreadable_alone() -> None:
    events = [{1: "a"}, {1: "b", 99: [{}] * 1000 + [[{}] * 100]}, {1: "c"}]
    items = list(open_packed_events(msgpack.packb(events)))
    assert items[0] == {1: "a"} and items[2] == {1: "c"}
    assert "an event holds more than 1040 maps" in str(items[1])


def test_a_string_longer_than_a_field_may_be_is_left_to_the_event_check() -> None:
    # The event's own problem, named by event_problem, not a decode error.
    (item,) = open_packed_events(pack_events([PredictionEvent("x", endpoint="/" + "e" * 70_000)]))
    assert isinstance(item, dict) and len(item[9]) == 70_001


@pytest.mark.parametrize(
    ("data", "error", "reason"),
    [
        (msgpack.packb([{1: "a"}]) + b"\xc0", WireError, "trailing bytes"),
        (b"\x92\x81\x01\xa1a", WireError, "malformed msgpack"),  # one item short
        (b"\x81\x01\xa1a", WireError, "must be a msgpack array"),
        (msgpack.packb([{1: "a"}] * 11), WireTooLargeError, "more than 10 packed events"),
        (msgpack.packb([{1: "a" * 100}]), WireTooLargeError, "exceed 64 bytes"),
    ],
    ids=["trailing", "truncated", "a map", "too many", "too big"],
)
def test_packed_events_are_checked_whole_before_one_is_built(
    data: bytes, error: type[WireError], reason: str
) -> None:
    with pytest.raises(error, match=reason):
        open_packed_events(data, DecodeLimits(max_events=10, max_bytes=64))

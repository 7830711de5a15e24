"""What a decode holds: one event's objects at a time, and rows within what it is charged."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import msgpack
import pytest

from predtrace.collector._ingest_rows import ROW_BYTES, decode_cost, prepare
from predtrace.collector.testing import make_events
from predtrace.wire import (
    DecodeLimits,
    EventBatch,
    PredictionEvent,
    encode_batch,
    read_batch_header,
)

LIMITS = DecodeLimits()


def _short_texts(count: int) -> bytes:
    """Events whose every text field is two characters: the most row per byte."""
    model = {1: "ab", 2: "cd", 3: "ef", 4: "gh", 5: "ij", 6: "kl"}
    dep = {1: "ab", 2: "cd", 3: "ef", 4: "gh", 5: "ij", 6: "kl", 7: "mn"}
    texts = {9: "ep", 10: "pr", 12: "sc", 13: "et", 15: {1: "lb", 2: 0.5}}
    events = [{1: f"i{i}", 6: model, 8: dep, **texts} for i in range(count)]
    return msgpack.packb({0: [1, 0], 1: "p", 2: 1, 6: events})  # type: ignore[no-any-return]


BATCHES: dict[str, Callable[[], bytes]] = {
    "realistic": lambda: encode_batch(EventBatch("p", 1, make_events(5000))),
    "ids only": lambda: encode_batch(
        EventBatch("p", 1, [PredictionEvent(chr(97 + i % 26)) for i in range(10_000)])
    ),
    "short texts": lambda: _short_texts(5000),
    "all rejected": lambda: msgpack.packb({0: [1, 0], 1: "p", 2: 1, 6: [None] * 10_000}),
}


def _traced(payload: bytes) -> tuple[int, int, int]:
    """(bytes kept by the prepared batch, peak while preparing it, events)."""
    header = read_batch_header(payload, LIMITS)
    gc.collect()
    tracemalloc.start()
    try:
        prepared = prepare(payload, LIMITS, 1, header)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(prepared.record.rows) + len(prepared.rejected) == header.event_count
    return kept, peak, header.event_count


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_what_a_prepared_batch_keeps_is_within_what_it_is_charged(name: str) -> None:
    # The in-flight budget is charged decode_cost until the batch is stored:
    # an undercharge would let batches waiting for the store pass the cap.
    payload = BATCHES[name]()
    kept, _, events = _traced(payload)
    assert kept <= decode_cost(len(payload), events)


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_a_batch_is_decoded_one_event_at_a_time(name: str) -> None:
    # Was: every event's maps built first (realistic events: some 7 bytes a
    # byte of msgpack) and the rows beside them.
    payload = BATCHES[name]()
    kept, peak, _ = _traced(payload)
    assert peak - kept < max(ROW_BYTES * 1024, len(payload) // 4)

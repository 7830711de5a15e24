"""A read that misses the reader's cursor passes over delivered records without counting them.

The reader continues a read from its cursor only when the read starts where
the last one stopped. Any other read (the shipper re-reading after a linger,
a prefetch that was not full, a restart) scans the segment from its start and
passes over the records up to ``after``. Those records were once counted as
lost (``corrupt``) as soon as more than one read chunk of them preceded
``after``: a chunk of nothing but passed-over records left the index the
reader expected at the segment's first, so the next chunk took them all for
a gap. Real damage in the same situation is still counted, exactly once.
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from predtrace.sidecar.spool import (
    HEADER_SIZE,
    MemoryFileLayer,
    Spool,
    SpoolConfig,
    encode_record,
    scan,
    segment_name,
)

DIR = "/spool"
COUNT = 2000
AFTER = 1500
# A read of at most 800 payload bytes scans 2 * (HEADER_SIZE + 1024) bytes a
# chunk: about 31 records, so AFTER lies some 48 chunks into the segment.
MAX_BYTES = 800
WANT = 10


def config() -> SpoolConfig:
    return SpoolConfig(
        directory=DIR,
        segment_bytes=1 << 20,  # every record in one segment
        max_bytes=16 << 20,
        max_record_bytes=1024,
        max_pending_bytes=1 << 20,
    )


def payload(i: int) -> bytes:
    return f"event-{i:05d}".encode() * 4


FRAME = HEADER_SIZE + len(payload(1))


def filled(disk: MemoryFileLayer, *, sealed: bool) -> Spool:
    spool = Spool.open(config(), files=disk)
    for start in range(1, COUNT + 1, 500):
        spool.append_sync([payload(i) for i in range(start, start + 500)])
    if sealed:
        spool._rotate()
    return spool


def read(spool: Spool, after: int) -> list[int]:
    records = spool.read(after, max_records=WANT, max_bytes=MAX_BYTES)
    assert [r.payload for r in records] == [payload(r.index) for r in records]
    return [r.index for r in records]


def corrupt_record(disk: MemoryFileLayer, index: int) -> None:
    disk.corrupt(f"{DIR}/{segment_name(1)}", (index - 1) * FRAME + HEADER_SIZE + 3)


@pytest.mark.parametrize("sealed", [False, True], ids=["active-segment", "sealed-segment"])
@pytest.mark.parametrize("before", ["cursor-elsewhere", "same-read-again", "no-cursor"])
def test_a_read_missing_the_cursor_counts_no_delivered_record_as_lost(
    caplog: pytest.LogCaptureFixture, sealed: bool, before: str
) -> None:
    disk = MemoryFileLayer()
    spool = filled(disk, sealed=sealed)
    if before == "cursor-elsewhere":
        assert read(spool, 0) == list(range(1, WANT + 1))  # the cursor stops at 10
    elif before == "same-read-again":
        assert read(spool, AFTER) == list(range(AFTER + 1, AFTER + WANT + 1))
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.spool"):
        assert read(spool, AFTER) == list(range(AFTER + 1, AFTER + WANT + 1))
        # And a cursor miss further on, over the records just returned.
        assert read(spool, AFTER + 5) == list(range(AFTER + 6, AFTER + WANT + 6))
    assert spool.counters.dropped == Counter()
    assert spool.counters.snapshot()["corrupt_regions"] == 0
    assert not [r for r in caplog.records if "damaged" in r.getMessage()]
    spool.close()


@pytest.mark.parametrize("sealed", [False, True], ids=["active-segment", "sealed-segment"])
@pytest.mark.parametrize("damaged", [AFTER + 4, AFTER + 1], ids=["in-the-read", "first-wanted"])
def test_a_damaged_record_met_by_a_read_missing_the_cursor_is_counted_exactly_once(
    caplog: pytest.LogCaptureFixture, sealed: bool, damaged: int
) -> None:
    disk = MemoryFileLayer()
    spool = filled(disk, sealed=sealed)
    assert read(spool, 0) == list(range(1, WANT + 1))
    corrupt_record(disk, damaged)
    wanted = [i for i in range(AFTER + 1, AFTER + WANT + 2) if i != damaged]
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.spool"):
        assert read(spool, AFTER) == wanted
        assert read(spool, AFTER) == wanted  # a re-read (cursor miss) counts it no more
        assert read(spool, 0) == list(range(1, WANT + 1))
        assert read(spool, AFTER) == wanted
    assert spool.counters.dropped == Counter(corrupt=1)
    assert spool.counters.snapshot()["corrupt_regions"] == 1
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1 and "losing 1 records" in lines[0], lines
    spool.close()


def test_a_run_of_damaged_records_after_a_chunk_of_delivered_ones_counts_what_it_held() -> None:
    disk = MemoryFileLayer()
    spool = filled(disk, sealed=True)
    for index in range(AFTER + 2, AFTER + 5):
        corrupt_record(disk, index)
    assert read(spool, AFTER) == [AFTER + 1, *range(AFTER + 5, AFTER + WANT + 4)]
    assert spool.counters.dropped == Counter(corrupt=3)
    spool.close()


def test_a_scan_that_passes_over_every_record_still_says_which_index_comes_next() -> None:
    data = b"".join(encode_record(i, 0, payload(i)) for i in range(5, 9))
    result = scan(data, expected_index=5, max_payload=1024, final=False, skip_through=20)
    assert result.records == [] and result.skipped == 0
    assert result.consumed == len(data) and result.next_expected == 9
    # Nothing found: the index expected is the one given.
    empty = scan(b"", expected_index=5, max_payload=1024, final=False)
    assert empty.next_expected == 5
    # Stopped at a limit: the next read starts at the record left.
    limited = scan(data, expected_index=5, max_payload=1024, final=False, until=6)
    assert [r.index for r in limited.records] == [5, 6]
    assert limited.resume_index == limited.next_expected == 7

"""The active segment deleted, emptied or cut outside the spool between two runs.

The spool never unlinks its active segment, and that segment holds every
record up to the delivered mark that no sealed segment does. After a clean
close the index lists it, so whatever it loses is counted record by record.
After a crash (kill -9) it has no index row and nothing durable says how many
records it held; when the records left on disk stop short of the mark, the
damage is still evident: it is logged as an error and counted as a corrupt
region (the records it cost cannot be counted). The next records then go to a
new segment at the mark, never after a gap inside the old one (a later scan
took such a gap for lost records: a false ``corrupt`` count).
"""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from predtrace.sidecar.spool import HEADER_SIZE, MemoryFileLayer, Spool, SpoolConfig, segment_name
from predtrace.sidecar.spool._meta import read_index
from predtrace.sidecar.spool._segments import list_segments

DIR = "/spool"
PAYLOAD = b"p" * 60
FRAME = HEADER_SIZE + len(PAYLOAD)


def config() -> SpoolConfig:
    return SpoolConfig(
        directory=DIR,
        segment_bytes=4096,  # 40 records a segment, in appends of 10
        max_bytes=1 << 20,
        max_record_bytes=1024,
        max_pending_bytes=1 << 20,
    )


def filled(disk: MemoryFileLayer, count: int = 100) -> Spool:
    spool = Spool.open(config(), files=disk)
    for _ in range(count // 10):
        spool.append_sync([PAYLOAD] * 10)
    return spool


def kill(spool: Spool, disk: MemoryFileLayer) -> None:
    """Stop ``spool`` as kill -9 would: no clean-close index row for its active segment."""
    spool._crashed = True
    spool.close()
    disk.crash()


def last_path(disk: MemoryFileLayer) -> str:
    return f"{DIR}/{segment_name(list_segments(disk, DIR)[-1])}"


def damage(disk: MemoryFileLayer, how: str) -> None:
    path = last_path(disk)
    if how == "deleted":
        disk.unlink(path)
    elif how == "emptied":
        disk.write_file(path, b"")
    else:  # cut after its first 3 records
        disk.write_file(path, disk.read(path, 0, 3 * FRAME))


def read_all(spool: Spool) -> list[int]:
    return [r.index for r in spool.read(spool.hwm, max_records=1 << 20, max_bytes=1 << 30)]


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("how", ["deleted", "emptied", "cut"])
def test_an_active_segment_lost_after_a_crash_below_the_mark_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    disk = MemoryFileLayer()
    spool = filled(disk)
    assert list_segments(disk, DIR)[-1] == 81  # the active segment holds 81..100
    spool.commit(98, b"")  # 99 and 100 not delivered
    kill(spool, disk)
    assert 81 not in (read_index(disk, DIR) or {})
    damage(disk, how)
    with caplog.at_level(logging.ERROR, logger="predtrace.sidecar.spool"):
        again = Spool.open(config(), files=disk)
    lines = errors(caplog)
    assert len(lines) == 1, lines
    assert "below the delivered mark 98" in lines[0] and "not known" in lines[0]
    if how != "deleted":
        assert segment_name(81) in lines[0]
    assert again.counters.snapshot()["corrupt_regions"] == 1
    assert again.counters.dropped == Counter()  # how many it held is not known
    assert read_all(again) == []
    # The next records go on from the mark, in a segment of their own.
    assert again.append_sync([PAYLOAD] * 3) == range(99, 102)
    assert list_segments(disk, DIR)[-1] == 99
    kill(again, disk)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.spool"):
        third = Spool.open(config(), files=disk)
    # Counted once: a later start finds nothing more to count, and no gap.
    assert third.counters.snapshot()["corrupt_regions"] == 0
    assert third.counters.dropped == Counter()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert read_all(third) == [99, 100, 101]
    third.close()


@pytest.mark.parametrize("how", ["deleted", "emptied", "cut"])
def test_after_a_clean_close_each_lost_record_is_counted_and_no_gap_is_left_to_count_later(
    caplog: pytest.LogCaptureFixture, how: str
) -> None:
    disk = MemoryFileLayer()
    spool = filled(disk)
    spool.commit(98, b"")
    spool.close()
    damage(disk, how)
    again = Spool.open(config(), files=disk)
    reason = "missing_segment" if how == "deleted" else "corrupt"
    assert again.counters.dropped == Counter({reason: 2})  # 99 and 100, by the row
    assert again.counters.snapshot()["corrupt_regions"] == (0 if how == "deleted" else 1)
    assert again.append_sync([PAYLOAD] * 3) == range(99, 102)
    again.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.spool"):
        third = Spool.open(config(), files=disk)
    assert third.counters.dropped == Counter()
    assert third.counters.snapshot()["corrupt_regions"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert read_all(third) == [99, 100, 101]
    third.close()


@pytest.mark.parametrize(
    "state", ["all-delivered", "nothing-delivered", "just-rotated", "fresh-spool"]
)
def test_a_crash_that_damaged_nothing_counts_nothing(
    caplog: pytest.LogCaptureFixture, state: str
) -> None:
    disk = MemoryFileLayer()
    spool = filled(disk, 0 if state == "fresh-spool" else 100)
    if state == "all-delivered":
        spool.commit(100, b"")
    elif state == "just-rotated":
        spool.commit(100, b"")
        spool._rotate()  # a crash before the first write to the new segment
        assert list_segments(disk, DIR)[-1] == 101
    kill(spool, disk)
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.spool"):
        again = Spool.open(config(), files=disk)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert again.counters.snapshot()["corrupt_regions"] == 0
    assert again.counters.dropped == Counter()
    expected = list(range(1, 101)) if state == "nothing-delivered" else []
    assert read_all(again) == expected
    assert again.append_sync([PAYLOAD]) == range(
        1 if state == "fresh-spool" else 101, 2 if state == "fresh-spool" else 102
    )
    again.close()

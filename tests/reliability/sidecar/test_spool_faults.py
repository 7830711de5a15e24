"""Spool faults, in process (T1): RELIABILITY rows 9, 10, 11, 12, 13 (spool points), 14, 15.

Most tests work on ``MemoryFileLayer``, which keeps fsynced bytes apart from
written ones, so power loss, torn tails, bit flips, a full disk and crashes at
named points are exact and fast. Segment files deleted or cut short behind the
spool's back are damaged on the real disk, under ``tmp_path``. Seeded tests
print their seed.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from predtrace.sidecar._errors import SpoolError, SpoolFullError
from predtrace.sidecar.spool import (
    FAULT_POINTS,
    HEADER_SIZE,
    FaultPoints,
    MemoryFileLayer,
    SimulatedCrash,
    Spool,
    SpoolConfig,
    segment_name,
)

DIR = "/spool"
SEEDS = [11, 23, 37, 41, 53]


def config(**kw: object) -> SpoolConfig:
    values: dict[str, object] = {
        "directory": DIR,
        "segment_bytes": 4096,
        "max_bytes": 1 << 22,
        "max_record_bytes": 1024,
    }
    values.update(kw)
    return SpoolConfig(**values)  # type: ignore[arg-type]


def payload(i: int) -> bytes:
    return f"event-{i:06d}".encode() * 3


def read_all(spool: Spool, after: int = 0) -> dict[int, bytes]:
    return {r.index: r.payload for r in spool.read(after, max_records=1 << 30, max_bytes=1 << 40)}


def fill(spool: Spool, n: int, per_append: int = 5) -> dict[int, bytes]:
    acked: dict[int, bytes] = {}
    for start in range(0, n, per_append):
        batch = [payload(i) for i in range(start, min(n, start + per_append))]
        indexes = spool.append_sync(batch)
        acked.update(zip(indexes, batch, strict=True))
    return acked


FRAME = HEADER_SIZE + len(payload(0))  # every record of these tests


def segment_firsts(directory: Path) -> list[int]:
    return sorted(int(p.name[4:24]) for p in directory.glob("seg-*.log"))


def read_in_batches(spool: Spool, after: int, per_read: int = 7) -> dict[int, bytes]:
    got: dict[int, bytes] = {}
    while records := spool.read(after, max_records=per_read, max_bytes=1 << 40):
        got.update((r.index, r.payload) for r in records)
        after = records[-1].index
    return got


# -- row 9: power loss ------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_power_loss_keeps_every_acknowledged_record_and_invents_none(seed: int) -> None:
    print(f"seed={seed}")
    rng = random.Random(seed)
    disk = MemoryFileLayer()
    faults = FaultPoints()
    faults.arm("append.after_write", rng.randint(5, 40))
    spool = Spool.open(config(), files=disk, faults=faults)
    acked: dict[int, bytes] = {}
    submitted: set[bytes] = set()
    lock = threading.Lock()

    def on_done(batch: list[bytes]) -> object:
        def done(result: range | BaseException) -> None:
            if isinstance(result, range):
                with lock:
                    acked.update(zip(result, batch, strict=True))

        return done

    for i in range(100_000):
        if spool._crashed:
            break
        batch = [payload(i * 3 + k) for k in range(rng.randint(1, 3))]
        try:
            spool.submit(batch, on_done(batch))  # type: ignore[arg-type]
        except SpoolError:
            time.sleep(0.001)  # busy, or the writer just died
            continue
        submitted.update(batch)
        if rng.random() < 0.2:
            time.sleep(0.0005)  # let the writer commit some groups
    spool._thread.join(5)
    assert spool._crashed, "the fault point was never reached"
    disk.power_loss(rng)
    again = Spool.open(config(), files=disk)
    survived = read_all(again)
    for index, data in acked.items():
        assert survived.get(index) == data, f"acknowledged record {index} lost"
    assert set(survived.values()) <= submitted
    fresh = again.append_sync([b"after-the-outage"])
    assert read_all(again, fresh.start - 1) == {fresh.start: b"after-the-outage"}
    again.close()


def test_power_loss_after_a_commit_never_resurrects_the_old_mark() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    fill(spool, 100)
    spool.commit(60, b"s")
    disk.power_loss()
    again = Spool.open(config(), files=disk)
    assert again.hwm == 60
    assert sorted(read_all(again, again.hwm)) == list(range(61, 101))
    again.close()


# -- row 10: torn tail at any byte offset ------------------------------------------------


def test_a_torn_tail_at_every_byte_offset_keeps_each_complete_record() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 6, per_append=1)
    spool.close()
    path = f"{DIR}/{segment_name(1)}"
    whole = disk.read(path, 0, disk.size(path))
    ends = []
    offset = 0
    for i in sorted(acked):
        offset += HEADER_SIZE + len(acked[i])
        ends.append(offset)
    for cut in range(len(whole) + 1):
        copy = MemoryFileLayer()
        copy.makedirs(DIR)
        copy.write_file(path, whole[:cut])
        again = Spool.open(config(), files=copy)
        complete = sum(1 for end in ends if end <= cut)
        assert sorted(read_all(again)) == list(range(1, complete + 1)), f"cut at {cut}"
        torn = 0 if cut in (0, *ends) else 1
        assert again.counters.dropped["torn"] == torn, f"cut at {cut}"
        assert again.append_sync([b"next"]) == range(complete + 1, complete + 2)
        again.close()


# -- row 11: bit flip in a middle record --------------------------------------------------


@pytest.mark.parametrize("sealed", [False, True], ids=["active-segment", "sealed-segment"])
def test_a_bit_flip_in_a_middle_record_skips_only_that_record_and_counts_it(sealed: bool) -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 9, per_append=1)
    if sealed:
        spool._rotate()  # seal the segment holding the records
    spool.close()
    path = f"{DIR}/{segment_name(1)}"
    start = sum(HEADER_SIZE + len(acked[i]) for i in range(1, 5))
    length = HEADER_SIZE + len(acked[5])
    for offset in range(start, start + length):
        copy = MemoryFileLayer()
        copy.makedirs(DIR)
        for name in disk.listdir(DIR):
            copy.write_file(f"{DIR}/{name}", disk.read(f"{DIR}/{name}", 0, 1 << 20))
        copy.corrupt(path, offset)
        again = Spool.open(config(), files=copy)
        got = read_all(again)
        assert sorted(got) == [1, 2, 3, 4, 6, 7, 8, 9], f"flip at {offset}"
        assert all(got[i] == acked[i] for i in got)
        assert again.counters.dropped["corrupt"] == 1, f"flip at {offset}"
        again.close()


@pytest.mark.parametrize("records_per_read", [1, 2, 3, 100])
def test_reads_under_a_byte_cap_count_a_damaged_record_exactly_once(
    records_per_read: int,
) -> None:
    # A read that stops at the cap just past a damaged record leaves it to
    # the next read, which must count it: one region, one dropped event.
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 9, per_append=1)
    start = sum(HEADER_SIZE + len(acked[i]) for i in range(1, 3))
    # Damaged on disk while the spool runs (not seen by a recovery scan).
    disk.corrupt(f"{DIR}/{segment_name(1)}", start + HEADER_SIZE + 3)  # record 3's payload
    cap = len(acked[1]) * records_per_read + 1
    after, got = 0, []
    while records := spool.read(after, max_records=1 << 30, max_bytes=cap):
        got += [r.index for r in records]
        after = records[-1].index
    assert got == [1, 2, 4, 5, 6, 7, 8, 9]
    assert spool.counters.dropped["corrupt"] == 1
    assert spool.counters.corrupt_regions == 1
    spool.close()


@pytest.mark.parametrize("max_bytes", [64, 1 << 40])
def test_a_damaged_run_longer_than_a_read_chunk_counts_as_one_region(max_bytes: int) -> None:
    # The reader scans a segment in chunks of about twice the largest record;
    # a run of bad bytes longer than that spans a chunk boundary, and the
    # chunk that starts inside it continues the region counted before.
    disk = MemoryFileLayer()
    spool = Spool.open(config(segment_bytes=1 << 20), files=disk)
    acked = fill(spool, 400, per_append=1)
    path = f"{DIR}/{segment_name(1)}"
    frame = HEADER_SIZE + len(acked[1])
    first, run = 10 * frame + 5, 5000  # from inside record 11, over 2.4 read chunks
    for offset in range(first, first + run):
        disk.corrupt(path, offset, 0)
    lost = {i for i in acked if (i - 1) * frame < first + run and i * frame > first}
    after, got = 0, []
    while records := spool.read(after, max_records=1 << 30, max_bytes=max_bytes):
        got += [r.index for r in records]
        after = records[-1].index
    assert got == [i for i in acked if i not in lost]
    assert spool.counters.corrupt_regions == 1
    assert spool.counters.dropped["corrupt"] == len(lost)
    spool.close()


def test_a_capped_read_counts_the_damaged_record_before_a_reread_from_an_older_mark() -> None:
    # A prefetch read stops at its cap just past the damage; the next read
    # starts over from an older mark (not the cursor): the lost record is
    # counted once, by the first.
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 9, per_append=1)
    start = sum(HEADER_SIZE + len(acked[i]) for i in range(1, 3))
    disk.corrupt(f"{DIR}/{segment_name(1)}", start + HEADER_SIZE + 3)  # record 3's payload
    first = spool.read(0, max_records=1 << 30, max_bytes=len(acked[1]) * 2 + 1)
    assert [r.index for r in first] == [1, 2]
    again = spool.read(0, max_records=1 << 30, max_bytes=1 << 30)
    assert [r.index for r in again] == [1, 2, 4, 5, 6, 7, 8, 9]
    assert (spool.counters.corrupt_regions, spool.counters.dropped["corrupt"]) == (1, 1)
    spool.close()


def test_a_read_stopped_by_until_inside_damage_leaves_the_region_counted_once() -> None:
    # BatchPlanner.resume (the shipper, at start) reads up to a planned batch's
    # last index; when its last chunk ends inside a damaged run, the next read
    # continues that run.
    disk = MemoryFileLayer()
    big = config(segment_bytes=64 << 20, max_bytes=256 << 20, max_record_bytes=1 << 20)
    spool = Spool.open(big, files=disk)
    payload = bytes(range(256)) * 400  # 100 KiB
    for _ in range(300):
        spool.append_sync([payload])
    frame = HEADER_SIZE + len(payload)
    first, run = 150 * frame + 10, 3 << 20  # from just after record 150, across 16 MiB
    for offset in range(first, first + run, 4096):
        disk.corrupt(f"{DIR}/{segment_name(1)}", offset, 0)
    got = spool.read(0, max_records=2**31, max_bytes=2**62, until=150)
    assert [r.index for r in got] == list(range(1, 151))
    after = 150
    while records := spool.read(after, max_records=1 << 30, max_bytes=4 << 20):
        after = records[-1].index
    assert spool.counters.corrupt_regions == 1
    spool.close()


# -- row 12: index garbage ---------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00" * 64, b"PTIX1garbage-with-the-right-magic", None],
    ids=["empty", "zeros", "bad-checksum", "missing"],
)
def test_a_garbage_index_is_rebuilt_from_the_segments_without_loss(garbage: bytes | None) -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 300)
    spool.close()
    if garbage is None:
        disk.unlink(f"{DIR}/index")
    else:
        disk.write_file(f"{DIR}/index", garbage)
    again = Spool.open(config(), files=disk)
    assert read_all(again) == acked
    assert again.counters.index_rebuilds >= 1
    again.close()


def test_an_index_that_disagrees_with_the_files_is_not_trusted() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    fill(spool, 200)
    spool.close()
    stale = disk.read(f"{DIR}/index", 0, 1 << 20)
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 100)
    spool.close()
    disk.write_file(f"{DIR}/index", stale)
    again = Spool.open(config(), files=disk)
    assert set(acked.items()) <= set(read_all(again).items())
    again.close()


def test_corrupt_newest_state_slot_falls_back_to_the_older_one() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    fill(spool, 50)
    spool.commit(10, b"older")
    spool.commit(20, b"newer")
    spool.close()
    disk.corrupt(f"{DIR}/state.0", 12)
    again = Spool.open(config(), files=disk)
    assert (again.hwm, again.meta, again.state_lost) == (10, b"older", False)
    again.close()


def test_when_both_state_slots_are_unreadable_everything_on_disk_is_replayed() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 50)
    spool.commit(5, b"a")
    spool.commit(10, b"b")
    spool.close()
    disk.corrupt(f"{DIR}/state.0", 12)
    disk.corrupt(f"{DIR}/state.1", 12)
    again = Spool.open(config(), files=disk)
    assert again.state_lost
    assert again.hwm == 0
    assert read_all(again) == acked
    again.close()


# -- row 13 (spool points, in process) ---------------------------------------------------

SPOOL_POINTS = [p for p in FAULT_POINTS if not p.startswith("shipper.")]


@pytest.mark.parametrize("power_loss", [False, True], ids=["crash", "power-loss"])
@pytest.mark.parametrize("point", SPOOL_POINTS)
def test_a_crash_at_each_named_point_restarts_cleanly_without_losing_acknowledged_records(
    point: str, power_loss: bool
) -> None:
    disk = MemoryFileLayer()
    faults = FaultPoints()
    faults.arm(point, 2)
    spool = Spool.open(config(), files=disk, faults=faults)
    acked: dict[int, bytes] = {}
    hwm = 0
    try:
        for round_ in range(40):
            acked.update(fill(spool, 10))
            hwm = min(acked) + round_ * 5
            spool.commit(hwm, b"m")
    except (SimulatedCrash, Exception):  # noqa: BLE001, S110 - the crash, or the dead writer's refusal
        pass
    assert faults.hits.get(point, 0) >= 2, f"{point} was never reached"
    disk.power_loss() if power_loss else disk.crash()
    again = Spool.open(config(), files=disk)
    survived = read_all(again, again.hwm)
    assert again.hwm <= max(hwm, again.hwm)
    for index, data in acked.items():
        if index > again.hwm:
            assert survived.get(index) == data, f"acknowledged record {index} lost"
    again.append_sync([b"after"])
    again.close()


# -- row 14: disk full -------------------------------------------------------------------


def test_a_full_disk_refuses_the_write_whole_and_resumes_when_space_returns() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 20)
    disk.capacity = disk.used_bytes() + 100  # room for part of one more record
    with pytest.raises(SpoolFullError):
        spool.append_sync([payload(i) for i in range(100, 110)])
    assert spool.counters.disk_full == 1
    assert read_all(spool) == acked, "a half-written record was readable"
    disk.capacity = None
    more = spool.append_sync([b"after-space-returned"])
    assert read_all(spool, more.start - 1) == {more.start: b"after-space-returned"}
    spool.close()
    again = Spool.open(config(), files=disk)
    assert read_all(again) == {**acked, more.start: b"after-space-returned"}
    again.close()


def test_an_io_error_refuses_the_write_whole_and_is_counted_apart_from_a_full_disk() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 20)
    disk.fail_next_fsync = errno.EIO
    with pytest.raises(SpoolError, match="Input/output error") as info:
        spool.append_sync([payload(i) for i in range(100, 110)])
    assert not isinstance(info.value, SpoolFullError)
    assert (spool.counters.write_errors, spool.counters.disk_full) == (1, 0)
    assert spool.last_refusal is not None and "Input/output error" in spool.last_refusal[1]
    assert read_all(spool) == acked, "a record of the failed commit was readable"
    more = spool.append_sync([b"after"])
    assert read_all(spool, more.start - 1) == {more.start: b"after"}
    spool.close()


def test_a_disk_full_during_rotation_loses_nothing_acknowledged() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 40)
    disk.capacity = disk.used_bytes() + 10
    for _ in range(3):
        with pytest.raises(SpoolFullError):
            spool.append_sync([payload(i) for i in range(40)])
    disk.capacity = None
    acked.update(fill(spool, 40))
    spool.close()
    assert read_all(Spool.open(config(), files=disk)) == acked


def test_a_restart_on_a_full_disk_starts_and_ships_what_was_spooled() -> None:
    # The index is a cache: no room to rewrite it at the start must not keep
    # the spool, and with it the only way to free the disk, from starting.
    disk = MemoryFileLayer()
    spool = Spool.open(config(), files=disk)
    acked = fill(spool, 400)
    spool.commit(256, b"s")  # both state slots exist, and later marks fit in them
    spool.commit(260, b"s")
    spool.close()
    disk.capacity = disk.used_bytes()
    again = Spool.open(config(), files=disk)
    assert not disk.exists(f"{DIR}/index.tmp"), "a temporary index kept room the spool needs"
    assert read_all(again, again.hwm) == {i: p for i, p in acked.items() if i > 260}
    again.commit(400, b"s")  # delivered: the state slot is rewritten in place
    more = again.append_sync([b"after-the-drain"])  # the released segments made room
    assert read_all(again, 400) == {more.start: b"after-the-drain"}
    assert again.counters.dropped == Counter()
    again.close()


# -- row 15: the byte cap ----------------------------------------------------------------


def test_at_the_byte_cap_the_oldest_records_go_the_newest_stay_and_the_count_is_exact() -> None:
    disk = MemoryFileLayer()
    cap = 3 * 4096
    spool = Spool.open(config(max_bytes=cap), files=disk)
    acked = fill(spool, 1000)
    kept = read_all(spool)
    dropped = spool.counters.dropped["byte_cap"]
    assert dropped > 0
    assert len(kept) + dropped == len(acked)
    assert max(kept) == max(acked), "the newest record must be kept"
    assert sorted(kept) == list(range(min(kept), max(acked) + 1)), "drops are the oldest"
    assert spool.stats().bytes <= cap + 4096
    spool.close()


def test_the_cap_never_drops_the_segment_of_the_batch_in_flight() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(max_bytes=3 * 4096), files=disk)
    fill(spool, 10)
    spool.pin((1, 10))
    fill(spool, 1000)
    kept = read_all(spool)
    assert all(i in kept for i in range(1, 11))
    assert len(kept) + spool.counters.dropped["byte_cap"] == 1010
    spool.close()


# -- segment files deleted or cut short behind the spool's back ---------------------------


def test_a_sealed_segment_deleted_while_running_is_counted_and_later_ones_still_delivered(
    tmp_path: Path,
) -> None:
    spool = Spool.open(config(directory=str(tmp_path)))
    acked = fill(spool, 400)
    first, following = segment_firsts(tmp_path)[1:3]
    # The shipper is partway through the segment when it vanishes.
    assert [r.index for r in spool.read(0, max_records=first + 3, max_bytes=1 << 40)][-1] == (
        first + 3
    )
    spool.commit(first + 3, b"m")
    os.unlink(tmp_path / segment_name(first))
    lost = range(first + 4, following)
    got = read_in_batches(spool, first + 3)
    assert got == {i: p for i, p in acked.items() if i > first + 3 and i not in lost}
    assert spool.counters.dropped == Counter(missing_segment=len(lost))
    spool.close()
    again = Spool.open(config(directory=str(tmp_path)))
    assert read_all(again, again.hwm) == got
    assert again.counters.dropped == Counter(), "the lost records were counted again"
    again.close()


@pytest.mark.parametrize("cut", ["emptied", "at-a-record", "mid-record"])
def test_a_sealed_segment_cut_short_while_running_counts_its_lost_records_once(
    tmp_path: Path, cut: str
) -> None:
    spool = Spool.open(config(directory=str(tmp_path)))
    acked = fill(spool, 400)
    first, following = segment_firsts(tmp_path)[1:3]
    assert [r.index for r in spool.read(0, max_records=first + 3, max_bytes=1 << 40)][-1] == (
        first + 3
    )
    spool.commit(first + 3, b"m")
    kept = 0 if cut == "emptied" else 20
    size = kept * FRAME + (FRAME // 2 if cut == "mid-record" else 0)
    os.truncate(tmp_path / segment_name(first), size)
    lost = range(max(first + kept, first + 4), following)
    got = read_in_batches(spool, first + 3)
    assert got == {i: p for i, p in acked.items() if i > first + 3 and i not in lost}
    assert spool.counters.dropped == Counter(corrupt=len(lost))
    reread = read_all(spool, 0)  # from an older mark (the first segment is released)
    gone = range(first + kept, following)
    assert reread == {i: p for i, p in acked.items() if i >= first and i not in gone}
    assert spool.counters.dropped == Counter(corrupt=len(lost)), "a re-read counted again"
    spool.close()
    again = Spool.open(config(directory=str(tmp_path)))
    assert read_all(again, again.hwm) == got
    assert again.counters.dropped == Counter(), "the lost records were counted again"
    again.close()


@pytest.mark.parametrize("hwm", [0, 100], ids=["nothing-delivered", "delivered-into-it"])
@pytest.mark.parametrize("index", [True, False], ids=["indexed", "index-lost"])
@pytest.mark.parametrize("kept", [0, 20], ids=["emptied", "cut-at-a-record"])
def test_a_sealed_segment_cut_short_between_runs_counts_every_undelivered_record_it_lost(
    tmp_path: Path, kept: int, index: bool, hwm: int
) -> None:
    spool = Spool.open(config(directory=str(tmp_path)))
    acked = fill(spool, 400)
    if hwm:
        spool.commit(hwm, b"m")
    spool.close()
    firsts = segment_firsts(tmp_path)
    first = max(f for f in firsts if f <= 100)  # the second segment, holding record 100
    following = firsts[firsts.index(first) + 1]
    assert first > 1
    os.truncate(tmp_path / segment_name(first), kept * FRAME)
    if not index:
        os.unlink(tmp_path / "index")
    again = Spool.open(config(directory=str(tmp_path)))
    lost = range(first + kept, following)
    assert read_all(again, again.hwm) == {
        i: p for i, p in acked.items() if i > hwm and i not in lost
    }
    assert again.counters.dropped == Counter(corrupt=sum(1 for i in lost if i > hwm))
    again.close()

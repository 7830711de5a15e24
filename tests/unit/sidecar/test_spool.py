"""The spool's own contract: durable appends, ordered reads, commits, rotation, limits."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import stat
import threading
from collections import Counter
from pathlib import Path

import pytest

from predtrace.sidecar._errors import (
    EventTooLargeError,
    SpoolBusyError,
    SpoolClosedError,
    SpoolUnusableError,
)
from predtrace.sidecar.spool import HEADER_SIZE, MemoryFileLayer, Spool, SpoolConfig, segment_name
from predtrace.sidecar.spool._meta import read_index

DIR = "/spool"


def small(**kw: object) -> SpoolConfig:
    values: dict[str, object] = {
        "directory": DIR,
        "segment_bytes": 4096,
        "max_bytes": 1 << 20,
        "max_record_bytes": 1024,
        "max_pending_bytes": 1 << 20,
    }
    values.update(kw)
    return SpoolConfig(**values)  # type: ignore[arg-type]


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [f"event-{i:05d}".encode() * 4 for i in range(start, start + n)]


def read_all(spool: Spool, after: int = 0) -> list[bytes]:
    return [r.payload for r in spool.read(after, max_records=1 << 30, max_bytes=1 << 40)]


@pytest.fixture
def disk() -> MemoryFileLayer:
    return MemoryFileLayer()


def test_appends_get_consecutive_indexes_and_read_back_in_order(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    assert spool.append_sync(payloads(3)) == range(1, 4)
    assert spool.append_sync(payloads(2, 3)) == range(4, 6)
    assert read_all(spool) == payloads(5)
    assert [r.index for r in spool.read(2, max_records=2, max_bytes=1 << 20)] == [3, 4]
    spool.close()


def test_an_acknowledged_append_survives_power_loss(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    spool.append_sync(payloads(10))
    disk.power_loss()
    again = Spool.open(small(), files=disk)
    assert read_all(again) == payloads(10)
    again.close()


async def test_async_append_returns_only_after_the_fsync(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    before = disk.fsyncs
    indexes = await spool.append(payloads(4))
    assert indexes == range(1, 5)
    assert disk.fsyncs > before
    spool.close()


def test_segments_rotate_and_a_commit_releases_delivered_ones(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    for i in range(20):
        spool.append_sync(payloads(10, i * 10))
    assert spool.stats().segments > 3
    spool.commit(150, b"shipper-state")
    stats = spool.stats()
    assert stats.hwm == 150
    assert stats.records == 50
    assert read_all(spool, 150) == payloads(50, 150)
    segments = [n for n in disk.listdir(DIR) if n.startswith("seg-")]
    assert len(segments) == stats.segments
    spool.close()


def test_reopen_restores_the_mark_the_shipper_bytes_and_the_numbering(
    disk: MemoryFileLayer,
) -> None:
    spool = Spool.open(small(), files=disk)
    spool.append_sync(payloads(30))
    spool.commit(12, b"abc")
    spool.close()
    again = Spool.open(small(), files=disk)
    assert (again.hwm, again.meta) == (12, b"abc")
    assert again.append_sync(payloads(1)) == range(31, 32)
    assert read_all(again, 12) == [*payloads(18, 12), *payloads(1)]
    again.close()


def test_listeners_hear_of_each_durable_commit(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    heard = threading.Event()
    spool.add_listener(heard.set)
    spool.append_sync(payloads(1))
    assert heard.is_set()
    spool.close()


def test_an_oversized_event_is_refused_alone(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    with pytest.raises(EventTooLargeError):
        spool.submit([b"x" * 2000], lambda _: None)
    spool.close()


class _SlowDisk(MemoryFileLayer):
    """Holds the writer in fsync until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()
        self.armed = False

    def fsync(self, handle: int) -> None:
        if self.armed:
            self.entered.set()
            self.release.wait(10)
        super().fsync(handle)


def test_appends_are_refused_with_busy_when_the_writer_is_behind() -> None:
    disk = _SlowDisk()
    spool = Spool.open(small(max_pending_bytes=1500), files=disk)
    disk.armed = True
    done: list[object] = []
    spool.submit(payloads(1), done.append)
    assert disk.entered.wait(5)
    spool.submit([b"a" * 1000], done.append)
    with pytest.raises(SpoolBusyError):
        spool.submit([b"b" * 1000], done.append)
    assert spool.counters.busy == 1
    disk.release.set()
    spool.close()
    assert len(done) == 2


def test_a_closed_spool_refuses_appends_and_closing_twice_is_fine(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    spool.close()
    spool.close()
    with pytest.raises(SpoolClosedError):
        spool.submit(payloads(1), lambda _: None)


def test_a_spool_path_under_a_file_is_unusable_and_the_error_names_path_and_reason(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolUnusableError) as info:
        Spool.open(SpoolConfig(directory=str(blocker / "spool")))
    message = str(info.value)
    assert str(blocker / "spool") in message
    assert "Not a directory" in message


def test_a_second_sidecar_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    first = Spool.open(SpoolConfig(directory=str(tmp_path)))
    with pytest.raises(SpoolUnusableError, match="in use by another sidecar"):
        Spool.open(SpoolConfig(directory=str(tmp_path)))
    first.close()
    Spool.open(SpoolConfig(directory=str(tmp_path))).close()


def test_deleting_every_file_in_the_spool_but_the_segments_does_not_unlock_it(
    tmp_path: Path,
) -> None:
    # A cleanup job that removes stray files must not let a second sidecar in.
    first = Spool.open(SpoolConfig(directory=str(tmp_path)))
    for name in os.listdir(tmp_path):
        if not name.startswith("seg-"):
            os.unlink(tmp_path / name)
    with pytest.raises(SpoolUnusableError, match="in use by another sidecar"):
        Spool.open(SpoolConfig(directory=str(tmp_path)))
    first.close()
    Spool.open(SpoolConfig(directory=str(tmp_path))).close()


def test_where_directories_cannot_be_locked_a_lock_file_still_keeps_a_second_sidecar_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_flock = fcntl.flock

    def no_directory_locks(fd: int, operation: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # as NFS answers flock on a directory
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_directory_locks)
    first = Spool.open(SpoolConfig(directory=str(tmp_path)))
    assert (tmp_path / "lock").exists()
    with pytest.raises(SpoolUnusableError, match="in use by another sidecar"):
        Spool.open(SpoolConfig(directory=str(tmp_path)))
    first.close()
    Spool.open(SpoolConfig(directory=str(tmp_path))).close()


def test_the_real_disk_round_trips_through_a_restart(tmp_path: Path) -> None:
    config = SpoolConfig(directory=str(tmp_path), segment_bytes=1 << 22, max_bytes=1 << 23)
    spool = Spool.open(config)
    spool.append_sync(payloads(100))
    spool.close()
    again = Spool.open(config)
    assert read_all(again) == payloads(100)
    again.close()
    assert all(
        os.stat(tmp_path / n).st_mode & 0o077 == 0 for n in os.listdir(tmp_path) if "seg-" in n
    )


async def test_many_concurrent_appends_are_group_committed(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(segment_bytes=1 << 16, max_bytes=1 << 22), files=disk)
    results = await asyncio.gather(*(spool.append(payloads(1, i)) for i in range(200)))
    assert sorted(r.start for r in results) == list(range(1, 201))
    assert spool.counters.commits < 200
    spool.close()


@pytest.mark.parametrize("cap_in_events", [1.5, 7.5, 40.5, 200.0])
def test_reads_under_a_byte_cap_never_pass_it_and_together_miss_nothing(
    disk: MemoryFileLayer, cap_in_events: float
) -> None:
    # 4 KiB segments hold 80 of these 44-byte records: reads cross segment
    # boundaries, and every cap here falls between record boundaries.
    spool = Spool.open(small(), files=disk)
    spool.append_sync(payloads(300))
    size = len(payloads(1)[0])
    cap = int(size * cap_in_events)
    after, seen = 0, []
    while True:
        records = spool.read(after, max_records=1 << 30, max_bytes=cap)
        if not records:
            break
        assert sum(len(r.payload) for r in records) <= cap
        seen += [r.payload for r in records]
        after = records[-1].index
    assert seen == payloads(300)
    spool.close()


def test_the_first_record_of_a_read_comes_whatever_its_size(disk: MemoryFileLayer) -> None:
    spool = Spool.open(small(), files=disk)
    spool.append_sync([b"x" * 900, b"y" * 10])
    assert [len(r.payload) for r in spool.read(0, max_records=10, max_bytes=100)] == [900]
    assert [len(r.payload) for r in spool.read(1, max_records=10, max_bytes=100)] == [10]
    spool.close()


# -- damage found by hand between runs is counted and logged ------------------------------


FRAME = HEADER_SIZE + len(payloads(1)[0])  # every record of payloads()


@pytest.mark.parametrize(("cut", "hwm"), [(10, 0), (0, 0), (10, 8)])
def test_records_cut_from_the_active_segment_after_a_clean_close_are_each_counted(
    disk: MemoryFileLayer, cut: int, hwm: int
) -> None:
    # The active segment cut short by hand after a clean stop: its records
    # had been acknowledged, yet the cut was taken for one torn write
    # ("torn": 1) however many records it lost.
    spool = Spool.open(small(), files=disk)
    spool.append_sync(payloads(10))
    if hwm:
        spool.commit(hwm, b"")
    spool.close()
    path = f"{DIR}/{segment_name(1)}"
    data = disk.read(path, 0, disk.size(path))
    disk.write_file(path, data[: 7 * FRAME + cut])  # inside record 8, or just before it
    again = Spool.open(small(), files=disk)
    assert read_all(again, hwm) == payloads(7)[hwm:]
    lost = 10 - max(7, hwm)
    assert again.counters.dropped == Counter(corrupt=lost)
    after = max(7, hwm) + 1  # a delivered index is never given again
    assert again.append_sync(payloads(1)) == range(after, after + 1)
    again.close()


def test_a_started_spool_keeps_no_row_for_its_active_segment(disk: MemoryFileLayer) -> None:
    # A row for the active segment is only written at a clean close: after a
    # crash, an invalid tail is a write torn before it was acknowledged.
    spool = Spool.open(small(), files=disk)
    spool.append_sync(payloads(10))
    spool.close()
    assert set(read_index(disk, DIR) or {}) == {1}
    again = Spool.open(small(), files=disk)
    assert read_index(disk, DIR) == {}
    again.close()


@pytest.mark.parametrize("sealed", [False, True], ids=["active-segment", "sealed-segment"])
def test_a_damaged_record_skipped_in_a_segment_is_logged_with_the_segment_and_count(
    disk: MemoryFileLayer, caplog: pytest.LogCaptureFixture, sealed: bool
) -> None:
    # A sealed segment is read at delivery time, the active one scanned at the
    # start: either way the record skipped was counted and never logged.
    spool = Spool.open(small(), files=disk)
    spool.append_sync(payloads(9))
    if sealed:
        spool._rotate()
    spool.close()
    path = f"{DIR}/{segment_name(1)}"
    disk.corrupt(path, 4 * FRAME + HEADER_SIZE + 3)  # record 5's payload
    with caplog.at_level(logging.WARNING, logger="predtrace.sidecar.spool"):
        again = Spool.open(small(), files=disk)
        assert len(read_all(again)) == 8
        read_all(again)  # read again: counted and logged once
    assert again.counters.dropped == Counter(corrupt=1)
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1, lines
    assert path in lines[0] and "losing 1 records" in lines[0]
    again.close()

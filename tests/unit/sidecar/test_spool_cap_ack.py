"""The byte cap never drops a record before it is acknowledged (DESIGN §4, RELIABILITY row 15).

At-least-once holds from the moment the sidecar acknowledges: so a record the
cap drops must have been acknowledged earlier, never by the append that wrote
it after the drop. An append bigger than the cap is refused up front; one the
cap has no room for beside the rest of its group commit (and the shipper's
pinned segments) is refused before any of it is written. Drop-oldest of
records acknowledged earlier goes on, counted (``byte_cap``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from predtrace.sidecar._errors import SpoolBusyError, SpoolError, SpoolFullError
from predtrace.sidecar.spool import HEADER_SIZE, MemoryFileLayer, Spool, SpoolConfig

DIR = "/spool"
KIB = 1024
MIB = 1024 * KIB


class GatedDisk(MemoryFileLayer):
    """A memory disk whose next write, once armed, waits for the test to open the gate.

    The writer thread is held inside one group commit while the test queues
    the appends of the next one: they are then committed as one group.
    """

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.gate = threading.Event()

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            assert self.gate.wait(30)
        super().pwrite(handle, data, offset)


def small(**kw: object) -> SpoolConfig:
    values: dict[str, object] = {
        "directory": DIR,
        "segment_bytes": 64 * KIB,
        "max_bytes": 256 * KIB,
        "max_record_bytes": 4 * KIB,
        "max_pending_bytes": 16 * MIB,
    }
    values.update(kw)
    return SpoolConfig(**values)  # type: ignore[arg-type]


def flash() -> SpoolConfig:
    # The README's small-flash settings: 1 MiB segments, a 2 MiB cap.
    return SpoolConfig(directory=DIR, segment_bytes=MIB, max_bytes=2 * MIB)


def events(start: int, count: int, size: int = 300) -> list[bytes]:
    return [f"{start + k:010d}".encode().ljust(size, b".") for k in range(count)]


def spooled(payloads: list[bytes]) -> int:
    return sum(HEADER_SIZE + len(p) for p in payloads)


def read_all(spool: Spool) -> dict[int, bytes]:
    return {r.index: r.payload for r in spool.read(0, max_records=1 << 30, max_bytes=1 << 40)}


class Appends:
    """Appends queued with ``submit``; what each one was answered."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.acked: dict[int, bytes] = {}
        self.refused: list[BaseException] = []
        self.lost_at_ack = 0  # records already gone when their append was acknowledged
        self._lock = threading.Lock()
        self._waiting = 0
        self._settled = threading.Semaphore(0)

    def submit(self, batch: list[bytes]) -> None:
        try:
            self.spool.submit(batch, self._callback(batch))
        except SpoolError as exc:
            self.refused.append(exc)
        else:
            self._waiting += 1

    def _callback(self, batch: list[bytes]) -> Callable[[range | BaseException], None]:
        def done(result: range | BaseException) -> None:
            if isinstance(result, range):  # read back at once, as the ack goes out
                found = self.spool.read(
                    result.start - 1, max_records=len(result), max_bytes=1 << 40
                )
                missing = len(set(result) - {r.index for r in found})
            with self._lock:
                if isinstance(result, range):
                    self.lost_at_ack += missing
                    self.acked.update(zip(result, batch, strict=True))
                else:
                    self.refused.append(result)
            self._settled.release()

        return done

    def wait(self) -> None:
        for _ in range(self._waiting):
            assert self._settled.acquire(timeout=30), "an append was never answered"
        self._waiting = 0


def check_acked_kept(spool: Spool, acked: dict[int, bytes]) -> dict[int, bytes]:
    """Every acknowledged record is either spooled intact or counted as dropped.

    Returns the records kept.
    """
    kept = read_all(spool)
    assert all(acked[i] == p for i, p in kept.items()), "a kept record is not what was acked"
    assert set(kept) <= set(acked), "a record nobody was acknowledged for is spooled"
    assert len(kept) + spool.counters.dropped["byte_cap"] == len(acked)
    return kept


def test_an_append_bigger_than_the_cap_is_refused_whole_naming_the_flag() -> None:
    spool = Spool.open(flash(), files=MemoryFileLayer())
    old = events(0, 1000)
    acked = dict(zip(spool.append_sync(old), old, strict=True))
    before = spool.stats()
    big = events(10_000, 10_000, 360)  # ~3.5 MB: a RecordBatch of 10,000 events
    assert spooled(big) > 2 * MIB
    with pytest.raises(SpoolFullError, match="--spool-max-bytes"):
        spool.append_sync(big)
    assert spool.stats().next_index == before.next_index, "part of the refused append was written"
    assert read_all(spool) == acked, "an acknowledged record is gone"
    assert spool.counters.dropped["byte_cap"] == 0
    assert spool.counters.cap_refused == 1
    assert spool.last_refusal is not None and "--spool-max-bytes" in spool.last_refusal[1]
    spool.close()


def test_an_append_up_to_the_cap_is_kept_whole_and_the_older_records_are_dropped_counted() -> None:
    # The active segment holds 900 KiB acknowledged earlier: the append of
    # ~1.9 MiB cannot fit beside them, so they are dropped (counted), never
    # the append's own first records.
    spool = Spool.open(flash(), files=MemoryFileLayer())
    old = events(0, 3000)  # ~0.9 MiB, all in the active segment
    acked = dict(zip(spool.append_sync(old), old, strict=True))
    batch = events(10_000, 6400)  # ~1.9 MiB
    assert MIB < spooled(batch) <= 2 * MIB
    indexes = spool.append_sync(batch)
    acked.update(zip(indexes, batch, strict=True))
    kept = check_acked_kept(spool, acked)
    assert set(indexes) <= set(kept), "the append was acknowledged with records already dropped"
    assert spool.counters.dropped["byte_cap"] == len(old), "the older records were not counted"
    assert spool.stats().bytes <= 2 * MIB
    spool.close()


def test_a_group_commit_past_the_cap_never_acknowledges_a_dropped_record() -> None:
    disk = GatedDisk()
    spool = Spool.open(small(), files=disk)
    appends = Appends(spool)
    old = events(0, 640)  # ~200 KiB acknowledged before: the cap may drop these
    appends.acked.update(zip(spool.append_sync(old), old, strict=True))
    disk.armed = True
    appends.submit([b"first"])  # the writer holds this group while the next one queues
    assert disk.entered.wait(30)
    for b in range(12):  # ~60 KiB each, 720 KiB together: past the cap of 256 KiB
        appends.submit(events(10_000 * (b + 1), 190))
    disk.gate.set()
    appends.wait()
    newly = {i for i in appends.acked if i > len(old)}
    assert newly, "nothing of the group was acknowledged"
    assert appends.lost_at_ack == 0
    kept = check_acked_kept(spool, appends.acked)
    lost = sorted(newly - set(kept))
    assert not lost, f"{len(lost)} records were acknowledged already dropped"
    assert appends.refused, "the whole group was acknowledged past the cap"
    assert all(isinstance(e, (SpoolFullError, SpoolBusyError)) for e in appends.refused)
    # Drop-oldest of what was acknowledged earlier goes on, counted.
    assert spool.counters.dropped["byte_cap"] > 0
    assert min(kept) == spool.counters.dropped["byte_cap"] + 1, "the drops are not the oldest"
    spool.close()


def test_with_the_shipper_pinning_part_of_the_cap_a_group_takes_what_fits_the_rest_waits() -> None:
    # What does not fit beside the group's earlier appends is not refused: it
    # waits for the next group commit, once those are durable (and so may go
    # at the cap, counted, like any acknowledged record).
    disk = GatedDisk()
    spool = Spool.open(small(), files=disk)
    appends = Appends(spool)
    old = events(0, 480)  # ~150 KiB: the batch the shipper is sending
    appends.acked.update(zip(spool.append_sync(old), old, strict=True))
    spool.pin((1, len(old)))
    disk.armed = True
    appends.submit([b"first"])
    assert disk.entered.wait(30)
    batches = [events(10_000 * (b + 1), 128) for b in range(3)]  # ~40 KiB each
    for batch in batches:
        appends.submit(batch)
    commits = spool.counters.commits
    disk.gate.set()
    appends.wait()
    assert appends.refused == []
    assert appends.lost_at_ack == 0, "an append was acknowledged with records already dropped"
    assert spool.counters.commits >= commits + 3, "the appends went in one group commit"
    kept = check_acked_kept(spool, appends.acked)
    assert all(i in kept for i in range(1, len(old) + 1)), "a pinned record was dropped"
    assert batches[-1][0] in kept.values(), "the newest append is gone"
    assert spool.counters.cap_refused == 0
    # Alone, an append that does not fit beside the pinned batch is refused.
    with pytest.raises(SpoolFullError, match="--spool-max-bytes"):
        spool.append_sync(events(50_000, 400))  # ~125 KiB: more than the room left
    assert spool.counters.cap_refused == 1
    # The pin goes (delivered), and it fits, dropping the oldest records (counted).
    spool.pin(None)
    more = events(90_000, 400)
    appends.acked.update(zip(spool.append_sync(more), more, strict=True))
    kept = check_acked_kept(spool, appends.acked)
    assert spool.counters.dropped["byte_cap"] > 0, "the oldest records were not dropped"
    assert max(kept) == max(appends.acked), "the newest record must be kept"
    assert min(kept) > min(appends.acked), "the drops are not the oldest"
    spool.close()


def test_the_bytes_waiting_for_the_writer_are_at_most_the_cap() -> None:
    assert flash().pending_limit == 2 * MIB
    assert SpoolConfig(directory=DIR).pending_limit == 64 * MIB
    assert small(max_record_bytes=200 * KIB).pending_limit == 256 * KIB
    spool = Spool.open(flash(), files=MemoryFileLayer())
    assert spool.config.pending_limit < spool.config.max_pending_bytes
    spool.close()


def test_with_the_cap_pinned_full_one_event_a_little_over_a_segment_is_still_taken() -> None:
    # Review: past a cap the shipper's batches fill, appends go on a segment at
    # a time; one event a few bytes over a segment (which a segment passes its
    # size to hold) was refused for the whole outage.
    spool = Spool.open(flash(), files=MemoryFileLayer())
    held = [b"a" * (MIB - 1000), b"b" * (MIB - 1000)]
    indexes = [spool.append_sync([payload]) for payload in held]
    spool.pin((1, indexes[-1][-1]))  # both in the shipper's hands: the cap is full
    one = b"c" * (MIB - 24)  # the most an event may hold: its record passes a segment
    (index,) = spool.append_sync([one])
    assert {
        r.index: r.payload for r in spool.read(index - 1, max_records=1, max_bytes=2 * MIB)
    } == {index: one}
    with pytest.raises(SpoolFullError, match="--spool-max-bytes"):  # two such: more than a segment
        spool.append_sync([b"d" * (MIB // 2 + 100), b"e" * (MIB // 2 + 100)])
    spool.close()

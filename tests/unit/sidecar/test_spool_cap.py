"""The spool's byte cap holds at small caps too (RELIABILITY row 15).

With a small cap (small flash: ``--spool-segment-bytes 1MiB --spool-max-bytes
2MiB``) appends larger than a segment, the segment being filled and the
segments pinned by the shipper must not push the segment files several times
past the cap. The bound: the segment files never pass ``max_bytes`` while
nothing is pinned, and ``max_bytes`` plus the pinned segments otherwise; no
segment passes ``segment_bytes`` unless a single record does. Drops stay the
oldest records, the newest are kept, and the count is exact.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable

import pytest

from predtrace.sidecar._errors import ConfigError, SpoolBusyError, SpoolFullError
from predtrace.sidecar.spool import HEADER_SIZE, MemoryFileLayer, Spool, SpoolConfig

DIR = "/spool"
KIB = 1024
SEGMENT = 64 * KIB
CAP = 256 * KIB


class MeasuredDisk(MemoryFileLayer):
    """A memory disk that measures the segment files after every write."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0  # the most bytes the segment files ever held together
        self.largest = 0  # the largest segment file ever

    def pwrite(self, handle: int, data: bytes, offset: int) -> None:
        super().pwrite(handle, data, offset)
        sizes = [self.size(f"{DIR}/{n}") for n in self.listdir(DIR) if n.startswith("seg-")]
        self.peak = max(self.peak, sum(sizes))
        self.largest = max(self.largest, *sizes)


def config(**kw: object) -> SpoolConfig:
    values: dict[str, object] = {
        "directory": DIR,
        "segment_bytes": SEGMENT,
        "max_bytes": CAP,
        "max_record_bytes": 4 * KIB,
        "max_pending_bytes": 16 << 20,
    }
    values.update(kw)
    return SpoolConfig(**values)  # type: ignore[arg-type]


def event(i: int, size: int = 300) -> bytes:
    return f"{i:010d}".encode().ljust(size, b".")


def spooled(batch: list[bytes]) -> int:
    return sum(HEADER_SIZE + len(p) for p in batch)


def read_all(spool: Spool, after: int = 0) -> dict[int, bytes]:
    return {r.index: r.payload for r in spool.read(after, max_records=1 << 30, max_bytes=1 << 40)}


def segment_bytes_on(disk: MemoryFileLayer) -> int:
    return sum(disk.size(f"{DIR}/{n}") for n in disk.listdir(DIR) if n.startswith("seg-"))


def check_exact(spool: Spool, sent: dict[int, bytes], held: Iterable[int] = ()) -> None:
    """Kept + dropped == sent; the kept ones are intact; the held ones kept; drops the oldest.

    ``held``: records the shipper pinned. The segments holding them are kept
    whole; every other segment kept is newer than every one dropped.
    """
    kept = read_all(spool)
    dropped = spool.counters.dropped["byte_cap"]
    assert dropped > 0, "the test did not reach the cap"
    assert len(kept) + dropped == len(sent)
    assert all(sent[i] == p for i, p in kept.items()), "a kept record changed"
    assert max(kept) == max(sent), "the newest record must be kept"
    held = set(held)
    assert held <= set(kept), f"pinned records dropped: {sorted(held - set(kept))[:5]}"
    gap = [i for i in range(min(kept), max(kept) + 1) if i not in kept]
    if gap:  # what was dropped lies between the pinned segments and the newest ones
        assert held and max(held) < gap[0], "a record newer than a dropped one is missing"
        assert not [i for i in kept if gap[0] < i < gap[-1]], "the drops are not the oldest"
    assert dict(spool.counters.dropped) == {"byte_cap": dropped}


@pytest.mark.parametrize("seed", [3, 17, 29])
def test_appends_larger_than_a_segment_keep_the_segment_files_within_the_cap(seed: int) -> None:
    print(f"seed={seed}")
    rng = random.Random(seed)
    disk = MeasuredDisk()
    spool = Spool.open(config(), files=disk)
    sent: dict[int, bytes] = {}
    refused = 0
    for _ in range(40):
        # From a few records to groups bigger than a segment, some bigger than the cap.
        batch = [
            event(len(sent) + k, rng.randrange(50, 4 * KIB)) for k in range(rng.randrange(1, 400))
        ]
        if spooled(batch) > CAP:  # refused whole: written, the cap would drop part of it
            with pytest.raises(SpoolFullError, match="--spool-max-bytes"):
                spool.append_sync(batch)
            refused += 1
            continue
        sent.update(zip(spool.append_sync(batch), batch, strict=True))
    assert refused and spool.counters.cap_refused == refused
    assert disk.peak <= CAP, f"{disk.peak} bytes on disk past a cap of {CAP}"
    assert disk.largest <= SEGMENT, f"a segment of {disk.largest} bytes past {SEGMENT}"
    assert spool.stats().bytes == segment_bytes_on(disk) <= CAP
    check_exact(spool, sent)
    spool.close()
    again = Spool.open(config(), files=disk)
    assert read_all(again) == read_all(spool), "the restart changed what is spooled"
    again.close()


def test_a_group_commit_of_many_appends_keeps_the_segment_files_within_the_cap() -> None:
    disk = MeasuredDisk()
    spool = Spool.open(config(commit_delay=0.05), files=disk)
    sent: dict[int, bytes] = {}
    lock = threading.Lock()
    done = threading.Semaphore(0)
    # ~60 KiB each; queued together up to half the cap (then busy), so the
    # writer takes them as one group or a few; those refused are sent again.
    waiting = [[event(1000 * b + k) for k in range(190)] for b in range(24)]
    refused: list[list[bytes]] = []

    def on_done(batch: list[bytes]) -> Callable[[range | BaseException], None]:
        def callback(result: range | BaseException) -> None:
            with lock:
                if isinstance(result, range):
                    sent.update(zip(result, batch, strict=True))
                else:
                    assert isinstance(result, SpoolFullError), result
                    refused.append(batch)
            done.release()

        return callback

    for _ in range(200):
        if not waiting:
            break
        submitted = 0
        for batch in waiting:
            try:
                spool.submit(batch, on_done(batch))
                submitted += 1
            except SpoolBusyError:
                refused.append(batch)
        for _ in range(submitted):
            assert done.acquire(timeout=30)
        waiting, refused = refused, []
    assert not waiting, "appends were refused again and again"
    # Every acknowledged record is kept or counted, none dropped by its own group.
    assert disk.peak <= CAP, f"{disk.peak} bytes on disk past a cap of {CAP}"
    assert disk.largest <= SEGMENT
    check_exact(spool, sent)
    spool.close()


def test_the_small_flash_settings_hold_their_cap_with_requests_bigger_than_it() -> None:
    # The README's small-flash settings: RecordBatch calls of 5,000 events
    # fit under the cap (and are kept whole); one of 10,000 is refused.
    mib = 1 << 20
    disk = MeasuredDisk()
    cfg = config(
        segment_bytes=mib, max_bytes=2 * mib, max_record_bytes=mib, max_pending_bytes=64 * mib
    )
    spool = Spool.open(cfg, files=disk)
    sent: dict[int, bytes] = {}
    for b in range(6):
        batch = [event(10_000 * b + k, 320) for k in range(5_000)]  # ~1.7 MB a call
        indexes = spool.append_sync(batch)
        assert read_all(spool, indexes.start - 1) == dict(zip(indexes, batch, strict=True))
        sent.update(zip(indexes, batch, strict=True))
    with pytest.raises(SpoolFullError, match="--spool-max-bytes"):
        spool.append_sync([event(90_000 + k, 320) for k in range(10_000)])  # ~3.3 MB
    assert disk.peak <= 2 * mib, f"{disk.peak} bytes on disk past a cap of {2 * mib}"
    assert disk.largest <= mib
    check_exact(spool, sent)
    spool.close()


def test_pinned_segments_count_against_the_cap_and_are_the_only_overshoot() -> None:
    disk = MeasuredDisk()
    spool = Spool.open(config(), files=disk)
    sent: dict[int, bytes] = {}
    batch = [event(k) for k in range(500)]  # ~160 KiB: three segments, the batch in flight
    sent.update(zip(spool.append_sync(batch), batch, strict=True))
    spool.pin((1, 500))
    for b in range(1, 60):  # ~48 KiB each: they fit beside the pinned segments
        batch = [event(1000 * b + k) for k in range(150)]
        sent.update(zip(spool.append_sync(batch), batch, strict=True))
    with spool._lock:  # the segments holding the pinned records
        pinned = sum(s.size for s in spool._segments if s.first <= 500)
    assert disk.peak <= max(CAP, pinned + SEGMENT), f"{disk.peak} bytes: {pinned} pinned"
    check_exact(spool, sent, held=range(1, 501))
    spool.close()


def test_past_a_cap_that_pinned_segments_fill_appends_go_on_and_only_the_active_one_is_added() -> (
    None
):
    # The shipper holds more than the cap (its batch in flight and the next
    # one): nothing pinned is dropped, appends of up to a segment are still
    # accepted (the newest kept), every other segment goes; a bigger one is
    # refused until the pin goes (the cap would have to drop part of it).
    disk = MeasuredDisk()
    spool = Spool.open(config(), files=disk)
    sent: dict[int, bytes] = {}
    for b in range(12):  # the pin grows as the shipper reads what is spooled
        batch = [event(1000 * b + k) for k in range(100)]
        sent.update(zip(spool.append_sync(batch), batch, strict=True))
        spool.pin((1, max(sent)))
    last_pinned = max(sent)
    for b in range(12, 80):
        batch = [event(1000 * b + k) for k in range(100)]  # ~32 KiB
        sent.update(zip(spool.append_sync(batch), batch, strict=True))
    bigger = [event(500_000 + k) for k in range(300)]  # ~95 KiB: more than a segment
    with pytest.raises(SpoolFullError, match="--spool-max-bytes"):
        spool.append_sync(bigger)
    with spool._lock:
        pinned = sum(s.size for s in spool._segments if s.first <= last_pinned)
    assert pinned > CAP
    assert disk.peak <= max(CAP, pinned + SEGMENT)
    assert spool.stats().bytes <= pinned + SEGMENT
    check_exact(spool, sent, held=range(1, last_pinned + 1))
    spool.pin(None)  # delivered and released: the next append brings it under the cap
    sent.update(zip(spool.append_sync(bigger), bigger, strict=True))
    assert spool.stats().bytes <= CAP
    spool.close()


def test_an_open_pin_keeps_what_reads_returned_and_not_what_is_written_after() -> None:
    # The shipper pins (mark + 1, open end) while a read is under way, then
    # narrows it to what the read returned: until then the open pin keeps
    # every record the read could return, and nothing written later.
    disk = MeasuredDisk()
    spool = Spool.open(config(), files=disk)
    sent: dict[int, bytes] = {}
    batch = [event(k) for k in range(400)]
    sent.update(zip(spool.append_sync(batch), batch, strict=True))
    spool.pin((1, 2**62))
    got = spool.read(0, max_records=1 << 30, max_bytes=100 * KIB)
    returned = {r.index: r.payload for r in got}
    for b in range(1, 30):  # written while the pin is still open
        batch = [event(1000 * b + k) for k in range(300)]
        sent.update(zip(spool.append_sync(batch), batch, strict=True))
    with spool._lock:
        pinned = sum(s.size for s in spool._segments if s.first <= max(returned))
    assert disk.peak <= max(CAP, pinned + SEGMENT), "an open pin kept later records"
    check_exact(spool, sent, held=returned)
    spool.close()


def test_an_append_split_across_segments_that_fails_keeps_every_acknowledged_record() -> None:
    disk = MemoryFileLayer()
    spool = Spool.open(config(max_bytes=1 << 22), files=disk)
    acked: dict[int, bytes] = {}
    batch = [event(k) for k in range(100)]
    acked.update(zip(spool.append_sync(batch), batch, strict=True))
    disk.capacity = disk.used_bytes() + SEGMENT + SEGMENT // 2  # room for part of the next one
    big = [event(1000 + k) for k in range(600)]  # ~190 KiB: three segments
    with pytest.raises(SpoolFullError):
        spool.append_sync(big)
    kept = read_all(spool)
    assert all(kept[i] == p for i, p in acked.items()), "an acknowledged record was lost"
    # Its fsynced first parts stay spooled (at least once: a retry may duplicate them).
    extra = sorted(set(kept) - set(acked))
    assert extra, "the append failed before its first part was written"
    assert extra == list(range(101, 101 + len(extra)))
    assert len(extra) < len(big)
    assert all(kept[i] == big[i - 101] for i in extra)
    disk.capacity = None
    more = spool.append_sync([b"after"])
    assert more.start == max(kept) + 1
    spool.close()
    again = Spool.open(config(max_bytes=1 << 22), files=disk)
    assert read_all(again) == {**kept, more.start: b"after"}
    again.close()


def test_a_cap_under_two_segments_is_refused_at_startup() -> None:
    with pytest.raises(ConfigError, match="at least two segments"):
        SpoolConfig(directory=DIR, segment_bytes=1 << 20, max_bytes=(2 << 20) - 1)
    SpoolConfig(directory=DIR, segment_bytes=1 << 20, max_bytes=2 << 20)


def test_a_record_larger_than_a_segment_fills_one_segment_alone() -> None:
    disk = MeasuredDisk()
    spool = Spool.open(
        config(segment_bytes=4 * KIB, max_bytes=64 * KIB, max_record_bytes=16 * KIB), files=disk
    )
    big = b"x" * (10 * KIB)
    indexes = spool.append_sync([b"a", big, b"b"])
    assert read_all(spool) == dict(zip(indexes, [b"a", big, b"b"], strict=True))
    assert disk.largest == HEADER_SIZE + len(big)
    assert spool.stats().segments == 3
    spool.close()

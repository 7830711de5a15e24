"""The shipper against an in-test collector: order, idempotence, chain, retries, quarantine.

RELIABILITY rows 3, 4, 5, 7 (the sidecar's side), 24 (offline for days, with
a fake clock), 25 (the device clock jumping back) and 26 (poison batch, T1);
an outage answering 500, an ingress limit (413) and a reused seq (409) lose
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import pytest

from predtrace.sidecar import _ship_attempts
from predtrace.sidecar._batch import encode_event
from predtrace.sidecar._config import ShipperConfig
from predtrace.sidecar._shipper import Renumber, Shipper
from predtrace.sidecar._shipstate import ShipState
from predtrace.sidecar.pipeline import (
    CollectorClient,
    CollectorClientConfig,
    RetryableExportError,
    RetryPolicy,
)
from predtrace.sidecar.spool import FaultPoints, MemoryFileLayer, SimulatedCrash, Spool, SpoolConfig
from predtrace.sidecar.testing import FakeClock
from predtrace.wire import IngestAck, PredictionEvent, decode_batch
from tests.reliability.sidecar.fake_collector import SEQ_REUSED, Answer, FakeCollector
from tests.reliability.sidecar.polling import eventually

DIR = "/spool"


def _seqs(names: list[str]) -> list[int]:
    """The batch seqs of quarantine file names (``<time ns>-<seq>.msgpack``)."""
    return [int(name.removesuffix(".msgpack").rsplit("-", 1)[1]) for name in names]


def _quarantined(rig: Rig, seq: int) -> str:
    """The path of the quarantined batch ``seq``."""
    (name,) = [n for n in rig.disk.listdir(f"{DIR}/quarantine") if _seqs([n]) == [seq]]
    return f"{DIR}/quarantine/{name}"


def spool_config(**kw: object) -> SpoolConfig:
    values: dict[str, object] = {
        "directory": DIR,
        "segment_bytes": 1 << 16,
        "max_bytes": 1 << 22,
        "max_record_bytes": 1024,
    }
    values.update(kw)
    return SpoolConfig(**values)  # type: ignore[arg-type]


def events(n: int, start: int = 0) -> list[PredictionEvent]:
    return [PredictionEvent(prediction_id=f"p{i:06d}") for i in range(start, start + n)]


@dataclass
class Rig:
    """A spool on a memory disk, a shipper and the fake collector."""

    collector: FakeCollector
    disk: MemoryFileLayer = field(default_factory=MemoryFileLayer)
    clock: FakeClock = field(default_factory=FakeClock)
    sleeps: list[float] = field(default_factory=list)
    spool: Spool | None = None
    shipper: Shipper | None = None
    task: asyncio.Task[None] | None = None
    client: CollectorClient | None = None

    async def fake_sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)

    async def start(
        self,
        config: ShipperConfig | None = None,
        *,
        sender: object = None,
        faults: FaultPoints | None = None,
        spool: SpoolConfig | None = None,
        fresh_numbering: bool = False,
        renumber: Renumber | None = None,
    ) -> Shipper:
        self.spool = Spool.open(spool or spool_config(), files=self.disk, faults=faults)
        self.client = CollectorClient(CollectorClientConfig(url=self.collector.url, timeout=2))
        self.shipper = Shipper(
            self.spool,
            sender or self.client,  # type: ignore[arg-type]
            config or ShipperConfig(linger=0, max_batch_events=50),
            "edge-1",
            files=self.disk,
            clock=self.clock,
            sleep=self.fake_sleep,
            faults=faults,
            seed=7,
            fresh_numbering=fresh_numbering,
            renumber=renumber,
        )
        self.task = asyncio.create_task(self.shipper.run())
        return self.shipper

    async def record(self, batch: list[PredictionEvent]) -> None:
        assert self.spool is not None
        await self.spool.append([encode_event(e) for e in batch])

    async def wait_delivered(self, n: int, within: float = 10.0) -> None:
        await eventually(
            lambda: len({e.prediction_id for e in self.collector.events()}) >= n, within
        )

    async def wait_requests(self, n: int) -> None:
        await eventually(lambda: self.collector.requests >= n)

    async def stop(self) -> None:
        if self.shipper is not None and self.task is not None:
            await self.shipper.stop()
            with contextlib.suppress(SimulatedCrash):  # a test crashed it on purpose
                await self.task
        if self.client is not None:
            await self.client.close()
        if self.spool is not None:
            self.spool.close()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    collector = FakeCollector()
    await collector.start()
    r = Rig(collector)
    yield r
    await r.stop()
    await collector.stop()


async def test_events_arrive_in_order_in_chained_batches_with_contiguous_seqs(rig: Rig) -> None:
    await rig.start()
    for start in range(0, 230, 23):
        await rig.record(events(23, start))
    await rig.wait_delivered(230)
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(230)]
    seqs = sorted(s for _, s in rig.collector.stored)
    assert seqs == list(range(1, len(seqs) + 1))
    assert rig.collector.chain_ok("edge-1")
    assert rig.collector.stored[("edge-1", 1)].batch.prev_digest == b""


async def test_a_restart_continues_the_seq_and_the_chain(rig: Rig) -> None:
    await rig.start()
    await rig.record(events(60))
    await rig.wait_delivered(60)
    await rig.stop()
    await rig.start()
    await rig.record(events(60, 60))
    await rig.wait_delivered(120)
    seqs = sorted(s for _, s in rig.collector.stored)
    assert seqs == list(range(1, len(seqs) + 1))
    assert rig.collector.chain_ok("edge-1")
    assert rig.collector.duplicates == 0


async def test_retry_after_is_honoured_and_nothing_is_dropped(rig: Rig) -> None:
    rig.collector.script = [Answer(503, "7"), Answer(429, "3"), Answer(502), Answer(504)]
    shipper = await rig.start()
    await rig.record(events(10))
    await rig.wait_delivered(10)
    assert rig.sleeps[0] >= 7 and rig.sleeps[1] >= 3
    assert shipper.counters.retried == 4
    assert shipper.counters.dropped == {}
    assert len(rig.collector.stored) == 1


async def test_a_refused_token_keeps_every_batch_until_the_token_is_fixed(rig: Rig) -> None:
    rig.collector.script = [Answer(403)] * 6 + [Answer(401)] * 6
    shipper = await rig.start(ShipperConfig(linger=0, max_batch_events=5, poison_attempts=3))
    await rig.record(events(10))
    await rig.wait_delivered(10)
    assert shipper.counters.quarantined == 0
    assert shipper.counters.dropped == {}
    assert shipper.counters.retried == 12
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(10)]


@pytest.mark.parametrize("status", [400, 409])  # a 409 that is not about a reused seq
async def test_a_permanently_refused_batch_is_quarantined_once_and_later_data_flows(
    rig: Rig, status: int
) -> None:
    rig.collector.fail_when = lambda d: (
        status if d.batch.events[0].prediction_id == "p000000" else None
    )
    shipper = await rig.start()
    await rig.record(events(5))
    await rig.wait_requests(1)
    await rig.record(events(5, 5))
    await rig.wait_delivered(5)
    assert rig.collector.requests == 2, "a permanent refusal is not retried"
    assert shipper.counters.quarantined == 1
    assert shipper.counters.dropped == {"quarantined": 5}
    assert _seqs(rig.disk.listdir(f"{DIR}/quarantine")) == [1]


async def test_partial_success_counts_the_rejected_and_does_not_retry(rig: Rig) -> None:
    rig.collector.reject_ids = {"p000003", "p000004"}
    shipper = await rig.start()
    await rig.record(events(10))
    await rig.wait_delivered(10)
    await asyncio.sleep(0.05)
    assert rig.collector.requests == 1
    assert shipper.counters.exported == 8
    assert shipper.counters.dropped == {"rejected": 2}


async def test_a_batch_failing_with_500_is_quarantined_after_n_attempts(rig: Rig) -> None:
    rig.collector.fail_when = lambda d: (
        500 if d.batch.events[0].prediction_id == "p000000" else None
    )
    shipper = await rig.start(ShipperConfig(linger=0, max_batch_events=5, poison_attempts=3))
    await rig.record(events(5))
    await rig.wait_requests(1)
    await rig.record(events(5, 5))
    await rig.wait_delivered(5)
    assert shipper.counters.quarantined == 1
    assert rig.collector.requests == 4  # three failures of the poison batch, then the next


async def test_a_lost_ack_makes_the_retry_a_duplicate_that_the_collector_stores_once(
    rig: Rig,
) -> None:
    class LoseFirstAck:
        def __init__(self, inner: CollectorClient) -> None:
            self.inner, self.lost = inner, False

        async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
            ack = await self.inner.send(body, compressed=compressed)
            if not self.lost:
                self.lost = True
                raise RetryableExportError("connection reset after commit")
            return ack

        async def close(self) -> None:
            await self.inner.close()

    client = CollectorClient(CollectorClientConfig(url=rig.collector.url))
    shipper = await rig.start(sender=LoseFirstAck(client))
    await rig.record(events(10))
    await rig.wait_delivered(10)
    await asyncio.sleep(0.05)
    assert rig.collector.duplicates == 1
    assert len(rig.collector.stored) == 1
    assert shipper.counters.duplicates == 1
    await client.close()


async def test_a_crash_after_the_ack_resends_identical_bytes(rig: Rig) -> None:
    faults = FaultPoints()
    faults.arm("shipper.after_ack")
    await rig.start(faults=faults)
    await rig.record(events(10))
    assert rig.task is not None
    with pytest.raises(SimulatedCrash):
        await asyncio.wait_for(rig.task, 5)
    first = rig.collector.stored[("edge-1", 1)].digest
    rig.shipper = None
    rig.spool.close()  # type: ignore[union-attr]
    rig.disk.crash()
    await rig.client.close()  # type: ignore[union-attr]
    await rig.start()
    await rig.record(events(5, 10))
    await rig.wait_delivered(15)
    assert rig.collector.duplicates == 1
    assert rig.collector.stored[("edge-1", 1)].digest == first
    assert rig.collector.chain_ok("edge-1")


async def test_a_batch_that_kills_the_sidecar_on_every_start_is_quarantined(rig: Rig) -> None:
    config = ShipperConfig(linger=0, max_batch_events=50, poison_attempts=3)
    for attempt in range(4):
        faults = FaultPoints()
        if attempt < 3:
            faults.arm("shipper.before_send")
        await rig.start(config, faults=faults)
        if attempt == 0:
            await rig.record(events(7))
        if attempt < 3:
            with pytest.raises(SimulatedCrash):
                await asyncio.wait_for(rig.task, 5)  # type: ignore[arg-type]
            rig.shipper = None
            await rig.stop()
    shipper = rig.shipper
    assert shipper is not None
    await rig.record(events(3, 100))
    await rig.wait_delivered(3)
    assert shipper.counters.quarantined == 1
    assert {e.prediction_id for e in rig.collector.events()} == {"p000100", "p000101", "p000102"}
    # The quarantine file is the only copy of the poison batch: it must hold it.
    path = _quarantined(rig, 1)
    kept = decode_batch(rig.disk.read(path, 0, rig.disk.size(path)))
    assert kept.batch.seq == 1
    assert [e.prediction_id for e in kept.batch.events] == [f"p{i:06d}" for i in range(7)]


async def test_row14_a_full_disk_under_the_spool_state_pauses_the_shipper_never_kills_it(
    rig: Rig,
) -> None:
    shipper = await rig.start(ShipperConfig(linger=0, max_batch_events=5))
    await rig.record(events(3))
    await rig.wait_delivered(3)
    await rig.record(events(7, 10))  # spooled; planning them needs a state write
    rig.disk.capacity = rig.disk.used_bytes()
    await eventually(lambda: "spool I/O failed" in shipper.counters.last_error)
    assert rig.task is not None and not rig.task.done(), "the shipper died on ENOSPC"
    rig.disk.capacity = None  # space returns
    await rig.record(events(2, 50))
    await rig.wait_delivered(12)
    got = [e.prediction_id for e in rig.collector.events()]
    assert sorted(set(got)) == sorted(f"p{i:06d}" for i in [0, 1, 2, *range(10, 17), 50, 51])
    assert rig.collector.chain_ok("edge-1")
    assert shipper.counters.dropped == {}


class _NoRoomForQuarantine(MemoryFileLayer):
    """A disk that is full for quarantine files only, until ``full`` is cleared."""

    full = True

    def open(self, path: str, *, create: bool) -> int:
        if self.full and "/quarantine/" in path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().open(path, create=create)


async def test_row14_a_quarantine_file_that_cannot_be_written_keeps_the_batch(rig: Rig) -> None:
    rig.disk = _NoRoomForQuarantine()
    rig.collector.fail_when = lambda d: (
        400 if d.batch.events[0].prediction_id == "p000000" else None
    )
    shipper = await rig.start(ShipperConfig(linger=0, max_batch_events=5))
    await rig.record(events(5))
    await eventually(lambda: "spool I/O failed" in shipper.counters.last_error)
    assert shipper.counters.quarantined == 0  # not counted, not released: still spooled
    rig.disk.full = False  # type: ignore[attr-defined]
    await eventually(lambda: shipper.counters.quarantined == 1)
    path = _quarantined(rig, 1)
    kept = decode_batch(rig.disk.read(path, 0, rig.disk.size(path)))
    assert [e.prediction_id for e in kept.batch.events] == [f"p{i:06d}" for i in range(5)]
    await rig.record(events(3, 10))
    await rig.wait_delivered(3)


class _Offline:
    """A link that is down for ``attempts`` sends, then the real client."""

    def __init__(self, inner: CollectorClient, attempts: int) -> None:
        self.inner, self.left = inner, attempts

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        if self.left > 0:
            self.left -= 1
            raise RetryableExportError("collector unreachable: ClientConnectorError")
        return await self.inner.send(body, compressed=compressed)

    async def close(self) -> None:
        await self.inner.close()


async def test_days_offline_drop_nothing_for_elapsed_time_and_backoff_stays_capped(
    rig: Rig,
) -> None:
    client = CollectorClient(CollectorClientConfig(url=rig.collector.url))
    config = ShipperConfig.edge(linger=0)
    shipper = await rig.start(config, sender=_Offline(client, attempts=3000))
    for start in range(0, 500, 50):
        await rig.record(events(50, start))
    await rig.wait_delivered(500, within=30)
    offline_seconds = sum(rig.sleeps)
    assert offline_seconds > 3 * 86400, "the outage should span days of fake time"
    assert max(rig.sleeps) <= config.retry.max_backoff
    assert shipper.counters.dropped == {}
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(500)]
    await client.close()


async def test_offline_with_a_small_spool_only_the_byte_cap_drops_and_it_counts_exactly(
    rig: Rig,
) -> None:
    client = CollectorClient(CollectorClientConfig(url=rig.collector.url))
    sender = _Offline(client, attempts=10**9)
    spool = spool_config(segment_bytes=4096, max_bytes=4 * 4096)
    shipper = await rig.start(ShipperConfig.edge(linger=0), sender=sender, spool=spool)
    for start in range(0, 2000, 20):
        await rig.record(events(20, start))
    sender.left = 0  # the link returns
    assert rig.spool is not None
    dropped = rig.spool.counters.dropped["byte_cap"]
    assert dropped > 0
    await rig.wait_delivered(2000 - dropped, within=30)
    got = [e.prediction_id for e in rig.collector.events()]
    assert len(got) == 2000 - dropped
    assert got[-1] == "p001999", "the newest events are kept"
    assert shipper.counters.dropped == {}
    await client.close()


async def test_a_device_clock_that_jumps_back_changes_neither_order_nor_seq(rig: Rig) -> None:
    shipper = await rig.start()
    await rig.record(events(20))
    await rig.wait_delivered(20)
    rig.clock.now -= 10 * 86400  # the wall clock jumps ten days back
    rig.clock.wall_offset_ns -= 10 * 86400 * 10**9
    await rig.record(events(20, 20))
    await rig.wait_delivered(40)
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(40)]
    seqs = sorted(s for _, s in rig.collector.stored)
    assert seqs == list(range(1, len(seqs) + 1))
    assert shipper.counters.duplicates == 0


async def test_stop_with_a_drain_deadline_ships_what_it_can_and_keeps_the_rest(rig: Rig) -> None:
    rig.collector.script = [Answer(503)] * 1000
    shipper = await rig.start()
    await rig.record(events(30))
    await shipper.stop(drain_timeout=0.2)
    assert rig.task is not None
    await asyncio.wait_for(rig.task, 5)
    assert rig.spool is not None and rig.spool.stats().records == 30


# -- batching by time (linger) and by size ----------------------------------------------


def padded(n: int, start: int = 0) -> list[PredictionEvent]:
    """Events of one identical encoded size (about 220 bytes each)."""
    return [
        PredictionEvent(prediction_id=f"p{i:06d}", attributes={"pad": "x" * 200})
        for i in range(start, start + n)
    ]


def batch_sizes(collector: FakeCollector) -> list[int]:
    """Events per stored batch, in seq order."""
    return [len(collector.stored[key].batch.events) for key in sorted(collector.stored)]


async def test_linger_holds_a_small_backlog_then_sends_it_as_one_batch(rig: Rig) -> None:
    # The linger waits on the event loop's clock (it takes neither the injected
    # clock nor the injected sleep), so this test runs on wall time: the linger
    # is long enough that the second append lands well inside it.
    linger = 3.0  # long enough that a loaded machine still sends the 2nd append within it
    shipper = await rig.start(ShipperConfig(linger=linger, max_batch_events=50))
    loop = asyncio.get_running_loop()
    await rig.record(events(3))
    spooled_at = loop.time()
    # The shipper has read them (or, with linger broken, already sent them).
    await eventually(lambda: shipper.oldest_unsent_ns != 0 or rig.collector.requests > 0)
    await rig.record(events(4, 3))
    assert loop.time() < spooled_at + linger, "the test stalled for the whole linger"
    assert rig.collector.requests == 0, "a small backlog was sent before the linger ran out"
    await rig.wait_delivered(7)
    assert loop.time() - spooled_at >= linger - 0.05, "sent before the linger ran out"
    assert batch_sizes(rig.collector) == [7], "the backlog was not sent as one batch"
    assert rig.collector.requests == 1
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(7)]
    assert rig.sleeps == [], "no retry backoff was involved"


@pytest.mark.parametrize("limit", ["events", "bytes", "bytes between events"])
async def test_a_full_batch_goes_at_once_and_only_the_remainder_lingers(
    rig: Rig, limit: str
) -> None:
    size = len(encode_event(padded(1)[0]))
    if limit == "events":
        config = ShipperConfig(linger=60, max_batch_events=10)
    elif limit == "bytes":
        config = ShipperConfig(linger=60, max_batch_events=1000, max_batch_bytes=10 * size)
    else:  # room for 10.5 events: the 11th does not fit, so the batch of 10 is full
        cap = 10 * size + size // 2
        config = ShipperConfig(linger=60, max_batch_events=1000, max_batch_bytes=cap)
    await rig.start(config)
    await rig.record(padded(25))  # one append: two full batches and five events over
    await rig.wait_delivered(20, within=30)  # a lingering full batch would take 60 s each
    assert batch_sizes(rig.collector) == [10, 10]
    # The remaining five are not a full batch: they wait out the 60 s linger,
    # with what was delivered already marked in the spool (its depth is 5).
    await eventually(lambda: rig.spool.stats().records == 5)
    assert rig.collector.requests == 2
    assert len(rig.collector.events()) == 20


async def test_max_batch_events_splits_a_backlog_into_batches_of_at_most_that_many(
    rig: Rig,
) -> None:
    await rig.start(ShipperConfig(linger=0, max_batch_events=7))
    await rig.record(events(30))
    await rig.wait_delivered(30)
    assert batch_sizes(rig.collector) == [7, 7, 7, 7, 2]
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(30)]
    assert rig.collector.chain_ok("edge-1")


async def test_max_batch_bytes_splits_a_backlog_into_batches_of_at_most_that_many_bytes(
    rig: Rig,
) -> None:
    size = len(encode_event(padded(1)[0]))
    assert size * 5 >= 1024  # the smallest max_batch_bytes allowed
    await rig.start(ShipperConfig(linger=0, max_batch_events=1000, max_batch_bytes=5 * size))
    await rig.record(padded(23))
    await rig.wait_delivered(23)
    assert batch_sizes(rig.collector) == [5, 5, 5, 5, 3]
    for key in sorted(rig.collector.stored):
        stored = rig.collector.stored[key].batch.events
        assert sum(len(encode_event(e)) for e in stored) <= 5 * size
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(23)]


async def test_batches_take_at_most_a_quarter_of_a_small_spool_cap(rig: Rig) -> None:
    # The batch in flight and the one read ahead are pinned, out of the cap's
    # reach: with a 16 KiB cap they hold 4 KiB each, not the configured 1 MiB.
    size = len(encode_event(padded(1)[0]))
    spool = spool_config(segment_bytes=4096, max_bytes=16384)
    config = ShipperConfig(linger=0, max_batch_events=1000, max_batch_bytes=1 << 20)
    shipper = await rig.start(config, spool=spool)
    assert shipper.counters.max_batch_bytes == 4096
    await rig.record(padded(40))
    await rig.wait_delivered(40)
    assert max(batch_sizes(rig.collector)) <= 4096 // size
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(40)]


async def test_a_byte_limit_between_event_boundaries_is_never_exceeded(rig: Rig) -> None:
    size = len(encode_event(padded(1)[0]))
    max_bytes = 5 * size + size // 2  # room for five and a half events
    await rig.start(ShipperConfig(linger=0, max_batch_events=1000, max_batch_bytes=max_bytes))
    await rig.record(padded(23))
    await rig.wait_delivered(23)
    for key in sorted(rig.collector.stored):
        stored = rig.collector.stored[key].batch.events
        assert sum(len(encode_event(e)) for e in stored) <= max_bytes, batch_sizes(rig.collector)


class HangingSender:
    """A collector that takes the request and never answers."""

    def __init__(self) -> None:
        self.sending = asyncio.Event()

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        self.sending.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        return None


async def test_a_send_cancelled_at_the_drain_deadline_never_counts_toward_poison(
    rig: Rig,
) -> None:
    # What SidecarApp.stop does at SIGTERM, on seven starts in a row: drain
    # for 0.1 s, then cancel the send still in flight. Stops are not crashes:
    # the batch must never be quarantined as poison (poison_attempts is 5).
    first = Spool.open(spool_config(), files=rig.disk)
    await first.append([encode_event(e) for e in events(10)])
    first.close()
    config = ShipperConfig(linger=0, poison_attempts=5)
    for _ in range(7):
        spool = Spool.open(spool_config(), files=rig.disk)
        sender = HangingSender()
        shipper = Shipper(spool, sender, config, "edge-1", files=rig.disk, seed=1)
        task = asyncio.create_task(shipper.run())
        await asyncio.wait_for(sender.sending.wait(), 10)
        await shipper.stop(0.1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(task, 0.5)
        assert task.done()
        assert shipper.counters.quarantined == 0
        assert spool.stats().records == 10
        spool.close()


async def test_a_backlog_of_mixed_sizes_goes_without_waiting_out_the_linger(rig: Rig) -> None:
    # Each batch stops before a record much bigger than the rest: still a
    # full batch while more is spooled, so no 60 s linger between them.
    mixed = []
    for i in range(60):
        pad = 900 if i % 6 == 5 else 10
        mixed.append(PredictionEvent(prediction_id=f"p{i:06d}", attributes={"pad": "x" * pad}))
    await rig.start(ShipperConfig(linger=60, max_batch_events=1000, max_batch_bytes=1024))
    await rig.record(mixed)
    # Only the spool's last few events may wait (nothing follows them); a
    # linger per batch would take minutes.
    await rig.wait_delivered(54, within=30)
    delivered = [e.prediction_id for e in rig.collector.events()]
    assert delivered == [f"p{i:06d}" for i in range(len(delivered))]
    for key in rig.collector.stored:
        assert sum(len(encode_event(e)) for e in rig.collector.stored[key].batch.events) <= 1024


# -- answers that are not about the batch (finding: endpoint errors, captive portals) ----


class _Answers:
    """The real client, after ``answers`` canned collector answers classified by it."""

    def __init__(self, inner: CollectorClient, answers: list[tuple[int, bytes]]) -> None:
        self.inner, self.answers = inner, answers

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        if self.answers:
            status, content = self.answers.pop(0)
            return self.inner._classify(status, {"Location": "http://portal/login"}, content)
        return await self.inner.send(body, compressed=compressed)

    async def close(self) -> None:
        await self.inner.close()


async def test_endpoint_errors_and_non_acks_keep_every_batch_and_name_the_cause(
    rig: Rig,
) -> None:
    # A wrong path prefix (404), a method refused (405), redirects (a proxy,
    # a captive portal) and a 2xx page that is no acknowledgement say nothing
    # about the batch: never quarantined, however often (poison_attempts=2).
    client = CollectorClient(CollectorClientConfig(url=rig.collector.url))
    html = b"<html>log in to the wifi</html>"
    answers = [(404, b"Not Found"), (405, b""), (302, b""), (308, b""), (200, html), (200, b"")]
    sender = _Answers(client, answers * 3)
    errors: list[str] = []
    shipper = await rig.start(ShipperConfig(linger=0, poison_attempts=2), sender=sender)
    original = shipper._note_retry

    def note(exc: RetryableExportError) -> None:
        original(exc)
        errors.append(shipper.counters.last_error)

    shipper._note_retry = note  # type: ignore[method-assign]
    await rig.record(events(10))
    await rig.wait_delivered(10)
    assert shipper.counters.quarantined == 0
    assert shipper.counters.dropped == {}
    assert shipper.counters.retried == 18
    assert "404" in errors[0] and "not an ingest endpoint" in errors[0]
    assert "302 to http://portal/login" in errors[2]
    assert "unreadable ack" in errors[4]
    await client.close()


async def test_a_404_from_a_wrong_url_prefix_is_retried_with_the_reason_in_last_error(
    rig: Rig,
) -> None:
    rig.collector.script = [Answer(404)] * 10_000  # until the operator fixes the URL
    shipper = await rig.start(ShipperConfig(linger=0, poison_attempts=3))
    await rig.record(events(5))
    await eventually(lambda: shipper.counters.retried >= 4)
    assert "404" in shipper.counters.last_error
    assert "not an ingest endpoint" in shipper.counters.last_error
    rig.collector.script.clear()
    await rig.wait_delivered(5)
    assert shipper.counters.quarantined == 0


async def test_a_quarantined_batch_says_so_in_last_error(rig: Rig) -> None:
    rig.collector.fail_when = lambda d: 400
    shipper = await rig.start()
    await rig.record(events(5))
    await eventually(lambda: shipper.counters.quarantined == 1)
    assert shipper.counters.last_error.startswith("batch seq 1 (5 events) quarantined:")
    assert "400" in shipper.counters.last_error


def _quarantine_files(rig: Rig) -> dict[str, int]:
    directory = f"{DIR}/quarantine"
    return {name: rig.disk.size(f"{directory}/{name}") for name in rig.disk.listdir(directory)}


async def test_quarantine_has_its_own_byte_cap_oldest_removed_and_counted(rig: Rig) -> None:
    rig.collector.fail_when = lambda d: 400
    config = ShipperConfig(linger=0, max_batch_events=5, quarantine_max_bytes=1000)
    shipper = await rig.start(config)
    for start in range(0, 60, 5):  # twelve batches, each refused
        await rig.record(events(5, start))
        await eventually(lambda: shipper.counters.quarantined == start // 5 + 1)  # noqa: B023
    files = _quarantine_files(rig)
    assert 1 < len(files) < 12
    assert sum(files.values()) <= 1000
    assert _seqs(sorted(files)) == list(range(13 - len(files), 13))
    c = shipper.counters
    assert (c.quarantine_bytes, c.quarantine_byte_cap) == (sum(files.values()), 1000)
    assert c.quarantine_evicted == 12 - len(files)
    assert c.dropped == {"quarantined": 60}, "evicted batches were counted when quarantined"
    await rig.stop()
    # A restart counts what is kept, and applies a smaller cap at once.
    smallest = min(files.values())
    shipper = await rig.start(replace(config, quarantine_max_bytes=smallest))
    await eventually(lambda: shipper.counters.quarantine_evicted == len(files) - 1)
    newest = max(files)
    assert _seqs([newest]) == [12]
    assert _quarantine_files(rig) == {newest: files[newest]}
    assert shipper.counters.quarantine_bytes == files[newest]


async def test_the_default_quarantine_cap_is_a_tenth_of_the_spool_cap(rig: Rig) -> None:
    shipper = await rig.start(spool=spool_config(max_bytes=1 << 20))
    assert shipper.counters.quarantine_byte_cap == (1 << 20) // 10


# -- a death while waiting on the network is not the batch's fault -------------------


class StallThenDie:
    """An uplink that takes the request and stalls, until the test kills the sidecar."""

    def __init__(self) -> None:
        self.sending = asyncio.Event()
        self.kill = asyncio.Event()

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        self.sending.set()
        await self.kill.wait()
        raise SimulatedCrash("SIGKILL while the request was on the wire")

    async def close(self) -> None:
        return None


def _persisted_replays(spool: Spool) -> int | None:
    plan = ShipState.decode(spool.meta).plan
    return None if plan is None else plan.replays


async def test_kills_while_the_uplink_stalls_never_quarantine_a_healthy_batch(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_ship_attempts, "ON_THE_WIRE_S", 0.01, raising=False)
    first = Spool.open(spool_config(), files=rig.disk)
    await first.append([encode_event(e) for e in events(10)])
    first.close()
    config = ShipperConfig(linger=0, poison_attempts=3)
    for _ in range(6):  # twice the poison attempts
        spool = Spool.open(spool_config(), files=rig.disk)
        sender = StallThenDie()
        shipper = Shipper(spool, sender, config, "edge-1", files=rig.disk, seed=1)
        task = asyncio.create_task(shipper.run())
        await asyncio.wait_for(sender.sending.wait(), 10)
        # The attempt has been out a moment: that is durable before the kill.
        await eventually(lambda: _persisted_replays(spool) == 0)  # noqa: B023
        sender.kill.set()
        with pytest.raises(SimulatedCrash):
            await asyncio.wait_for(task, 5)
        spool.close()
        rig.disk.crash()  # whatever was not fsynced is gone, as after a power cut
    shipper = await rig.start(config)
    await rig.wait_delivered(10)
    assert shipper.counters.quarantined == 0
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(10)]


async def test_a_prompt_collector_costs_no_extra_state_write_per_batch(rig: Rig) -> None:
    # One plan commit per batch, as before the "out on the wire" mark: that
    # mark is only written for attempts that take ON_THE_WIRE_S or longer.
    shipper = await rig.start(ShipperConfig(linger=0, max_batch_events=5))
    assert rig.spool is not None
    commits: list[int] = []
    original = rig.spool.commit

    def counting(hwm: int, meta: bytes) -> None:
        commits.append(hwm)
        original(hwm, meta)

    rig.spool.commit = counting  # type: ignore[method-assign]
    await rig.record(events(25))
    await rig.wait_delivered(25)
    await eventually(lambda: rig.spool.hwm == 25)  # type: ignore[union-attr]
    assert len(commits) <= 6, commits  # five plans, and the final mark
    assert shipper.counters.batches == 5


# -- the byte cap counts exactly what is never delivered -------------------------------


class GatedSender:
    """The real client, each send held until the test opens ``gate`` (or after ``delay``)."""

    def __init__(self, inner: CollectorClient, delay: float = 0.0) -> None:
        self.inner, self.delay = inner, delay
        self.gate = asyncio.Event()
        self.sending = asyncio.Event()

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        self.sending.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        else:
            await self.gate.wait()
        return await self.inner.send(body, compressed=compressed)

    async def close(self) -> None:
        await self.inner.close()


def _delivered_plus_dropped(rig: Rig) -> tuple[int, int]:
    ids = [e.prediction_id for e in rig.collector.events()]
    assert len(ids) == len(set(ids)), "nothing is delivered twice here"
    assert rig.spool is not None
    return len(ids), rig.spool.counters.dropped["byte_cap"]


async def test_the_prefetched_batch_is_pinned_so_the_cap_never_counts_it_as_dropped(
    rig: Rig,
) -> None:
    client = CollectorClient(CollectorClientConfig(url=rig.collector.url))
    sender = GatedSender(client)
    spool = spool_config(segment_bytes=4096, max_bytes=4 * 4096)
    shipper = await rig.start(
        ShipperConfig(linger=0, max_batch_events=10), sender=sender, spool=spool
    )
    for start in range(0, 40, 10):  # one segment per batch (about 2.3 KiB each)
        await rig.record(padded(10, start))
    await asyncio.wait_for(sender.sending.wait(), 10)  # batch 1 is on the wire, held
    prefetch = shipper._prefetch
    assert prefetch is not None
    await asyncio.wait_for(prefetch, 10)  # batch 2 is read and built
    for start in range(40, 200, 10):  # far past the cap: the oldest segments go
        await rig.record(padded(10, start))
    assert rig.spool is not None and rig.spool.counters.dropped["byte_cap"] > 0
    sender.gate.set()
    await eventually(lambda: rig.spool.stats().records == 0)  # type: ignore[union-attr]
    delivered, dropped = _delivered_plus_dropped(rig)
    assert delivered + dropped == 200, (delivered, dropped)
    assert shipper.counters.dropped == {}
    await client.close()


async def test_at_the_cap_with_a_slow_collector_delivered_plus_dropped_is_what_was_accepted(
    rig: Rig,
) -> None:
    # The delivery oracle's sum under load: every accepted event is either
    # delivered or counted at the cap, never both.
    client = CollectorClient(CollectorClientConfig(url=rig.collector.url))
    sender = GatedSender(client, delay=0.005)
    spool = spool_config(segment_bytes=4096, max_bytes=4 * 4096)
    await rig.start(ShipperConfig(linger=0, max_batch_events=10), sender=sender, spool=spool)
    for start in range(0, 1500, 5):
        await rig.record(padded(5, start))
    await eventually(lambda: rig.spool.stats().records == 0, 30)  # type: ignore[union-attr]
    delivered, dropped = _delivered_plus_dropped(rig)
    assert dropped > 0
    assert delivered + dropped == 1500, (delivered, dropped)
    await client.close()


class _FlakyDisk(MemoryFileLayer):
    """Reads of spool segments fail with EIO ``fail_reads`` times, then work."""

    fail_reads = 0

    def read(self, path: str, offset: int, size: int) -> bytes:
        if self.fail_reads and "/seg-" in path:
            self.fail_reads -= 1
            raise OSError(errno.EIO, "Input/output error")
        return super().read(path, offset, size)


async def test_read_errors_while_resuming_are_not_counted_as_deaths(rig: Rig) -> None:
    # One real death before the send, then two transient EIOs reading the
    # segment on the next start: the resume retried and counted a death each
    # time, and the healthy batch was quarantined as "died 3 times".
    rig.disk = _FlakyDisk()
    config = ShipperConfig(linger=0, max_batch_events=50, poison_attempts=3)
    faults = FaultPoints()
    faults.arm("shipper.before_send")
    await rig.start(config, faults=faults)
    await rig.record(events(7))
    with pytest.raises(SimulatedCrash):
        await asyncio.wait_for(rig.task, 5)  # type: ignore[arg-type]
    rig.shipper = None
    await rig.stop()
    shipper = await rig.start(config)  # the spool is open; the shipper resumes next
    rig.disk.fail_reads = 2
    await rig.wait_delivered(7)
    assert shipper.counters.quarantined == 0, shipper.counters.last_error


async def test_a_quarantined_batch_is_not_overwritten_when_seqs_start_again(rig: Rig) -> None:
    # Quarantine files were named by seq alone: after a numbering restart (a
    # new producer id, seqs from 1) the next poison batch overwrote the old one.
    rig.collector.fail_when = lambda d: 400
    shipper = await rig.start()
    await rig.record(events(3))
    await eventually(lambda: shipper.counters.quarantined == 1)
    await rig.stop()
    rig.clock.advance(1.0)
    shipper = await rig.start(fresh_numbering=True)
    await rig.record(events(4, 10))
    await eventually(lambda: shipper.counters.quarantined == 1)
    files = sorted(_quarantine_files(rig))
    assert _seqs(files) == [1, 1]
    kept = [decode_batch(rig.disk.read(f"{DIR}/quarantine/{n}", 0, 10**6)) for n in files]
    assert [len(k.batch.events) for k in kept] == [3, 4]  # oldest first, both kept


# -- a 500 outage, an ingress limit (413), a reused seq (409): nothing is lost -----------


class RecordingRetry(RetryPolicy):
    """The shipper's retry policy, noting the retry number of each backoff."""

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        RETRIES.append(retry)
        return RetryPolicy.delay(self, retry, retry_after, rng)


RETRIES: list[int] = []


@pytest.fixture
def retries() -> list[int]:
    RETRIES.clear()
    return RETRIES


async def test_a_500_outage_while_the_collector_is_not_ready_keeps_every_batch(
    rig: Rig, retries: list[int]
) -> None:
    # A collector (or a proxy in front of it) answering 500 to everything for
    # a while: each batch was quarantined after poison_attempts 500s, and
    # each new batch started its backoff again from the first step.
    rig.collector.ready = False
    rig.collector.script = [Answer(500)] * 8
    config = ShipperConfig(linger=0, max_batch_events=5, poison_attempts=2, retry=RecordingRetry())
    shipper = await rig.start(config)
    await rig.record(events(15))
    await rig.wait_delivered(15)
    assert shipper.counters.quarantined == 0
    assert shipper.counters.dropped == {}
    assert rig.collector.ready_probes == 8, "each 500 asks whether the collector is ready"
    assert retries == list(range(8)), "one backoff growing over the whole outage"
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(15)]
    assert sorted(s for _, s in rig.collector.stored) == [1, 2, 3]
    assert rig.collector.chain_ok("edge-1")


async def test_a_poison_500_behind_an_ingress_without_readyz_is_quarantined_not_blocking(
    rig: Rig,
) -> None:
    # /readyz not routed (404): readiness unknown, so the 500 counts and the
    # batch goes to quarantine; the events after it are delivered.
    rig.collector.ready = None
    rig.collector.fail_when = lambda d: (
        500 if d.batch.events[0].prediction_id == "p000000" else None
    )
    config = ShipperConfig(linger=0, max_batch_events=5, poison_attempts=2)
    shipper = await rig.start(config)
    await rig.record(events(5))
    await eventually(lambda: shipper.counters.quarantined == 1)
    await rig.record(events(5, start=5))
    await rig.wait_delivered(5)
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(5, 10)]


async def test_the_last_error_says_a_500_is_taken_for_an_outage(rig: Rig) -> None:
    rig.collector.ready = False
    rig.collector.script = [Answer(500)] * 10_000
    shipper = await rig.start(ShipperConfig(linger=0, poison_attempts=1))
    await rig.record(events(3))
    await eventually(lambda: shipper.counters.retried >= 3)
    assert "500" in shipper.counters.last_error
    assert "not ready" in shipper.counters.last_error
    assert shipper.counters.quarantined == 0


async def test_the_backoff_grows_across_batches_and_only_an_ack_resets_it(
    rig: Rig, retries: list[int]
) -> None:
    # A ready collector failing two batches in a row with 500: the poison
    # rule quarantines each (that is its job), but the second batch's first
    # backoff continues the first's instead of starting over.
    failing = {1, 2, 3, 4, 6}
    rig.collector.fail_when = lambda d: 500 if rig.collector.requests in failing else None
    config = ShipperConfig(linger=0, max_batch_events=5, poison_attempts=2, retry=RecordingRetry())
    shipper = await rig.start(config)
    await rig.record(events(15))
    await rig.wait_delivered(5)  # the third batch, at the fifth request
    await rig.record(events(5, 100))
    await rig.wait_delivered(10)
    assert shipper.counters.quarantined == 2
    assert retries == [0, 1, 0], "the second batch continued the backoff; the ack reset it"


def _too_large_for(size: int) -> int:
    """A body limit that holds ten padded events uncompressed, and not eleven."""
    return 10 * size + size // 2


async def test_a_batch_too_large_for_an_ingress_is_split_and_every_event_delivered(
    rig: Rig,
) -> None:
    # An ingress limit in front of the collector: the big batch a backlog
    # makes was quarantined whole on its 413 (acknowledged events lost).
    size = len(encode_event(padded(1)[0]))
    rig.collector.max_body = _too_large_for(size)
    config = ShipperConfig(linger=0, max_batch_events=50, compress=False)
    shipper = await rig.start(config)
    await rig.record(padded(40))  # one append: one batch of 40
    await rig.wait_delivered(40)
    c = shipper.counters
    assert (c.quarantined, c.dropped) == (0, {})
    assert rig.collector.too_large == 2, "40 refused, then 20, then 10 fit"
    assert (c.split, c.max_batch_events) == (2, 10)
    assert batch_sizes(rig.collector) == [10, 10, 10, 10]
    # The refused batch's seq was reused by its first part: no gap, no break.
    assert sorted(s for _, s in rig.collector.stored) == [1, 2, 3, 4]
    assert rig.collector.chain_ok("edge-1")
    assert rig.collector.conflicts == 0
    # The limit learnt holds for later batches: no more refusals.
    await rig.record(padded(30, 40))
    await rig.wait_delivered(70)
    assert rig.collector.too_large == 2
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(70)]
    assert sorted(s for _, s in rig.collector.stored) == list(range(1, 8))


async def test_only_an_event_too_large_on_its_own_is_quarantined(rig: Rig) -> None:
    size = len(encode_event(padded(1)[0]))
    rig.collector.max_body = 3 * size  # two padded events fit, and never the big one
    big = PredictionEvent(prediction_id="p000004", attributes={"pad": "x" * 900})
    shipper = await rig.start(ShipperConfig(linger=0, max_batch_events=50, compress=False))
    await rig.record([*padded(4), big, *padded(4, 5)])
    await rig.wait_delivered(8)
    delivered = [e.prediction_id for e in rig.collector.events()]
    assert delivered == [f"p{i:06d}" for i in range(9) if i != 4]
    assert shipper.counters.quarantined == 1
    assert shipper.counters.dropped == {"quarantined": 1}
    (name,) = rig.disk.listdir(f"{DIR}/quarantine")
    kept = decode_batch(rig.disk.read(f"{DIR}/quarantine/{name}", 0, 1 << 20))
    assert [e.prediction_id for e in kept.batch.events] == ["p000004"]


async def test_a_death_after_a_split_resends_the_part_under_the_same_seq(rig: Rig) -> None:
    # The first part is planned durably, with the refused batch's seq and
    # chain link, before it is sent: a restart rebuilds it byte for byte.
    size = len(encode_event(padded(1)[0]))
    rig.collector.max_body = _too_large_for(size)
    config = ShipperConfig(linger=0, max_batch_events=50, compress=False)
    faults = FaultPoints()
    faults.arm("shipper.before_send", 2)  # the first part's send
    await rig.start(config, faults=faults)
    await rig.record(padded(40))
    with pytest.raises(SimulatedCrash):
        await asyncio.wait_for(rig.task, 5)  # type: ignore[arg-type]
    assert rig.spool is not None
    planned = ShipState.decode(rig.spool.meta).plan
    assert planned is not None and (planned.seq, planned.events) == (1, 20)
    rig.shipper = None
    await rig.stop()
    rig.disk.crash()
    shipper = await rig.start(config)
    await rig.wait_delivered(40)
    assert shipper.counters.quarantined == 0
    assert [e.prediction_id for e in rig.collector.events()] == [f"p{i:06d}" for i in range(40)]
    assert sorted(s for _, s in rig.collector.stored) == list(range(1, 5))
    assert rig.collector.chain_ok("edge-1")
    assert rig.collector.conflicts == 0


async def test_a_fixed_producer_id_on_a_fresh_spool_renumbers_instead_of_quarantining(
    rig: Rig,
) -> None:
    # Same --producer-id, spool gone (an emptyDir, a reflashed device): seqs
    # start at 1 again, the collector refuses each as reused (409), and every
    # batch was quarantined.
    await rig.start()
    await rig.record(events(30))
    await rig.wait_delivered(30)
    await rig.stop()
    rig.disk = MemoryFileLayer()  # a new, empty spool
    seen: list[tuple[str, ShipState]] = []

    def renumber(old: str) -> str:
        assert rig.spool is not None
        seen.append((old, ShipState.decode(rig.spool.meta)))
        return "edge-1-r0a1b2c"

    shipper = await rig.start(renumber=renumber)
    await rig.record(events(20, 100))
    await rig.wait_delivered(50)
    await rig.record(events(20, 200))
    await rig.wait_delivered(70)
    c = shipper.counters
    assert (c.quarantined, c.dropped, c.renumbered) == (0, {}, 1)
    assert rig.collector.conflicts == 1
    assert shipper.producer_id == "edge-1-r0a1b2c"
    # The fresh numbering was durable before the new id was made.
    ((old, state),) = seen
    assert (old, state.next_seq, state.prev_digest, state.plan) == ("edge-1", 1, b"", None)
    new = sorted(s for p, s in rig.collector.stored if p == "edge-1-r0a1b2c")
    assert new == list(range(1, len(new) + 1))
    assert rig.collector.chain_ok("edge-1-r0a1b2c")
    assert rig.collector.stored[("edge-1-r0a1b2c", 1)].batch.prev_digest == b""
    later = [e.prediction_id for e in rig.collector.events() if e.prediction_id >= "p000100"]
    assert later == [f"p{i:06d}" for i in [*range(100, 120), *range(200, 220)]]


async def test_a_second_reused_seq_before_any_ack_quarantines_instead_of_renumbering_again(
    rig: Rig,
) -> None:
    def refuse_first(d: object) -> tuple[int, str] | None:
        batch = d.batch  # type: ignore[attr-defined]
        if batch.events[0].prediction_id != "p000000":
            return None
        return 409, SEQ_REUSED.format(seq=batch.seq, producer=batch.producer_id)

    rig.collector.fail_when = refuse_first
    shipper = await rig.start()  # no renumber callback: a derived id, in memory
    await rig.record(events(3))
    await eventually(lambda: shipper.counters.quarantined == 1)
    assert shipper.counters.renumbered == 1
    assert shipper.producer_id.startswith("edge-1-r")
    await rig.record(events(3, 10))
    await rig.wait_delivered(3)
    assert rig.collector.requests == 3

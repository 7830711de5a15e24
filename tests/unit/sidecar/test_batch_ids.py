"""RecordBatch with a batch id: a sender's retry is answered, not spooled a second time."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from predtrace.middleware import SidecarGrpcExporter
from predtrace.sidecar._recent_batches import BatchIdReusedError, RecentBatches
from predtrace.sidecar.pipeline import OutgoingBatch, RetryableExportError
from predtrace.sidecar.spool import MemoryFileLayer, SpoolConfig
from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import event_from_proto
from tests.reliability.sidecar.polling import eventually

from .conftest import StartSidecar
from .test_grpc_api import proto_events

# -- RecentBatches ----------------------------------------------------------------------


async def test_an_id_seen_before_gets_the_first_result_without_running_again() -> None:
    recent: RecentBatches[int] = RecentBatches(lambda _: 8)
    runs = 0

    async def spool() -> int:
        nonlocal runs
        runs += 1
        return 7

    assert await recent.spool_once(b"b1", b"bytes", spool) == (7, False)
    assert await recent.spool_once(b"b1", b"bytes", spool) == (7, True)
    assert await recent.spool_once(b"b2", b"bytes", spool) == (7, False)
    assert runs == 2 and recent.duplicates == 1


async def test_a_retry_while_the_first_call_spools_waits_for_it_and_its_caller_may_go() -> None:
    recent: RecentBatches[int] = RecentBatches(lambda _: 8)
    release = asyncio.Event()
    runs = 0

    async def slow_spool() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 3

    first = asyncio.ensure_future(recent.spool_once(b"b", b"x", slow_spool))
    await asyncio.sleep(0)
    first.cancel()  # the first caller's deadline passed: the spooling goes on
    retry = asyncio.ensure_future(recent.spool_once(b"b", b"x", slow_spool))
    await asyncio.sleep(0)
    assert not retry.done()
    release.set()
    assert await retry == (3, True)
    assert runs == 1
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_a_failed_spooling_is_forgotten_so_the_retry_spools_afresh() -> None:
    recent: RecentBatches[int] = RecentBatches(lambda _: 8)
    outcomes: list[int | Exception] = [OSError("disk full"), 5]

    async def spool() -> int:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    with pytest.raises(OSError, match="disk full"):
        await recent.spool_once(b"b", b"x", spool)
    assert await recent.spool_once(b"b", b"x", spool) == (5, False)


async def test_an_id_reused_for_other_bytes_is_refused_not_answered_with_the_first_count() -> None:
    recent: RecentBatches[int] = RecentBatches(lambda _: 8)

    async def spool() -> int:
        return 1

    await recent.spool_once(b"b", b"first batch", spool)
    with pytest.raises(BatchIdReusedError, match="other bytes"):
        await recent.spool_once(b"b", b"second batch", spool)


async def test_only_the_last_ids_are_kept() -> None:
    recent: RecentBatches[int] = RecentBatches(lambda _: 8, capacity=3)

    async def spool() -> int:
        return 1

    for n in range(10):
        await recent.spool_once(b"b%d" % n, b"x", spool)
    assert len(recent) == 3
    assert await recent.spool_once(b"b9", b"x", spool) == (1, True)
    assert await recent.spool_once(b"b0", b"x", spool) == (1, False)  # forgotten


async def test_only_so_many_bytes_of_answers_are_kept() -> None:
    recent: RecentBatches[bytes] = RecentBatches(len, max_bytes=1000)

    async def spool() -> bytes:
        return b"r" * 300  # an answer listing rejections

    for n in range(10):
        await recent.spool_once(b"b%d" % n, b"x", spool)
    assert len(recent) == 3 and recent.held_bytes == 900


# -- through the real gRPC API ------------------------------------------------------------


class SlowDisk(MemoryFileLayer):
    """A disk whose fsyncs wait while ``stalled`` is clear (a slow or stalled device)."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = threading.Event()
        self.flowing.set()

    def fsync(self, handle: int) -> None:
        self.flowing.wait(30)
        super().fsync(handle)


async def test_a_retry_after_the_deadline_of_a_slow_spool_write_is_not_spooled_twice(
    start_sidecar: StartSidecar,
) -> None:
    disk = SlowDisk()
    running = await start_sidecar(files=disk, spool=SpoolConfig(directory="/spool"))
    request = sidecar_pb2.RecordBatchRequest(events=proto_events(40), batch_id=b"batch-0001")
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        disk.flowing.clear()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(request, timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        retry = asyncio.ensure_future(stub.RecordBatch(request, timeout=10))
        await asyncio.sleep(0.2)
        assert not retry.done()  # it waits for the first call's write
        disk.flowing.set()
        ack = await retry
        assert (ack.accepted, ack.duplicate) == (40, True)
        again = await stub.RecordBatch(request)
        assert (again.accepted, again.duplicate) == (40, True)
    await eventually(lambda: len(running.collector.events()) == 40)
    await asyncio.sleep(0.3)  # what a second copy would need to arrive
    assert len(running.collector.events()) == 40
    assert running.app.intake.counters.accepted == 40
    assert running.app.intake.counters.duplicate_batches == 2


async def test_batches_without_an_id_or_with_their_own_ids_are_each_spooled(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        plain = sidecar_pb2.RecordBatchRequest(events=proto_events(5))
        assert (await stub.RecordBatch(plain)).duplicate is False
        assert (await stub.RecordBatch(plain)).accepted == 5  # no id: at-least-once
        for n in range(2):
            named = sidecar_pb2.RecordBatchRequest(
                events=proto_events(5, start=10 * (n + 1)), batch_id=b"id-%d" % n
            )
            assert (await stub.RecordBatch(named)).duplicate is False
    await eventually(lambda: len(running.collector.events()) == 20)


async def test_a_batch_id_reused_for_other_events_is_refused_with_the_reason(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        first = sidecar_pb2.RecordBatchRequest(events=proto_events(3), batch_id=b"same")
        assert (await stub.RecordBatch(first)).accepted == 3
        other = sidecar_pb2.RecordBatchRequest(events=proto_events(3, start=50), batch_id=b"same")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(other)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch_id already used" in (info.value.details() or "")
    assert running.app.intake.counters.refused_requests["bad_batch_id"] == 1


async def test_the_middleware_exporter_retrying_a_timed_out_batch_delivers_it_once(
    start_sidecar: StartSidecar,
) -> None:
    disk = SlowDisk()
    running = await start_sidecar(files=disk, spool=SpoolConfig(directory="/spool"))
    exporter = SidecarGrpcExporter(running.target, timeout=0.5)
    events = [event_from_proto(e) for e in proto_events(30)]
    batch = OutgoingBatch(events)
    try:
        disk.flowing.clear()
        with pytest.raises(RetryableExportError, match="DEADLINE_EXCEEDED"):
            await asyncio.to_thread(exporter.export, batch)
        disk.flowing.set()
        result = await asyncio.to_thread(exporter.export, batch)  # the pipeline's retry
    finally:
        exporter.shutdown(1)
    assert result.accepted == 30
    await eventually(lambda: len(running.collector.events()) == 30)
    await asyncio.sleep(0.3)
    assert len(running.collector.events()) == 30, "delivered once"
    assert running.app.intake.counters.duplicate_batches == 1

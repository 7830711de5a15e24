"""A ``producer_id`` file removed from a used spool: a new id numbered from 1, no false gap."""

from __future__ import annotations

import logging
import re

import grpc
import pytest

from predtrace.sidecar.spool import MemoryFileLayer, SpoolConfig
from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar
from .test_grpc_api import proto_events

_FILE = "/spool/producer_id"


async def _ship_batches(running: Running, batches: int, start: int) -> None:
    """``batches`` RecordBatch calls of 2 events, each shipped before the next is sent."""
    shipper = running.app.shipper
    before = shipper.counters.exported
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        for b in range(batches):
            events = proto_events(2, start + 2 * b)
            await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=events))
            await eventually(lambda b=b: shipper.counters.exported >= 2 * (b + 1) + before)


def _seqs(running: Running, producer: str) -> list[int]:
    return sorted(seq for who, seq in running.collector.stored if who == producer)


@pytest.mark.parametrize("configured", ["", "plant-7"])
async def test_a_removed_producer_id_file_gives_a_new_id_numbered_from_one(
    start_sidecar: StartSidecar, configured: str, caplog: pytest.LogCaptureFixture
) -> None:
    disk = MemoryFileLayer()
    spool = SpoolConfig(directory="/spool")
    first = await start_sidecar(files=disk, spool=spool, producer_id=configured)
    old_id = first.app.producer_id
    await _ship_batches(first, 3, 0)
    assert _seqs(first, old_id) == [1, 2, 3]
    await first.app.stop()
    disk.unlink(_FILE)  # the spool's state (the shipper's numbering) is intact

    caplog.set_level(logging.ERROR, logger="predtrace.sidecar")
    second = await start_sidecar(files=disk, spool=spool, producer_id=configured)
    new_id = second.app.producer_id
    await _ship_batches(second, 2, 100)
    assert new_id != old_id
    if configured:  # what `predtrace collector token --producer plant-7` accepts
        assert re.fullmatch(r"plant-7-r[0-9a-f]{6}", new_id), new_id
    # Its own numbering from seq 1: the collector sees no missing batches 1-3.
    assert _seqs(second, new_id) == [1, 2]
    assert [e.prediction_id for e in second.collector.stored[(new_id, 1)].batch.events] == [
        "p00100",
        "p00101",
    ]
    assert _seqs(second, old_id) == [1, 2, 3]  # nothing of the old id sent again
    assert second.collector.chain_ok(new_id)
    assert second.app.shipper.counters.quarantined == 0
    assert disk.read(_FILE, 0, 1024) == new_id.encode()
    missing = [r for r in caplog.records if "missing" in r.getMessage()]
    assert len(missing) == 1, [r.getMessage() for r in caplog.records]
    assert new_id in missing[0].getMessage()

    # Kept from then on: a restart continues the new id and its numbering.
    await second.app.stop()
    third = await start_sidecar(files=disk, spool=spool, producer_id=configured)
    assert third.app.producer_id == new_id
    await _ship_batches(third, 1, 200)
    assert _seqs(third, new_id) == [1, 2, 3]


async def test_a_new_spool_without_a_producer_id_file_is_not_reported(
    start_sidecar: StartSidecar, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="predtrace.sidecar")
    disk = MemoryFileLayer()
    spool = SpoolConfig(directory="/spool")
    running = await start_sidecar(files=disk, spool=spool, producer_id="plant-7")
    assert running.app.producer_id == "plant-7"
    # A spool nothing was delivered from holds no numbering: the id carries on.
    await running.app.stop()
    disk.unlink(_FILE)
    again = await start_sidecar(files=disk, spool=spool, producer_id="plant-7")
    assert again.app.producer_id == "plant-7"
    assert not [r for r in caplog.records if "producer id" in r.getMessage()]

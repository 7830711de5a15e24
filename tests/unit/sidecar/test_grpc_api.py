"""The sidecar's gRPC API in process: durable acks, validation, limits (RELIABILITY row 27)."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import msgpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from predtrace.sidecar._app import SidecarApp
from predtrace.sidecar._config import (
    DeploymentConfig,
    RedactionConfig,
    ShipperConfig,
    SidecarConfig,
)
from predtrace.sidecar._errors import ConfigError, SpoolUnusableError
from predtrace.sidecar._grpc_api import MAX_LISTED_REJECTIONS
from predtrace.sidecar.pipeline import CollectorClientConfig
from predtrace.sidecar.spool import FaultPoints, MemoryFileLayer, SimulatedCrash, SpoolConfig
from predtrace.v1 import event_pb2, sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import (
    ModelRef,
    OutputSummary,
    PredictionEvent,
    event_from_proto,
    event_to_map,
    event_to_proto,
    pack_events,
)
from tests.reliability.sidecar.fake_collector import FakeCollector
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar


def proto_events(n: int, start: int = 0) -> list[event_pb2.PredictionEvent]:
    return [
        event_to_proto(
            PredictionEvent(
                prediction_id=f"p{i:05d}",
                model=ModelRef("churn", "3"),
                features={"age": 41.0, "ssn_digits": 1234.0},
                attributes={"customer_email": "a@example.org", "route": "/predict"},
                output=OutputSummary(label="stay", score=0.9),
            )
        )
        for i in range(start, start + n)
    ]


async def test_record_batch_is_acknowledged_once_durable_and_reaches_the_collector(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar(
        deployment=DeploymentConfig(pod="churn-7d9f", namespace="ml", image_digest="sha256:ab"),
        redaction=RedactionConfig(allow_features=("age",), allow_attributes=("route",)),
    )
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        ack = await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(25)))
        assert ack.accepted == 25
        assert running.app.spool.stats().next_index == 26
    await eventually(lambda: len(running.collector.events()) == 25)
    event = running.collector.events()[0]
    assert (event.deployment.pod, event.deployment.namespace) == ("churn-7d9f", "ml")
    assert event.features == {"age": 41.0}, "only allow-listed features leave"
    assert event.attributes == {"route": "/predict"}, "only allow-listed attributes leave"


async def test_invalid_events_are_rejected_alone_with_their_position_and_reason(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    batch = proto_events(4)
    batch[1].trace_id = b"short"
    batch[3].prediction_id = ""
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(
            sidecar_pb2.RecordBatchRequest(events=batch)
        )
    assert ack.accepted == 2
    assert [(r.index, r.reason) for r in ack.rejected] == [
        (1, "trace_id must be 16 bytes"),
        (3, "prediction_id is required"),
    ]


def plain_events(n: int, start: int = 0) -> list[PredictionEvent]:
    return [event_from_proto(e) for e in proto_events(n, start)]


async def test_packed_events_are_spooled_redacted_and_shipped_like_protobuf_ones(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(
        redaction=RedactionConfig(allow_features=("age",), allow_attributes=("route",)),
    )
    request = sidecar_pb2.RecordBatchRequest(
        events=proto_events(3), packed_events=pack_events(plain_events(5, 3))
    )
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert (ack.accepted, list(ack.rejected), ack.read_packed) == (8, [], True)
    await eventually(lambda: len(running.collector.events()) == 8)
    events = running.collector.events()
    assert [e.prediction_id for e in events] == [f"p{i:05d}" for i in range(8)]
    assert all(e.features == {"age": 41.0} for e in events), "redaction runs on both forms"
    assert events[5].output == OutputSummary(label="stay", score=0.9)


def _all_bytes_under(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


async def test_what_redaction_removes_never_reaches_the_spool_files(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    # The collector is down, so every event stays in the spool's files.
    running = await start_sidecar(
        collector=CollectorClientConfig(url="http://127.0.0.1:9", timeout=1),
        redaction=RedactionConfig(
            allow_features=("age",), allow_attributes=("route",), patterns=(r"stay",)
        ),
    )
    request = sidecar_pb2.RecordBatchRequest(
        events=proto_events(3), packed_events=pack_events(plain_events(3, 3))
    )
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert ack.accepted == 6
    spooled = await asyncio.to_thread(_all_bytes_under, tmp_path)
    assert spooled.count(b"/predict") == 6  # the allowed attribute: the files hold the events
    for removed in (b"ssn_digits", b"customer_email", b"a@example.org", b"stay"):
        assert removed not in spooled, removed


async def test_a_bad_packed_event_is_rejected_alone_at_its_position_after_the_protobuf_ones(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    packed = [event_to_map(e) for e in plain_events(3, 2)]
    packed[1][2] = b"short"  # trace_id
    packed.append({1: "p00009", 4: 2**63})  # a time past int64: the collector would refuse it
    packed.append({1: "p00010", 9: "/" + "x" * 70_000})  # an endpoint over 64 KiB
    request = sidecar_pb2.RecordBatchRequest(
        events=proto_events(2), packed_events=msgpack.packb(packed, use_bin_type=True)
    )
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert ack.accepted == 4  # two protobuf events, two of the four packed ones
    assert [(r.index, r.prediction_id) for r in ack.rejected] == [
        (3, "p00003"),
        (5, "p00009"),
        (6, "p00010"),
    ]
    assert "trace_id" in ack.rejected[0].reason
    assert "int64" in ack.rejected[1].reason
    assert "longer than 65536 bytes" in ack.rejected[2].reason, "alone, as in protobuf"
    assert running.app.spool.stats().records == 4


async def test_refused_events_count_alike_whether_protobuf_or_packed(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    bad_proto = proto_events(1)[0]
    bad_proto.trace_id = b"abc"
    packed = [{1: "p00007", 2: b"abc"}, event_to_map(plain_events(1, 8)[0])]
    request = sidecar_pb2.RecordBatchRequest(
        events=[bad_proto, *proto_events(1, 1)], packed_events=msgpack.packb(packed)
    )
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert ack.accepted == 2
    assert [r.index for r in ack.rejected] == [0, 2]
    counters = running.app.intake.counters
    assert (counters.received, counters.accepted, counters.rejected) == (4, 2, 2)
    # A request refused whole (unreadable packed events) counts nothing.
    unreadable = sidecar_pb2.RecordBatchRequest(events=[bad_proto], packed_events=b"\xc1")
    async with grpc.aio.insecure_channel(running.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(unreadable)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (counters.received, counters.accepted, counters.rejected) == (4, 2, 2)


@pytest.mark.parametrize(
    ("packed", "reason"),
    [
        (b"\xc1", "packed_events: packed events must be a msgpack array"),  # refused unread
        (msgpack.packb({1: "p"}), "packed_events: packed events must be a msgpack array"),
        (b"\x92\xa1a", "packed_events: malformed msgpack"),  # truncated
        (msgpack.packb([{1: f"p{i}"} for i in range(8)]), "more than 10 events in one request"),
    ],
    ids=["not msgpack", "a map", "truncated", "too many"],
)
async def test_unreadable_or_too_many_packed_events_get_invalid_argument(
    start_sidecar: StartSidecar, packed: bytes, reason: str
) -> None:
    running = await start_sidecar(max_events_per_request=10)
    request = sidecar_pb2.RecordBatchRequest(events=proto_events(5), packed_events=packed)
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert reason in (info.value.details() or "")
        assert running.app.spool.stats().records == 0, "nothing of a refused request is spooled"
        await _assert_healthy(channel, stub)


async def test_a_client_stream_is_acknowledged_after_every_event_is_durable(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()

    async def stream() -> object:
        for event in proto_events(2500):
            yield event

    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).Record(stream())
    assert ack.accepted == 2500
    assert running.app.spool.stats().next_index == 2501
    await eventually(lambda: len(running.collector.events()) == 2500)


async def test_an_oversized_message_gets_resource_exhausted_and_the_server_stays_healthy(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(max_message_bytes=64 * 1024)
    big = sidecar_pb2.RecordBatchRequest(events=proto_events(2000))
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(big)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await _assert_healthy(channel, stub)


async def test_malformed_bytes_and_too_many_events_get_invalid_argument(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(max_events_per_request=10)
    async with grpc.aio.insecure_channel(running.target) as channel:
        raw = channel.unary_unary("/predtrace.v1.Sidecar/RecordBatch")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(b"\xff\xff\xff\xff not protobuf")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed" in (info.value.details() or "")
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(11)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await _assert_healthy(channel, stub)


async def test_an_expired_deadline_cancels_the_call_and_the_server_stays_healthy(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(
                sidecar_pb2.RecordBatchRequest(events=proto_events(5000)), timeout=0.0001
            )
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _assert_healthy(channel, stub)


async def test_a_full_disk_answers_resource_exhausted_with_a_retry_pushback(
    start_sidecar: StartSidecar,
) -> None:
    disk = MemoryFileLayer()
    running = await start_sidecar(files=disk, spool=SpoolConfig(directory="/spool"))
    disk.capacity = disk.used_bytes() + 200
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(50)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("grpc-retry-pushback-ms", "1000") in list(info.value.trailing_metadata() or ())
        disk.capacity = None
        ack = await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(50)))
        assert ack.accepted == 50


async def test_status_reports_depth_lag_and_counters_of_the_running_sidecar(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    await running.collector.stop()  # nothing can be delivered
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(12)))
        await eventually(lambda: running.app.shipper.counters.retried > 0)
        status = await stub.Status(sidecar_pb2.StatusRequest())
    assert status.producer_id == "test-sidecar"
    assert status.spool_records == 12
    assert status.oldest_unsent_unix_nano > 0
    assert status.retried_batches >= 1
    assert "unreachable" in status.last_error


async def test_health_and_reflection_are_served(start_sidecar: StartSidecar) -> None:
    running = await start_sidecar()
    async with grpc.aio.insecure_channel(running.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service="predtrace.v1.Sidecar"))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> object:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for reply in stub.ServerReflectionInfo(ask()):
            names = {s.name for s in reply.list_services_response.service}
            assert "predtrace.v1.Sidecar" in names
            break


async def test_an_unusable_spool_directory_fails_startup_naming_it(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SpoolUnusableError, match="a-file"):
        await start_sidecar(spool=SpoolConfig(directory=str(blocker / "spool")))


async def _assert_healthy(channel: grpc.aio.Channel, stub: sidecar_pb2_grpc.SidecarStub) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    ack = await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(1, 900)))
    assert ack.accepted == 1


@pytest.mark.parametrize("configured", ["test-sidecar", "plant-r000123"])
async def test_after_losing_its_seq_state_the_sidecar_continues_under_a_derived_id(
    start_sidecar: StartSidecar, configured: str
) -> None:
    disk = MemoryFileLayer()
    seen = []
    for _ in range(3):
        running = await start_sidecar(
            files=disk, spool=SpoolConfig(directory="/spool"), producer_id=configured
        )
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(3)))
            shipper = running.app.shipper
            await eventually(lambda: shipper.counters.exported >= 3)  # noqa: B023 - awaited here
            seen.append((await stub.Status(sidecar_pb2.StatusRequest())).producer_id)
        await running.app.stop()
        disk.corrupt("/spool/state.0", 12)
        disk.corrupt("/spool/state.1", 12)
    assert seen[0] == configured
    # Always <configured>-r<6 hex> (never nested, never back to an older id):
    # the pattern `predtrace collector token --producer <configured>` allows.
    pattern = re.escape(configured) + r"-r[0-9a-f]{6}"
    assert all(re.fullmatch(pattern, pid) for pid in seen[1:]), seen
    assert len(set(seen)) == 3


async def test_a_shipper_that_died_still_lets_stop_close_everything_and_a_restart_ships(
    collector: FakeCollector,
) -> None:
    disk = MemoryFileLayer()
    config = SidecarConfig(
        collector=CollectorClientConfig(url=collector.url, timeout=2),
        spool=SpoolConfig(directory="/spool"),
        listen="127.0.0.1:0",
        producer_id="crashy",
        shipper=ShipperConfig(linger=0.01),
        drain_timeout=1.0,
    )
    faults = FaultPoints()
    faults.arm("shipper.after_ack")
    app = SidecarApp(config, files=disk, faults=faults)
    await app.start()
    async with grpc.aio.insecure_channel(app.addresses["grpc"]) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(4)))
    await eventually(lambda: collector.requests >= 1)
    with pytest.raises(SimulatedCrash):  # the shipper task died; stop says so, after closing
        await app.stop()
    assert app._client._session is None, "the collector session was left open"
    again = SidecarApp(config, files=disk)
    await again.start()
    try:
        await eventually(lambda: again.shipper.counters.batches >= 1)
    finally:
        await again.stop()
    assert collector.duplicates == 1  # the acked batch, resent byte for byte
    assert {e.prediction_id for e in collector.events()} == {f"p{i:05d}" for i in range(4)}


def _odd_events() -> dict[str, event_pb2.PredictionEvent]:
    """Events the collector would refuse; each must be refused at the sidecar instead."""
    long_route = event_pb2.PredictionEvent(prediction_id="route", endpoint="e" * 70_000)
    far_future = event_pb2.PredictionEvent(prediction_id="time", timestamp_unix_nano=2**64 - 1)
    nul = event_pb2.PredictionEvent(prediction_id="nul\x00id")
    wide = event_pb2.PredictionEvent(prediction_id="wide")
    for k in range(1100):
        wide.features[f"f{k}"] = 1.0
    return {"route": long_route, "time": far_future, "nul": nul, "wide": wide}


async def test_an_event_the_collector_would_refuse_is_refused_to_its_sender_not_its_batch(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(redaction=RedactionConfig(allow_features=("*",)))
    odd = _odd_events()
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        good = await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(50)))
        assert good.accepted == 50
        for name, event in odd.items():
            ack = await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=[event]))
            assert ack.accepted == 0 and [r.index for r in ack.rejected] == [0], name
            assert ack.rejected[0].reason, name
    await eventually(lambda: len(running.collector.events()) >= 50)
    assert running.app.shipper.counters.quarantined == 0
    assert {e.prediction_id for e in running.collector.events()} == {f"p{i:05d}" for i in range(50)}


async def test_a_stream_of_rejections_gets_an_ack_that_fits_and_right_positions(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    bad_id = event_pb2.PredictionEvent(prediction_id="p" * 256, trace_id=b"x")  # bad trace id

    async def stream() -> AsyncIterator[bytes]:
        yield event_pb2.PredictionEvent(prediction_id="").SerializeToString()  # 0: no id
        yield b"\xff\xff"  # 1: not a PredictionEvent
        yield proto_events(1)[0].SerializeToString()  # 2: good
        for _ in range(15_000):  # 3...: rejected, with long ids in every rejection
            yield bad_id.SerializeToString()

    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            "/predtrace.v1.Sidecar/Record", response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await record(stream())
    assert ack.accepted == 1
    assert [r.index for r in ack.rejected[:3]] == [0, 1, 3]
    assert len(ack.rejected) == MAX_LISTED_REJECTIONS


class _GatedSegmentDisk(MemoryFileLayer):
    """Once ``armed``, holds the spool writer in the fsync of a segment until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()
        self._paths: dict[int, str] = {}

    def open(self, path: str, *, create: bool) -> int:
        handle = super().open(path, create=create)
        self._paths[handle] = path
        return handle

    def fsync(self, handle: int) -> None:
        if self.armed and "/seg-" in self._paths.get(handle, ""):
            self.entered.set()
            self.release.wait(30)
        super().fsync(handle)


async def test_row27_a_deadline_expiring_while_the_server_spools_is_deadline_exceeded_and_safe(
    start_sidecar: StartSidecar,
) -> None:
    disk = _GatedSegmentDisk()
    running = await start_sidecar(files=disk, spool=SpoolConfig(directory="/spool"))
    acked = {f"p{i:05d}" for i in range(10)}
    cancelled = {f"p{i:05d}" for i in range(100, 150)}
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            first = await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(10)))
            assert first.accepted == 10
            await eventually(lambda: len(running.collector.events()) == 10)
            disk.armed = True  # the next spool write is slower than the caller's deadline
            call = asyncio.ensure_future(
                stub.RecordBatch(
                    sidecar_pb2.RecordBatchRequest(events=proto_events(50, 100)), timeout=1.0
                )
            )
            # The call reached the server: its events are being written to the spool.
            await eventually(disk.entered.is_set, within=5)
            assert running.app.intake.counters.received == 60
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert not disk.release.is_set(), "the deadline expired while the server worked"
            disk.release.set()
            await _assert_healthy(channel, stub)  # health SERVING and p00900 acknowledged
            acked.add("p00900")
            later = await stub.RecordBatch(
                sidecar_pb2.RecordBatchRequest(events=proto_events(5, 200))
            )
            assert later.accepted == 5
            acked |= {f"p{i:05d}" for i in range(200, 205)}
    finally:
        disk.release.set()  # never leave the writer thread parked
    await eventually(lambda: acked <= {e.prediction_id for e in running.collector.events()})
    delivered = {e.prediction_id for e in running.collector.events()}
    # At least once: every acknowledged event arrives; the cancelled call's events
    # may or may not have been spooled, and nothing else appears.
    assert delivered - acked <= cancelled
    assert running.app.shipper.counters.quarantined == 0


@pytest.mark.parametrize(
    "output",
    [
        event_pb2.OutputSummary(score=float("nan")),
        event_pb2.OutputSummary(score=float("inf")),
        event_pb2.OutputSummary(value=float("-inf")),
    ],
)
async def test_a_non_finite_output_is_stored_unset_not_refused(
    start_sidecar: StartSidecar, output: event_pb2.OutputSummary
) -> None:
    # NaN is how ML code says "missing" (FORMAT.md): the value goes, the event stays.
    running = await start_sidecar()
    bad = event_pb2.PredictionEvent(prediction_id="nan-output", output=output)
    request = sidecar_pb2.RecordBatchRequest(events=[*proto_events(1), bad])
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert (ack.accepted, list(ack.rejected)) == (2, [])
    await eventually(lambda: len(running.collector.events()) == 2)
    [stored] = [e for e in running.collector.events() if e.prediction_id == "nan-output"]
    assert stored.output is not None
    assert (stored.output.score, stored.output.value) == (None, None)
    assert running.app._shipper.counters.rejected == 0  # the collector refused nothing


async def test_packed_events_are_built_one_at_a_time_not_a_request_whole(
    start_sidecar: StartSidecar,
) -> None:
    # 600 events of 1,000 maps of one entry each under an unknown key: 1.8 MB
    # on the wire, within each event's bounds; built whole (as they were),
    # some 140 MB of Python objects for this one request.
    running = await start_sidecar()
    heavy = _array(1000) + b"\x81\x00\x00" * 1000
    packed = _array(600) + b"".join(
        b"\x82\x01" + msgpack.packb(f"h{i:05d}") + b"\x63" + heavy for i in range(600)
    )
    request = sidecar_pb2.RecordBatchRequest(packed_events=packed)
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(1)))  # warm
        tracemalloc.start()
        try:
            ack = await stub.RecordBatch(request)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert ack.accepted == 600 and not ack.rejected  # the unknown key is dropped
    assert peak < 20 * 1024 * 1024, peak


def _array(n: int) -> bytes:
    return b"\xdc" + n.to_bytes(2, "big")


async def test_the_ack_fits_the_message_limit_however_many_rejections_it_could_list(
    start_sidecar: StartSidecar,
) -> None:
    # 1,000 small events, each refused with a reason: listing them all would
    # make an ack larger than the request and than the 64 KiB limit.
    limit = 64 * 1024
    running = await start_sidecar(max_message_bytes=limit)
    packed = msgpack.packb([{1: f"refused-event-{i:06d}", 9: "a\x00b"} for i in range(1000)])
    request = sidecar_pb2.RecordBatchRequest(events=proto_events(1), packed_events=packed)
    assert request.ByteSize() < limit
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert ack.accepted == 1
    assert ack.ByteSize() <= limit
    assert 0 < len(ack.rejected) < 1000
    assert [r.index for r in ack.rejected] == list(range(1, len(ack.rejected) + 1))


async def test_listed_rejections_echo_at_most_256_characters_of_an_id(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    packed = msgpack.packb([{1: "x" * 4000} for _ in range(3)])  # ids over the 256 bound
    request = sidecar_pb2.RecordBatchRequest(packed_events=packed)
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert ack.accepted == 0
    assert [r.prediction_id for r in ack.rejected] == ["x" * 256] * 3


async def test_the_event_limit_counts_protobuf_and_packed_events_together(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(max_events_per_request=5)
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        full = sidecar_pb2.RecordBatchRequest(events=proto_events(5), packed_events=b"\x90")
        assert (await stub.RecordBatch(full)).accepted == 5  # exactly the limit, empty array
        over = sidecar_pb2.RecordBatchRequest(
            events=proto_events(4, 10), packed_events=msgpack.packb([{1: "a"}, {1: "b"}])
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.RecordBatch(over)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "more than 5 events in one request"


async def test_the_ack_lists_the_first_rejections_by_position_whoever_found_them(
    start_sidecar: StartSidecar,
) -> None:
    # Positions 0-499 are refused by the intake (NUL), 500-1499 while reading
    # the protobuf events (no id), which happens first.
    running = await start_sidecar()
    nul = [event_pb2.PredictionEvent(prediction_id=f"n{i}", endpoint="a\x00") for i in range(500)]
    no_id = [event_pb2.PredictionEvent(prediction_id="") for _ in range(1000)]
    request = sidecar_pb2.RecordBatchRequest(events=[*nul, *no_id])
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert ack.accepted == 0
    assert [r.index for r in ack.rejected] == list(range(MAX_LISTED_REJECTIONS))


async def test_a_port_in_use_fails_startup_naming_the_flag_not_with_a_traceback(
    start_sidecar: StartSidecar,
) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on 127.0.0.1:{port} \(--listen\)"):
            await start_sidecar(listen=f"127.0.0.1:{port}")


async def test_a_port_another_sidecar_serves_is_refused_not_shared(
    start_sidecar: StartSidecar,
) -> None:
    # gRPC sets SO_REUSEPORT: a second sidecar bound the first one's port and
    # the kernel split producers between the two spools.
    first = await start_sidecar()
    with pytest.raises(OSError, match=rf"cannot listen on {first.target} \(--listen\)"):
        await start_sidecar(listen=first.target)
    port = first.target.rsplit(":", 1)[1]
    with pytest.raises(OSError, match=r"\(--otlp-listen\)"):
        await start_sidecar(otlp_listen=f"127.0.0.1:{port}")


async def test_a_sidecar_refused_the_spool_leaves_the_running_ones_ready_file(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    ready = tmp_path / "s.ready"
    first = await start_sidecar(ready_file=str(ready))
    assert ready.read_text().startswith(first.target)
    second = SidecarApp(first.app.config)  # the same command line: spool and ready file
    with pytest.raises(SpoolUnusableError, match="in use"):
        await second.start()
    await second.stop()  # as the CLI does after a failed start
    assert ready.read_text().startswith(first.target)


async def test_a_ready_file_that_cannot_be_written_fails_startup_naming_the_flag(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="cannot write --ready-file"):
        await start_sidecar(ready_file=str(tmp_path / "no-such-dir" / "s.ready"))


def test_an_unusable_drain_timeout_is_refused_by_name(tmp_path: Path) -> None:
    environ = {"PREDTRACE_COLLECTOR_URL": "http://127.0.0.1:1"}
    environ["PREDTRACE_SPOOL_DIR"] = str(tmp_path)
    for value in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ConfigError, match="--drain-timeout must be between"):
            SidecarConfig.from_env(environ, drain_timeout=value)


async def test_a_spool_path_that_is_a_file_is_named_as_such(
    start_sidecar: StartSidecar, tmp_path: Path
) -> None:
    path = tmp_path / "a-file"
    path.write_text("x")
    with pytest.raises(SpoolUnusableError, match="exists and is not a directory"):
        await start_sidecar(spool=SpoolConfig(directory=str(path)))


async def test_an_event_of_empty_additional_models_is_refused_and_its_batch_still_ships(
    start_sidecar: StartSidecar,
) -> None:
    # Acknowledged, such an event would make the collector refuse its whole
    # batch (the decoder's containers-per-byte bound) and the shipper quarantine it.
    running = await start_sidecar()
    empty = event_to_proto(PredictionEvent("empties", additional_models=[ModelRef()] * 2000))
    request = sidecar_pb2.RecordBatchRequest(events=[*proto_events(10), empty])
    async with grpc.aio.insecure_channel(running.target) as channel:
        ack = await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(request)
    assert ack.accepted == 10
    assert [(r.index, r.reason) for r in ack.rejected] == [
        (10, "additional_models[] must not be empty")
    ]
    await eventually(lambda: len(running.collector.events()) == 10)
    assert running.app._shipper.counters.quarantined == 0


_DAMAGED_IDS = {
    "binary": b"\xff\xfe" * 600,
    "long": b"a" * 900,
    "empty": b"",
    "newline-only": b"\n",
    "control": b"edge\x007",
}


async def _record_and_ship(running: Running, n: int, start: int) -> None:
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(n, start)))
    shipper = running.app.shipper
    await eventually(lambda: shipper.counters.exported >= n)


@pytest.mark.parametrize("damage", sorted(_DAMAGED_IDS))
@pytest.mark.parametrize("configured", ["", "plant-7"])
async def test_a_damaged_producer_id_file_gives_a_new_valid_id_whose_seqs_start_at_one(
    start_sidecar: StartSidecar, damage: str, configured: str
) -> None:
    disk = MemoryFileLayer()
    spool = SpoolConfig(directory="/spool")
    first = await start_sidecar(files=disk, spool=spool, producer_id=configured)
    await _record_and_ship(first, 3, 0)
    old_id = first.app.producer_id
    await first.app.stop()
    disk.write_file("/spool/producer_id", _DAMAGED_IDS[damage])
    second = await start_sidecar(files=disk, spool=spool, producer_id=configured)
    new_id = second.app.producer_id
    await _record_and_ship(second, 3, 100)
    assert new_id != old_id
    assert 0 < len(new_id) <= 200 and new_id.isprintable(), new_id
    if configured:  # what `predtrace collector token --producer plant-7` accepts
        assert re.fullmatch(r"plant-7-r[0-9a-f]{6}", new_id), new_id
    # A new producer: its own numbering from seq 1, nothing quarantined, nothing lost.
    stored = second.collector.stored[(new_id, 1)].batch.events
    assert [e.prediction_id for e in stored] == [f"p{i:05d}" for i in range(100, 103)]
    assert second.app.shipper.counters.quarantined == 0
    assert disk.read("/spool/producer_id", 0, 1024) == new_id.encode()


async def test_a_shipper_that_stops_on_an_unexpected_error_turns_the_sidecar_not_serving(
    collector: FakeCollector,
) -> None:
    config = SidecarConfig(
        collector=CollectorClientConfig(url=collector.url, timeout=2),
        spool=SpoolConfig(directory="/spool"),
        listen="127.0.0.1:0",
        producer_id="broken",
        shipper=ShipperConfig(linger=0.01),
        drain_timeout=1.0,
    )
    app = SidecarApp(config, files=MemoryFileLayer())

    async def broken_send(body: bytes, *, compressed: bool) -> object:
        raise ValueError("a bug in the sender")

    app._client.send = broken_send  # type: ignore[method-assign, assignment]
    await app.start()
    try:
        async with grpc.aio.insecure_channel(app.addresses["grpc"]) as channel:
            stub = sidecar_pb2_grpc.SidecarStub(channel)
            await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(2)))
            await asyncio.wait_for(app.failed.wait(), 10)
            assert isinstance(app.failure, ValueError)
            assert app._failing is not None
            await app._failing  # health is set NOT_SERVING right after the failure
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "predtrace.v1.Sidecar"):
                answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
    finally:
        await app.stop()


async def test_a_kept_restarted_id_of_a_long_configured_id_is_kept_across_starts(
    start_sidecar: StartSidecar,
) -> None:
    # The 200-character rule leaves room for the "-r<6 hex>" suffix; applied to
    # the whole kept id, a restarted id of a 195-character --producer-id was
    # taken for damage and replaced (seqs from 1 again) on every start.
    disk = MemoryFileLayer()
    spool = SpoolConfig(directory="/spool")
    configured = "e" * 195
    disk.makedirs("/spool")
    disk.write_file("/spool/producer_id", f"{configured}-r0a1b2c".encode())
    for _ in range(2):
        running = await start_sidecar(files=disk, spool=spool, producer_id=configured)
        assert running.app.producer_id == f"{configured}-r0a1b2c"
        await running.app.stop()


@pytest.mark.parametrize(
    ("kept", "configured", "used"),
    [
        ("edge-rack-1", "edge", "edge"),  # another producer that merely begins with it
        ("edge-r1a2b3c", "edge", "edge-r1a2b3c"),  # edge continued under a derived id
        ("edge", "edge", "edge"),
    ],
)
async def test_a_configured_producer_id_is_used_unless_the_spool_continued_it(
    start_sidecar: StartSidecar, kept: str, configured: str, used: str
) -> None:
    disk = MemoryFileLayer()
    disk.makedirs("/spool")
    disk.write_file("/spool/producer_id", kept.encode())
    running = await start_sidecar(
        files=disk, spool=SpoolConfig(directory="/spool"), producer_id=configured
    )
    assert running.app.producer_id == used

"""Open ``Record`` streams hold a bounded number of bytes together, and a paused one is spooled.

Many producers each holding a stream open with a chunk not yet full held it
all in memory, unspooled and unshipped, without limit: the chunks of all
open streams now share one byte budget, and a chunk left waiting for its next
message is spooled while its stream stays open.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc
import pytest

from predtrace.sidecar import _grpc_streams
from predtrace.sidecar._config import RedactionConfig
from predtrace.sidecar._grpc_api import ACCEPTED_KEY, PROCESSED_KEY, GrpcSource
from predtrace.sidecar._metrics import SidecarMetrics
from predtrace.sidecar.spool import MemoryFileLayer, SpoolConfig
from predtrace.v1 import event_pb2, sidecar_pb2
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar
from .test_grpc_api import proto_events
from .test_grpc_stream_and_refusals import _spy_on_intake

RECORD = "/predtrace.v1.Sidecar/Record"


def _blobs(n: int, start: int) -> list[bytes]:
    """``n`` events of about 1 KiB each, all of one length (ids of one length)."""
    events: list[event_pb2.PredictionEvent] = proto_events(n, start)
    for event in events:
        event.attributes["blob"] = "x" * 1000
    return [e.SerializeToString() for e in events]


async def _paused(
    first: Sequence[bytes], go_on: asyncio.Event, then: Sequence[bytes] = ()
) -> AsyncIterator[bytes]:
    """``first``, then nothing until ``go_on`` is set, then ``then`` and the stream's end."""
    for message in first:
        yield message
    await go_on.wait()
    for message in then:
        yield message


def _source(running: Running) -> GrpcSource:
    source = running.app.grpc_source
    assert source is not None
    return source


def _spooled(running: Running) -> int:
    return running.app.spool.stats().next_index - 1


async def test_open_streams_hold_no_more_than_the_budget_the_rest_is_spooled(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    budget = 200 * 1024
    monkeypatch.setattr(_grpc_streams, "STREAMS_HELD_BYTES", budget)
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 600.0)  # the budget alone at work
    running = await start_sidecar()
    source = _source(running)
    streams, per = 20, 60  # 20 x 60 KiB: six times the budget, each stream under its chunk
    messages = [_blobs(per, s * 1000) for s in range(streams)]
    size = len(messages[0][0])
    assert all(len(m) == size for stream in messages for m in stream)
    total = streams * per
    most = 0

    async def watch() -> None:
        nonlocal most
        while True:
            most = max(most, source.held_bytes)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    go_on = asyncio.Event()
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        calls = [asyncio.ensure_future(record(_paused(m, go_on))) for m in messages]
        # Every message arrived: each is spooled or held.
        await eventually(lambda: _spooled(running) * size + source.held_bytes == total * size)
        held = source.held_bytes
        assert 0 < held <= budget
        gauge = [
            sample.value
            for family in SidecarMetrics(running.app).collect()
            for sample in family.samples
            if sample.name == "predtrace_sidecar_stream_held_bytes"
        ]
        assert gauge == [held]
        assert _spooled(running) >= total - budget // size  # while every stream stays open
        assert not any(call.done() for call in calls)
        go_on.set()
        acks = await asyncio.gather(*calls)
    watcher.cancel()
    assert [ack.accepted for ack in acks] == [per] * streams
    assert most <= budget
    assert source.held_bytes == 0
    await eventually(lambda: len(running.collector.events()) == total)
    ids = sorted(e.prediction_id for e in running.collector.events())
    assert ids == sorted(f"p{s * 1000 + i:05d}" for s in range(streams) for i in range(per))


async def test_a_cancelled_stream_frees_what_it_held(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 600.0)
    running = await start_sidecar()
    source = _source(running)
    messages = _blobs(10, 0)
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        call = record(_paused(messages, asyncio.Event()))
        await eventually(lambda: source.held_bytes == sum(map(len, messages)))
        call.cancel()
        # Its chunk spooled or let go (a cancelled call may have spooled whole
        # chunks, as documented), it counts no more.
        await eventually(lambda: source.held_bytes == 0)


async def test_a_paused_stream_is_spooled_and_shipped_while_it_stays_open(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 0.05)
    running = await start_sidecar()
    source = _source(running)
    calls = _spy_on_intake(running, monkeypatch)
    go_on = asyncio.Event()
    first, then = _blobs(5, 0), _blobs(3, 5)
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        call = asyncio.ensure_future(record(_paused(first, go_on, then)))
        await eventually(lambda: len(running.collector.events()) == 5)
        assert not call.done()
        assert source.held_bytes == 0
        go_on.set()
        ack = await call
    assert (ack.accepted, list(ack.rejected)) == (8, [])
    assert calls == [[f"p{i:05d}" for i in range(5)], [f"p{i:05d}" for i in range(5, 8)]]
    await eventually(lambda: len(running.collector.events()) == 8)
    assert [e.prediction_id for e in running.collector.events()] == [f"p{i:05d}" for i in range(8)]


@pytest.mark.parametrize(
    ("refused_call", "accepted"),
    [
        (1, 0),  # the paused chunk's spooling is refused: the call fails at its next message
        (2, 5),  # the paused chunk spooled, the last one refused
    ],
)
async def test_a_failed_stream_counts_what_its_paused_chunks_spooled(
    start_sidecar: StartSidecar,
    monkeypatch: pytest.MonkeyPatch,
    refused_call: int,
    accepted: int,
) -> None:
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 0.05)
    running = await start_sidecar()
    calls = _spy_on_intake(running, monkeypatch, fail_on_call=refused_call)
    go_on = asyncio.Event()
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        call = asyncio.ensure_future(record(_paused(_blobs(5, 0), go_on, _blobs(5, 5))))
        await eventually(lambda: len(calls) == 1)
        go_on.set()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(info.value.trailing_metadata() or ())
    assert (trailing[ACCEPTED_KEY], trailing[PROCESSED_KEY]) == (str(accepted), str(accepted))
    assert _spooled(running) == accepted
    assert _source(running).held_bytes == 0


async def test_on_small_flash_a_streams_chunks_are_half_a_segment_at_most(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: 1,000 events of 1 KiB made a chunk of more than a 1 MiB segment
    # in the spool, which found no room while the shipper's batches filled
    # the small cap: every such stream was refused for the whole outage.
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 600.0)  # chunks cut by size alone
    mib = 1 << 20
    running = await start_sidecar(
        files=MemoryFileLayer(),
        spool=SpoolConfig(directory="/spool", segment_bytes=mib, max_bytes=2 * mib),
    )
    messages = _blobs(1000, 0)  # ~1.04 MB of messages
    commits = running.app.spool.counters.commits
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await record(iter(messages))
    assert ack.accepted == 1000
    # One append per chunk, each awaited before the next: at least three of
    # at most 512 KiB, where one chunk of 1,000 events used to be written.
    assert running.app.spool.counters.commits - commits >= 3


async def test_a_chunk_never_passes_its_bound_by_a_big_last_event(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Review: the message that took a chunk past its bound joined it first, so
    # 400 small events and one of ~900 KB made a chunk of more than a 1 MiB
    # segment; with the shipper's batches holding the rest of a small cap it
    # was refused on every retry, while the same events in two RecordBatch
    # calls were taken. Now that chunk goes first, and the big event alone.
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 600.0)  # chunks cut by size alone
    mib = 1 << 20
    running = await start_sidecar(
        files=MemoryFileLayer(),
        spool=SpoolConfig(directory="/spool", segment_bytes=mib, max_bytes=2 * mib),
        redaction=RedactionConfig(allow_attributes=("blob*",)),  # the sizes reach the spool
    )
    small = _blobs(400, 0)  # ~400 KiB, under half a segment
    big = proto_events(1, 900)[0]
    for k in range(15):  # 900 KB, in text fields of 60,000 bytes (the limit is 64 KiB)
        big.attributes[f"blob{k}"] = "x" * 60_000
    sizes: list[int] = []
    append = running.app.spool.append

    async def watched(payloads: Sequence[bytes]) -> range:
        sizes.append(sum(len(p) for p in payloads))
        return await append(payloads)

    monkeypatch.setattr(running.app.spool, "append", watched)
    async with grpc.aio.insecure_channel(
        running.target, options=[("grpc.max_send_message_length", 4 * mib)]
    ) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await record(iter([*small, big.SerializeToString()]))
    assert ack.accepted == 401
    assert len(sizes) == 2, sizes
    assert sizes[0] < mib // 2 and sizes[1] > 800_000  # the small ones, then the big one alone

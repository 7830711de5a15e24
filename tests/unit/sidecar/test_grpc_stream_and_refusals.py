"""The gRPC API's limits: a stream's bounded memory, what a failed stream spooled,
events read one by one when protobuf refuses their request, refusals counted."""

from __future__ import annotations

import asyncio
import collections
import gc
from collections.abc import AsyncIterator, Sequence

import aiohttp
import grpc
import msgpack
import pytest
from google.protobuf.internal import api_implementation
from prometheus_client.parser import text_string_to_metric_families

from predtrace.sidecar import _grpc_streams
from predtrace.sidecar._config import RedactionConfig
from predtrace.sidecar._errors import SpoolFullError
from predtrace.sidecar._grpc_api import ACCEPTED_KEY, PROCESSED_KEY
from predtrace.sidecar._intake import IntakeResult
from predtrace.sidecar._protowire import encode_varint
from predtrace.v1 import event_pb2, sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import PredictionEvent, pack_events
from tests.reliability.sidecar.polling import eventually

from .conftest import Running, StartSidecar
from .cycles import CycleWatch
from .test_grpc_api import plain_events, proto_events

MIB = 1024 * 1024
RECORD = "/predtrace.v1.Sidecar/Record"
RECORD_BATCH = "/predtrace.v1.Sidecar/RecordBatch"


@pytest.fixture(autouse=True)
def _chunks_by_size_and_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """Streams cut into chunks by size and count alone, as these tests count them.

    A pause of 0.2 s mid-stream (a loaded machine) would otherwise spool a
    chunk early (the linger; tested in test_record_stream_budget): a fresh
    clone's CI saw 1,812 events spooled where chunks of 1,000 make 2,000.
    """
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 600.0)


def _spy_on_intake(
    running: Running, monkeypatch: pytest.MonkeyPatch, fail_on_call: int | None = None
) -> list[list[str]]:
    """The ids of each hand-over to the intake (call number ``fail_on_call`` finds a full disk)."""
    calls: list[list[str]] = []
    real = running.app.intake.record

    async def record(events: Sequence[PredictionEvent | object]) -> IntakeResult:
        calls.append([e.prediction_id for e in events if isinstance(e, PredictionEvent)])
        if len(calls) == fail_on_call:
            raise SpoolFullError("no space left on the spool's disk")
        return await real(events)

    monkeypatch.setattr(running.app.intake, "record", record)
    return calls


def _big_event(prediction_id: str, size: int) -> event_pb2.PredictionEvent:
    """An event of about ``size`` bytes, in attributes of 60 KB (each within the limits)."""
    event = proto_events(1)[0]
    event.prediction_id = prediction_id
    for i in range(size // 60_000):
        event.attributes[f"blob{i}"] = "x" * 60_000
    return event


async def _stream(messages: Sequence[bytes]) -> AsyncIterator[bytes]:
    for message in messages:
        yield message


# -- F1: a stream holds a bounded number of bytes ------------------------------------


async def test_a_stream_is_spooled_in_chunks_of_bounded_bytes_not_of_a_thousand_messages(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_sidecar()  # the default redaction drops the attributes
    messages = [_big_event(f"big{i:03d}", 240_000).SerializeToString() for i in range(40)]
    size = {f"big{i:03d}": len(m) for i, m in enumerate(messages)}
    calls = _spy_on_intake(running, monkeypatch)
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await record(_stream(messages))
    assert (ack.accepted, list(ack.rejected)) == (40, [])
    handed = [i for ids in calls for i in ids]
    assert handed == sorted(size), "every event handed over once, in order"
    for ids in calls:
        # Spooled as soon as the messages held pass 1 MiB: what was held
        # before the last one never reached it.
        assert sum(size[i] for i in ids[:-1]) < MIB, [len(c) for c in calls]
    assert len(calls) >= 8, "40 messages of 240 KB make at least 8 chunks"


async def test_a_stream_message_over_the_record_limit_is_rejected_alone_and_held_alone(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_sidecar(redaction=RedactionConfig(allow_attributes=("*",)))
    limit = running.app.spool.config.max_record_bytes
    big = _big_event("too-big", 2 * limit).SerializeToString()
    assert len(big) > limit
    small = [e.SerializeToString() for e in proto_events(2)]
    calls = _spy_on_intake(running, monkeypatch)
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await record(_stream([small[0], big, small[1]]))
    assert ack.accepted == 2
    assert [(r.index, r.prediction_id, r.reason) for r in ack.rejected] == [
        (1, "too-big", f"event larger than {limit} bytes")
    ]
    # Past the chunk's byte bound as soon as it came: the chunk before it goes
    # first, then it alone, at once (not held).
    assert calls == [["p00000"], ["too-big"], ["p00001"]]
    assert running.app.status_view().dropped()["invalid"] == 1


async def test_a_stream_event_redaction_brings_under_the_record_limit_is_taken_as_in_a_batch(
    start_sidecar: StartSidecar,
) -> None:
    # The default redaction drops attributes not allow-listed: the record is small.
    running = await start_sidecar()
    limit = running.app.spool.config.max_record_bytes
    big = _big_event("shrinks", 2 * limit)
    assert big.ByteSize() > limit
    async with grpc.aio.insecure_channel(running.target) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        batch = await stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=[big]))
        streamed = await channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )(_stream([big.SerializeToString()]))
    assert (batch.accepted, list(batch.rejected)) == (1, [])
    assert (streamed.accepted, list(streamed.rejected)) == (1, [])


# -- F2: a stream the sidecar fails says what of it is spooled ------------------------


async def test_a_stream_the_spool_refuses_midway_says_how_many_of_its_events_are_spooled(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_sidecar()
    _spy_on_intake(running, monkeypatch, fail_on_call=3)  # chunks of 1,000: 2,000 are durable
    messages = [e.SerializeToString() for e in proto_events(2500)]
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await record(_stream(messages))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(info.value.trailing_metadata() or ())
    assert (trailing[ACCEPTED_KEY], trailing[PROCESSED_KEY]) == ("2000", "2000")
    assert trailing["grpc-retry-pushback-ms"] == "1000"
    details = info.value.details() or ""
    assert "no space left" in details
    assert "2000 events of this stream are already spooled" in details
    assert running.app.spool.stats().next_index == 2001
    await eventually(lambda: len(running.collector.events()) == 2000)
    assert [e.prediction_id for e in running.collector.events()] == [
        f"p{i:05d}" for i in range(2000)
    ]


async def test_a_stream_over_the_event_limit_fails_before_its_last_chunk_is_spooled(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_grpc_streams, "MAX_EVENTS_PER_STREAM", 30)
    monkeypatch.setattr(_grpc_streams, "_STREAM_CHUNK", 10)
    running = await start_sidecar()
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await record(_stream([e.SerializeToString() for e in proto_events(31)]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailing = dict(info.value.trailing_metadata() or ())
        # Events 21-30 were held, not spooled, when the 31st arrived.
        assert (trailing[ACCEPTED_KEY], trailing[PROCESSED_KEY]) == ("20", "20")
        assert "more than 30 events in one stream; 20 events" in (info.value.details() or "")
        assert running.app.spool.stats().next_index == 21
        exactly = await record(_stream([e.SerializeToString() for e in proto_events(30, 100)]))
    assert exactly.accepted == 30
    assert running.app.intake.counters.refused_requests["too_many_events"] == 1


async def test_a_refused_stream_still_being_written_gets_its_refusal_not_an_internal_error(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grpc.aio client still writing when the sidecar answers saw INTERNAL, metadata lost.

    The race (grpc/grpc issue 36066) hit a few of such calls in a hundred; the
    sidecar now reads what the client still sends before it answers.
    """
    monkeypatch.setattr(_grpc_streams, "MAX_EVENTS_PER_STREAM", 50)
    running = await start_sidecar()
    messages = [e.SerializeToString() for e in proto_events(300)]
    codes: collections.Counter[grpc.StatusCode] = collections.Counter()
    without_metadata = 0
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        for _ in range(200):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await record(_stream(messages))
            codes[info.value.code()] += 1
            trailing = dict(info.value.trailing_metadata() or ())
            without_metadata += PROCESSED_KEY not in trailing
    assert codes == {grpc.StatusCode.INVALID_ARGUMENT: 200}
    assert without_metadata == 0
    assert running.app.intake.counters.refused_requests["too_many_events"] == 200


async def test_a_refused_stream_whose_client_never_ends_it_is_answered_after_the_drain_bound(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_grpc_streams, "MAX_EVENTS_PER_STREAM", 5)
    monkeypatch.setattr(_grpc_streams, "STREAM_DRAIN_S", 0.3)
    running = await start_sidecar()
    never = asyncio.Event()

    async def six_then_silence() -> AsyncIterator[bytes]:
        for event in proto_events(6):
            yield event.SerializeToString()
        await never.wait()  # the stream stays open

    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(record(six_then_silence()), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more than 5 events in one stream" in (info.value.details() or "")
    assert running.app.grpc_source.held_bytes == 0


def _spool_full(running: Running, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The spool refuses every write as full; the list counts the refusals (in its one item)."""
    refusals = [0]

    async def full(events: Sequence[PredictionEvent | object]) -> IntakeResult:
        refusals[0] += 1
        raise SpoolFullError("no space left on the spool's disk")

    monkeypatch.setattr(running.app.intake, "record", full)
    return refusals


def _chunks_kept() -> int:
    """Messages held in chunks by every ``Record`` stream alive (refused ones included)."""
    return sum(len(o.chunk) for o in gc.get_objects() if isinstance(o, _grpc_streams._Stream))


async def _stream_then_pause(
    messages: Sequence[bytes], more: asyncio.Event
) -> AsyncIterator[bytes]:
    for message in messages:
        yield message
    await more.wait()  # a producer that pauses with its stream open
    yield messages[0]


async def test_refused_streams_let_go_of_their_chunk_while_they_drain(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each refused stream kept its chunk (up to 1 MiB, parsed) outside the budget for 5 s."""
    running = await start_sidecar()
    refusals = _spool_full(running, monkeypatch)
    monkeypatch.setattr(_grpc_streams, "_STREAM_CHUNK", 10)  # a chunk of 10 goes, refused
    messages = [e.SerializeToString() for e in proto_events(40)]
    more = asyncio.Event()
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        streams = [_stream_then_pause(messages, more) for _ in range(8)]
        calls = [asyncio.ensure_future(record(stream)) for stream in streams]
        await eventually(lambda: refusals == [8])
        assert not any(call.done() for call in calls), "answered before the stream ended"
        assert _chunks_kept() == 0, "a refused stream holds its chunk while it drains"
        more.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        assert isinstance(result, grpc.aio.AioRpcError)
        assert result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(result.trailing_metadata() or ())
        assert (trailing[ACCEPTED_KEY], trailing[PROCESSED_KEY]) == ("0", "0")


def _refused(running: Running) -> int:
    return sum(running.app.intake.counters.refused_requests.values())


async def test_a_chunk_the_linger_could_not_spool_is_let_go_while_its_producer_pauses(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_sidecar()
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 0.05)
    refusals = _spool_full(running, monkeypatch)
    more = asyncio.Event()
    messages = [e.SerializeToString() for e in proto_events(5)]
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        call = asyncio.ensure_future(record(_stream_then_pause(messages, more)))
        await eventually(lambda: refusals == [1])
        await asyncio.sleep(0.1)
        assert _chunks_kept() == 0, "the refused chunk waits for the producer's next message"
        more.set()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(info.value.trailing_metadata() or ())
    assert (trailing[ACCEPTED_KEY], trailing[PROCESSED_KEY]) == ("0", "0")


async def test_a_stream_draining_when_the_sidecar_stops_gets_its_refusal_and_counts(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop's grace used to cancel the drain: UNAVAILABLE, and no counts to resume from."""
    monkeypatch.setattr(_grpc_streams, "MAX_EVENTS_PER_STREAM", 5)
    running = await start_sidecar(drain_timeout=10.0)
    never = asyncio.Event()
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        messages = [e.SerializeToString() for e in proto_events(6)]
        call = asyncio.ensure_future(record(_stream_then_pause(messages, never)))
        await eventually(lambda: _refused(running) == 1)
        await running.app.stop()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(call, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = dict(info.value.trailing_metadata() or ())
    assert PROCESSED_KEY in trailing


async def test_refused_requests_leave_no_cycle_holding_their_bytes(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a full spool every refused request kept its bytes until a cyclic GC pass.

    ``context.abort()`` (and the retry check's task) took the handler's
    frames into reference cycles; the sidecar runs the cyclic GC seldom.
    """
    running = await start_sidecar()
    size = 256 * 1024
    _spool_full(running, monkeypatch)
    event = proto_events(1)[0]
    event.attributes["blob"] = "x" * size
    malformed = b"\x0a" + b"\xff" * 10 + b"z" * size
    batches = [
        (malformed, grpc.StatusCode.INVALID_ARGUMENT),
        (sidecar_pb2.RecordBatchRequest(events=[event]).SerializeToString(), None),
        (
            sidecar_pb2.RecordBatchRequest(events=[event], batch_id=b"b-1").SerializeToString(),
            None,
        ),
    ]
    with CycleWatch() as watch:
        async with grpc.aio.insecure_channel(running.target) as channel:
            for body, code in batches:
                for _ in range(2):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await channel.unary_unary(RECORD_BATCH)(body)
                    assert info.value.code() == (code or grpc.StatusCode.RESOURCE_EXHAUSTED)
            record = channel.stream_unary(RECORD)
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await record(_stream([event.SerializeToString()] * 2))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert PROCESSED_KEY in dict(info.value.trailing_metadata() or ())
        await asyncio.sleep(0.1)
        assert watch.frames_holding(size) == []


async def test_a_stream_the_linger_found_refused_leaves_no_cycle_holding_its_next_message(
    start_sidecar: StartSidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sweeper's refusal, raised again from a local, held the message just read in a cycle."""
    running = await start_sidecar()
    monkeypatch.setattr(_grpc_streams, "STREAM_LINGER_S", 0.05)
    size = 256 * 1024
    _spool_full(running, monkeypatch)
    big_event = proto_events(1)[0]
    big_event.attributes["blob"] = "x" * size

    async def pause_then_big() -> AsyncIterator[bytes]:
        yield proto_events(1)[0].SerializeToString()
        await asyncio.sleep(0.5)  # the sweeper spools that chunk meanwhile: refused
        yield big_event.SerializeToString()

    with CycleWatch() as watch:
        async with grpc.aio.insecure_channel(running.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.stream_unary(RECORD)(pause_then_big())
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        await asyncio.sleep(0.1)
        assert watch.frames_holding(size) == []


# -- F4: one unreadable event does not cost its batch --------------------------------


def _field1(event: bytes) -> bytes:
    """``event`` as one ``RecordBatchRequest.events`` entry (field 1, length-delimited)."""
    return b"\x0a" + encode_varint(len(event)) + event


async def test_an_event_with_invalid_utf8_is_rejected_alone_not_its_whole_batch(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    events = [e.SerializeToString() for e in proto_events(100)]
    bad = proto_events(1, 500)[0]
    bad.endpoint = "/v2/models/ZZZZ/infer"
    events.insert(50, bad.SerializeToString().replace(b"ZZZZ", b"ch\xe9r"))  # a latin-1 byte
    corrupt = b"\x0a\x05ab"  # its prediction_id runs past its end
    events.insert(70, corrupt)
    packed = pack_events(plain_events(3, 200))
    request = b"".join(_field1(e) for e in events) + b"\x12" + encode_varint(len(packed)) + packed
    async with grpc.aio.insecure_channel(running.target) as channel:
        raw = channel.unary_unary(
            RECORD_BATCH, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await raw(request)
    assert (ack.accepted, ack.read_packed) == (103, True)
    assert [(r.index, r.prediction_id, r.reason) for r in ack.rejected] == [
        (50, "p00500", "invalid UTF-8 in a string field"),
        (70, "", "malformed PredictionEvent"),
    ]
    assert running.app.intake.counters.rejected == 2
    await eventually(lambda: len(running.collector.events()) == 103)
    delivered = [e.prediction_id for e in running.collector.events()]
    assert delivered == [f"p{i:05d}" for i in (*range(100), 200, 201, 202)]


async def test_a_refused_batch_of_a_million_tiny_fields_is_split_by_protobufs_parser(
    start_sidecar: StartSidecar,
) -> None:
    # A split (or an id read) field by field in Python held the event loop
    # for about a second on such a request; protobuf's C parser skips the
    # unknown fields (api_implementation: the parser the sidecar relies on).
    assert api_implementation.Type() == "upb"
    running = await start_sidecar()
    good, bad = proto_events(2, 600)
    bad.endpoint = "ZZZZ"
    broken = bad.SerializeToString().replace(b"ZZZZ", b"\xff\xfe\xfd\xfc")
    noise = b"\x80\x01\x00" * 600_000  # field 16 = 0, over and over: unknown fields
    request = _field1(good.SerializeToString()) + noise + _field1(broken + noise[: 3 * 300_000])
    async with grpc.aio.insecure_channel(running.target) as channel:
        raw = channel.unary_unary(
            RECORD_BATCH, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await raw(request)
    assert ack.accepted == 1
    assert [(r.index, r.prediction_id, r.reason) for r in ack.rejected] == [
        (1, "p00601", "invalid UTF-8 in a string field")
    ]


@pytest.mark.parametrize(
    ("request_bytes", "cause"),
    [
        (b"\x0a\x05ab", "field 1 at byte 0 runs past the end of the request (4 bytes)"),
        (
            _field1(b"") + b"\x09\x01\x02",
            "field 1 at byte 2 runs past the end of the request (5 bytes)",
        ),
        (b"\x0e", "unsupported wire type 6 at byte 0"),
        (b"\x02\x00", "field number 0 at byte 0"),
        (_field1(b"") + b"\x0a\x80", "truncated or overlong varint at byte 2"),
    ],
    ids=["cut short", "fixed64 cut short", "wire type 6", "field 0", "truncated length"],
)
async def test_a_request_malformed_otherwise_is_refused_whole_naming_the_cause(
    start_sidecar: StartSidecar, request_bytes: bytes, cause: str
) -> None:
    running = await start_sidecar()
    async with grpc.aio.insecure_channel(running.target) as channel:
        raw = channel.unary_unary(RECORD_BATCH)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw(request_bytes)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == f"malformed RecordBatchRequest: {cause}"
    assert running.app.spool.stats().records == 0


async def test_a_stream_message_with_invalid_utf8_is_rejected_naming_why(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar()
    bad = proto_events(1, 7)[0]
    bad.endpoint = "ZZZZ"
    messages = [bad.SerializeToString().replace(b"ZZZZ", b"\xff\xfe\xfd\xfc"), b"\xff\xff"]
    async with grpc.aio.insecure_channel(running.target) as channel:
        record = channel.stream_unary(
            RECORD, response_deserializer=sidecar_pb2.RecordAck.FromString
        )
        ack = await record(_stream(messages))
    assert [(r.index, r.prediction_id, r.reason) for r in ack.rejected] == [
        (0, "p00007", "invalid UTF-8 in a string field"),
        (1, "", "malformed PredictionEvent"),
    ]


# -- F9: whole-request refusals are counted ------------------------------------------


async def _refused_requests(running: Running) -> dict[str, float]:
    url = f"http://{running.app.addresses['metrics']}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        text = await resp.text()
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "predtrace_sidecar_refused_requests"
        for sample in family.samples
    }


async def test_requests_refused_whole_are_counted_by_reason_on_metrics(
    start_sidecar: StartSidecar,
) -> None:
    running = await start_sidecar(metrics_listen="127.0.0.1:0", max_events_per_request=10)
    assert await _refused_requests(running) == {
        "malformed": 0,
        "too_many_events": 0,
        "bad_packed_events": 0,
        "bad_batch_id": 0,
    }
    async with grpc.aio.insecure_channel(running.target) as channel:
        raw = channel.unary_unary(RECORD_BATCH)
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        refused = [
            raw(b"\xff\xff\xff\xff not protobuf"),
            stub.RecordBatch(sidecar_pb2.RecordBatchRequest(events=proto_events(11))),
            stub.RecordBatch(sidecar_pb2.RecordBatchRequest(packed_events=b"\x92\x80")),
            stub.RecordBatch(
                sidecar_pb2.RecordBatchRequest(packed_events=msgpack.packb([{1: "p"}] * 11))
            ),
            stub.RecordBatch(
                sidecar_pb2.RecordBatchRequest(events=proto_events(1), batch_id=b"b" * 65)
            ),
        ]
        for call in refused:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _refused_requests(running) == {
        "malformed": 1,
        "too_many_events": 2,
        "bad_packed_events": 1,
        "bad_batch_id": 1,
    }
    assert running.app.intake.counters.received == 0, "no event of them was read"

"""RELIABILITY rows 7, 17, 18, 19, 28, 29, 30 against a running collector."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgpack
import pytest

from predtrace.collector import (
    PARTS,
    CollectorConfig,
    build_app,
    hash_token,
    new_token,
    start_collector,
)
from predtrace.collector.store import SqliteOptions, open_store
from predtrace.collector.testing import ChainedProducer, make_events
from predtrace.sidecar.pipeline import PermanentExportError
from predtrace.sidecar.pipeline._collector_http import CollectorClient, CollectorClientConfig
from predtrace.wire import EventBatch, encode_events_payload, gzip_bytes

from .conftest import Post, Start

SEED = 20261128


def _count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM predictions").fetchone()[0])


async def test_row7_duplicates_and_out_of_order_batches_store_each_seq_once(
    start: Start, post: Post, tmp_path: Path
) -> None:
    print("seed", SEED)
    collector = await start()
    producer = ChainedProducer("edge-7")
    bodies = [producer.body(make_events(10)) for _ in range(5)]
    order = [4, 2, 0, 2, 1, 4, 3, 0]  # out of order, with redeliveries
    answers = [await post(collector, bodies[i]) for i in order]
    assert all(a.status == 200 for a in answers)
    assert [a.ack.duplicate for a in answers if a.ack] == [
        False,
        False,
        False,
        True,
        False,
        True,
        False,
        True,
    ]
    assert all(a.ack and a.ack.accepted == 10 for a in answers)
    assert _count(tmp_path / "c.db") == 50
    report = await collector.runner.app[PARTS].store.producer("edge-7")
    assert report is not None and report["batches"] == 5 and report["chain_breaks"] == 0


async def test_row7_a_reused_seq_with_other_bytes_is_refused_409_never_acked(
    start: Start, post: Post, tmp_path: Path
) -> None:
    collector = await start()
    first = ChainedProducer("edge-7").body(make_events(10))
    reused = ChainedProducer("edge-7").body(make_events(4))  # seq 1 again, other events
    assert (await post(collector, first)).status == 200
    answer = await post(collector, reused)
    assert answer.status == 409 and answer.ack is None
    assert "seq 1 of producer 'edge-7' was stored before with other content" in answer.text
    again = await post(collector, first)  # a plain redelivery is still a duplicate
    assert again.status == 200 and again.ack is not None and again.ack.duplicate
    assert _count(tmp_path / "c.db") == 10
    report = await collector.runner.app[PARTS].store.producer("edge-7")
    assert report is not None
    assert [e["kind"] for e in report["chain_events"]] == ["seq_reused"]  # type: ignore[attr-defined]


def _version_body(events: list[dict[int, object]], extra: dict[int, object]) -> bytes:
    batch: dict[int, object] = {0: [1, 0], 1: "p", 2: 1, 6: events}
    batch.update(extra)
    return msgpack.packb(batch)  # type: ignore[no-any-return]


MALFORMED = {
    "truncated": encode_events_payload(EventBatch("p", 1, make_events(3)))[:-7],
    "extra data": encode_events_payload(EventBatch("p", 1, make_events(1))) + b"\x00",
    "not a map": msgpack.packb([1, 2, 3]),
    "wrong types": msgpack.packb({0: [1, 0], 1: 42, 2: "one", 6: []}),
    "deep nesting": b"\x91" * 100_000 + b"\x00",
    "huge declared string": b"\x83\x00\x92\x01\x00\x01\xdb\xff\xff\xff\xf0abc",
    "huge declared array": b"\x83\x00\x92\x01\x00\x01\xa1p\x06\xdd\xff\xff\xff\xff",
    "other major version": msgpack.packb({0: [2, 0], 1: "p", 2: 1, 6: []}),
    "not gzip after all": b"\x1f\x8bnot really gzip",
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
async def test_row17_malformed_msgpack_is_refused_with_a_reason_and_good_batches_flow(
    start: Start, post: Post, kind: str
) -> None:
    collector = await start()
    answer = await post(collector, MALFORMED[kind])
    assert answer.status == 400, answer
    assert answer.text and len(answer.text) < 300
    good = await post(collector, ChainedProducer("q").body(make_events(2)))
    assert good.status == 200 and good.ack is not None and good.ack.accepted == 2


async def test_row18_oversized_body_is_413_before_it_is_read(start: Start, post: Post) -> None:
    collector = await start(max_body_bytes=64 * 1024, max_inflight_bytes=1024 * 1024)
    answer = await post(collector, b"\x00" * (200 * 1024))
    assert answer.status == 413 and "exceeds" in answer.text


async def test_row18_oversized_chunked_body_is_413(start: Start, post: Post) -> None:
    collector = await start(max_body_bytes=64 * 1024, max_inflight_bytes=1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\x00" * 16 * 1024

    answer = await post(collector, chunks())
    assert answer.status == 413


async def test_a_refused_chunked_body_gives_back_every_reserved_byte(
    start: Start, post: Post
) -> None:
    collector = await start(max_body_bytes=64 * 1024, max_inflight_bytes=1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\x00" * 16 * 1024

    for _ in range(3):
        assert (await post(collector, chunks())).status == 413
    assert collector.runner.app[PARTS].budget.used == 0


async def test_stalled_uploads_time_out_408_and_never_block_other_producers(
    start: Start, post: Post
) -> None:
    collector = await start(
        max_body_bytes=64 * 1024, max_inflight_bytes=512 * 1024, body_timeout_s=1.0
    )
    host, port = collector.url.removeprefix("http://").rsplit(":", 1)
    stalled = []
    for _ in range(8):  # each declares a full body and sends two bytes of it
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /v1/batches HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n"
            b"Content-Type: application/vnd.predtrace.batch+msgpack\r\n\r\n\x81\x00"
        )
        await writer.drain()
        stalled.append((reader, writer))
    try:
        answer = await post(collector, ChainedProducer("p").body(make_events(3)))
        assert answer.status == 200, answer.text
        for reader, _ in stalled:
            status_line = await asyncio.wait_for(reader.readline(), 10)
            assert status_line.split()[1] == b"408", status_line
    finally:
        for _, writer in stalled:
            writer.close()
    assert collector.runner.app[PARTS].budget.used == 0


async def test_row18_gzip_bomb_is_413_and_the_producer_treats_it_as_permanent(
    start: Start, post: Post
) -> None:
    collector = await start(max_decompressed_bytes=1024 * 1024)
    bomb = gzip_bytes(b"\x00" * (50 * 1024 * 1024), 9)
    assert len(bomb) < 100 * 1024
    answer = await post(collector, bomb, **{"Content-Encoding": "gzip"})
    assert answer.status == 413 and "decompressed" in answer.text
    client = CollectorClient(CollectorClientConfig(url=collector.url))
    try:
        with pytest.raises(PermanentExportError, match="413"):
            await client.send(bomb, compressed=True)
    finally:
        await client.close()


async def test_row19_schema_drift_unknown_fields_newer_minor_and_one_bad_event(
    start: Start, post: Post
) -> None:
    collector = await start()
    events: list[dict[int, object]] = [
        {1: "a", 99: "a field from the future", 6: {1: "m", 2: "1", 42: "x"}},
        {2: b"\x01" * 16},  # no prediction_id: only this one is rejected
        {1: "c", 4: 2**64 - 1},  # beyond int64: the store cannot hold it
        {1: "d"},
    ]
    answer = await post(collector, _version_body(events, {0: [1, 7], 77: "new batch key"}))
    assert answer.status == 200 and answer.ack is not None
    assert answer.ack.accepted == 2
    assert [(r.index, r.prediction_id) for r in answer.ack.rejected] == [(1, ""), (2, "c")]
    assert "prediction_id" in answer.ack.rejected[0].reason


async def test_row28_store_failure_answers_503_never_200_and_recovers(
    start: Start, post: Post, tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/c.db", sqlite=SqliteOptions(busy_timeout=0.05))
    config = CollectorConfig(db=f"sqlite:///{tmp_path}/c.db", listen="127.0.0.1:0")
    running = await start_collector(config, app=build_app(config, store=store))
    try:
        body = ChainedProducer("p").body(make_events(3))
        locker = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            answer = await post(running, body)
            assert answer.status == 503 and answer.headers.get("Retry-After") == "1"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert _count(tmp_path / "c.db") == 0
        again = await post(running, body)
        assert again.status == 200 and again.ack is not None and not again.ack.duplicate
        assert _count(tmp_path / "c.db") == 3
    finally:
        await running.stop()


async def test_row29_in_flight_byte_cap_answers_503_and_later_batches_flow(
    start: Start, session: aiohttp.ClientSession
) -> None:
    collector = await start(max_body_bytes=64 * 1024, max_inflight_bytes=128 * 1024)
    parts = collector.runner.app[PARTS]
    release = asyncio.Event()
    producer = ChainedProducer("big")
    bodies = [producer.body(make_events(300)) for _ in range(2)]
    assert all(40 * 1024 < len(b) <= 64 * 1024 for b in bodies)

    async def stalled(body: bytes) -> AsyncIterator[bytes]:
        yield body[:-1024]  # what arrived is what is reserved
        await release.wait()
        yield body[-1024:]

    async def send(body: bytes, stall: bool) -> int:
        data = stalled(body) if stall else body
        headers = {"Content-Length": str(len(body))}
        async with session.post(f"{collector.url}/v1/batches", data=data, headers=headers) as resp:
            await resp.read()
            return resp.status

    first = [asyncio.create_task(send(b, stall=True)) for b in bodies]
    held = sum(len(b) - 1024 for b in bodies)
    for _ in range(200):  # both stalled requests hold what they sent
        if parts.budget.used >= held:
            break
        await asyncio.sleep(0.01)
    third = ChainedProducer("x").body(make_events(300))
    assert parts.budget.used + len(third) > parts.budget.cap  # the setup overflows the cap
    overloaded = await send(third, stall=False)
    assert overloaded == 503
    assert parts.budget.used <= parts.budget.cap
    release.set()
    # Each batch's rows are charged too (more than this small cap): the two
    # decode one after the other, and one may be told 503 meanwhile. A
    # sender retries that (same seq: stored once), as the sidecar does.
    answers = await asyncio.gather(*first)
    assert 200 in answers and set(answers) <= {200, 503}
    for body, answer in zip(bodies, answers, strict=True):
        if answer == 503:
            assert await send(body, stall=False) == 200
    assert parts.budget.used == 0
    assert await send(ChainedProducer("y").body(make_events(5)), stall=False) == 200


async def test_row30_tokens_scopes_and_producer_binding_never_echo_the_token(
    start: Start, post: Post, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ingest, read = new_token(), new_token()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nname = "edge"\nsha256 = "{hash_token(ingest)}"\n'
        'scopes = ["ingest"]\nproducers = ["edge-*"]\n'
        f'[[token]]\nname = "oncall"\nsha256 = "{hash_token(read)}"\nscopes = ["read"]\n'
    )
    collector = await start(tokens_file=str(tokens))
    good = ChainedProducer("edge-1").body(make_events(1))
    answers = {
        "missing": await post(collector, good),
        "wrong": await post(collector, good, token=ingest + "tampered"),
        "scope": await post(collector, good, token=read),
        "producer": await post(
            collector, ChainedProducer("pod-1").body(make_events(1)), token=ingest
        ),
        "ok": await post(collector, good, token=ingest),
    }
    assert {k: a.status for k, a in answers.items()} == {
        "missing": 401,
        "wrong": 401,
        "scope": 403,
        "producer": 403,
        "ok": 200,
    }
    for answer in answers.values():
        assert ingest not in answer.text and read not in answer.text
        assert ingest not in str(answer.headers)
    assert ingest not in caplog.text and read not in caplog.text


async def test_row30_a_producer_bound_token_sends_batches_but_never_writes_lineage(
    start: Start, post: Post, tmp_path: Path
) -> None:
    # An edge device's token could otherwise rewrite which run a model version
    # came from: lineage is registry evidence that no producer owns.
    edge, ci, admin = new_token(), new_token(), new_token()
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nname = "edge"\nsha256 = "{hash_token(edge)}"\n'
        'scopes = ["ingest"]\nproducers = ["edge-*"]\n'
        f'[[token]]\nname = "ci"\nsha256 = "{hash_token(ci)}"\nscopes = ["ingest"]\n'
        f'[[token]]\nname = "ops"\nsha256 = "{hash_token(admin)}"\nscopes = ["admin"]\n'
        'producers = ["edge-*"]\n'
    )
    collector = await start(tokens_file=str(tokens))
    registration = {"model": {"name": "churn", "version": "3"}, "run": {"id": "r-1"}}
    run_event = {
        "eventType": "COMPLETE",
        "eventTime": "2026-11-29T10:00:00Z",
        "run": {"runId": "01890a5d-ac96-774b-b9aa-0bb2b3a4e8f1"},
        "job": {"namespace": "ci", "name": "train"},
        "producer": "https://example.invalid/ci",
    }

    async def write(path: str, body: object, token: str) -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{collector.url}{path}", json=body, headers=headers) as resp,
        ):
            return resp.status, await resp.text()

    for path, body in (("/v1/lineage", registration), ("/v1/openlineage", run_event)):
        status, text = await write(path, body, edge)
        assert status == 403, (path, text)
        assert "bound to producers" in text and edge not in text
    batch = ChainedProducer("edge-1").body(make_events(1))
    assert (await post(collector, batch, token=edge)).status == 200
    assert (await write("/v1/lineage", registration, ci))[0] == 201
    replace = {**registration, "run": {"id": "r-2"}}
    assert (await write("/v1/lineage?replace=true", replace, edge))[0] == 403
    assert (await write("/v1/lineage?replace=true", replace, admin))[0] == 201
    assert (await write("/v1/openlineage", run_event, ci))[0] in (200, 201, 202)


async def test_row17_seq_past_int64_is_400_and_the_writer_keeps_serving(
    start: Start, post: Post
) -> None:
    # A seq of 2**63 once passed the decoder and killed the SQLite writer thread,
    # after which every batch hung.
    collector = await start()
    producer = ChainedProducer("big-seq")
    producer.seq = 2**63 - 1  # body() numbers the next batch 2**63
    answer = await post(collector, producer.body(make_events(1)))
    assert answer.status == 400, answer
    assert "2**63" in answer.text
    good = await post(collector, ChainedProducer("after").body(make_events(2)))
    assert good.status == 200 and good.ack is not None and good.ack.accepted == 2

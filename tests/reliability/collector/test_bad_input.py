"""Bad input from the review probes: every case a 4xx with a reason, never a 500 or a 503."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import aiohttp
import msgpack
import pytest

from predtrace.collector import hash_token, new_token
from predtrace.collector.testing import make_events
from predtrace.wire import FORMAT_MAJOR, FORMAT_MINOR, event_to_map

from .conftest import Post, Start

DEEP = "[" * 100_000 + "]" * 100_000
LINEAGE_CASES = {
    "an integer metric of 400 digits": (
        '{"run": {"id": "r", "metrics": {"a": ' + "1" * 400 + "}}}"
    ),
    "JSON nested 100,000 deep": DEEP,
    "a lone surrogate in an id": '{"run": {"id": "\\ud800"}}',
    # Not JSON numbers (RFC 8259), though Python's json reads them: stored
    # as the ids "nan", "-inf" and "inf" before.
    "NaN as a version": '{"model": {"name": "m", "version": NaN}}',
    "-Infinity as a run id": '{"run": {"id": -Infinity}}',
    "1e400 as a version": '{"model": {"name": "m", "version": 1e400}}',
    "Infinity as a run name": '{"run": {"id": "r", "name": Infinity}}',
    "a float as a version (1.10 would read 1.1)": '{"model": {"name": "m", "version": 1.10}}',
    "NaN where the registration reads nothing": '{"run": {"id": "r"}, "note": NaN}',
}


@pytest.mark.parametrize("case", list(LINEAGE_CASES))
async def test_bad_lineage_bodies_are_400_with_a_reason(
    start: Start, session: aiohttp.ClientSession, case: str
) -> None:
    collector = await start()
    body = LINEAGE_CASES[case].encode()
    headers = {"Content-Type": "application/json"}
    async with session.post(f"{collector.url}/v1/lineage", data=body, headers=headers) as resp:
        assert resp.status == 400, (case, resp.status, await resp.text())
        assert await resp.text()


async def test_an_integer_too_long_to_read_is_named_as_such_not_as_bad_json(
    start: Start, session: aiohttp.ClientSession
) -> None:
    collector = await start()
    body = ('{"run": {"id": "r", "metrics": {"a": ' + "9" * 5000 + "}}}").encode()
    headers = {"Content-Type": "application/json"}
    async with session.post(f"{collector.url}/v1/lineage", data=body, headers=headers) as resp:
        assert resp.status == 400
        assert "more than 4000 digits" in await resp.text()


async def test_a_commit_shorter_than_an_abbreviation_is_found_exactly(
    start: Start, session: aiohttp.ClientSession
) -> None:
    # Registration stores any commit name an OpenLineage source gives; impact
    # refused every name under 7 characters, so such a commit was never found.
    collector = await start()
    registration = {"model": {"name": "m", "version": "1"}, "run": {"id": "r"}}
    async with session.post(
        f"{collector.url}/v1/lineage", json={**registration, "commit": {"sha": "v1.2"}}
    ) as resp:
        assert resp.status == 201, await resp.text()
    for given, status in (("V1.2", 200), ("v1", 404)):
        async with session.get(f"{collector.url}/v1/impact", params={"commit": given}) as resp:
            assert resp.status == status, (given, await resp.text())
            if status == 200:
                assert (await resp.json())["runs"] == ["r"]


async def test_an_unknown_charset_is_read_as_utf8_not_a_500(
    start: Start, session: aiohttp.ClientSession
) -> None:
    collector = await start()
    body = json.dumps({"run": {"id": "run-1"}}).encode()
    headers = {"Content-Type": "application/json; charset=bogus-xyz"}
    async with session.post(f"{collector.url}/v1/lineage", data=body, headers=headers) as resp:
        assert resp.status == 201, await resp.text()


async def test_a_token_that_is_not_utf8_is_401_not_a_500(start: Start, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nsha256 = "{hash_token(new_token())}"\nscopes = ["read"]\n')
    collector = await start(tokens_file=str(tokens))
    host, port = collector.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /v1/producers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
        b"Connection: close\r\n\r\n"
    )
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1] == b"401", status_line


def _batch(producer: str, seq: int, events: list[dict[int, object]]) -> bytes:
    return msgpack.packb(  # type: ignore[no-any-return]
        {0: [FORMAT_MAJOR, FORMAT_MINOR], 1: producer, 2: seq, 6: events}
    )


async def test_the_last_valid_seq_is_stored_not_refused_for_ever(start: Start, post: Post) -> None:
    collector = await start()
    event = event_to_map(make_events(1)[0])
    answer = await post(collector, _batch("p", 2**63 - 1, [event]))
    assert answer.status == 200 and answer.ack is not None and answer.ack.accepted == 1


async def test_a_producer_id_with_nul_is_400(start: Start, post: Post) -> None:
    collector = await start()
    answer = await post(collector, _batch("edge\x007", 1, [event_to_map(make_events(1)[0])]))
    assert answer.status == 400 and "NUL" in answer.text


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
async def test_a_non_finite_output_score_is_left_out_and_the_event_stored(
    start: Start, post: Post, session: aiohttp.ClientSession, bad: float
) -> None:
    # NaN is how ML code says "missing" (FORMAT.md): the value goes, the event stays.
    collector = await start()
    good, worse = (event_to_map(e) for e in make_events(2))
    worse[15] = {1: "x", 2: bad}
    answer = await post(collector, _batch("p", 1, [good, worse]))
    assert answer.status == 200 and answer.ack is not None
    assert (answer.ack.accepted, list(answer.ack.rejected)) == (2, [])
    async with session.get(f"{collector.url}/v1/predictions/{worse[1]}") as resp:
        assert resp.status == 200
        (stored,) = (await resp.json())["predictions"]
    assert stored["output"]["label"] == "x"
    assert stored["output"].get("score") is None


async def test_oversized_request_lines_are_400s_logged_as_one_line_not_tracebacks(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    collector = await start()
    host, port = collector.url.removeprefix("http://").rsplit(":", 1)
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    for _ in range(5):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        assert status_line.split()[1] == b"400", status_line
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert not [r for r in server if r.exc_info or r.levelno >= logging.ERROR]
    # At most one line a second per process (an earlier test's may hold the window).
    assert len(server) <= 1, "five in a second: one line at most, the rest counted"
    assert all("answered 400, Got more than 8190" in r.getMessage() for r in server)

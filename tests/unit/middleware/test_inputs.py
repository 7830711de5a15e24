"""Request-side helpers: bounded body read and replay, fingerprint, features, id echo."""

from __future__ import annotations

import hmac
import json
from typing import Any

import pytest

from predtrace.middleware._inputs import (
    BodyTee,
    body_caller_id,
    fingerprint,
    inject_oip_id,
    is_utf8_json,
    new_hmac,
    read_rest,
    replay,
    request_features,
    with_content_length,
)
from predtrace.middleware._json_codec import NOT_JSON, parse_json

KEY = new_hmac(b"k" * 16)


def _messages(*chunks: bytes) -> list[dict[str, Any]]:
    return [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]


async def test_read_rest_collects_chunks_and_replay_returns_them_then_calls_through() -> None:
    pending = _messages(b"ab", b"cd", b"ef")
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    first = await receive()
    read = await read_rest(first, receive, limit=100)
    assert read.body == b"abcdef" and len(read.messages) == 3
    replayed = replay(read.messages, receive)
    assert [(await replayed())["body"] for _ in range(3)] == [b"ab", b"cd", b"ef"]
    assert (await replayed())["type"] == "http.disconnect"  # the server's own receive again
    assert calls == 4


async def test_read_rest_stops_at_the_bound_and_keeps_what_it_read_for_the_app() -> None:
    pending = _messages(b"x" * 10, b"y" * 10, b"z" * 10)

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    read = await read_rest(await receive(), receive, limit=15)
    assert read.body is None and [m["body"] for m in read.messages] == [b"x" * 10, b"y" * 10]
    assert len(pending) == 1  # the rest is left for the app to read


async def test_disconnect_while_reading_is_passed_on() -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    read = await read_rest(_messages(b"a", b"b")[0], receive, limit=100)
    assert read.body is None and read.messages[-1]["type"] == "http.disconnect"


@pytest.mark.parametrize(
    ("chunks", "limit", "expected"),
    [
        ([b"ab", b"cd", b"ef"], 6, b"abcdef"),
        ([b"whole"], 5, b"whole"),
        ([b""], 0, b""),
        ([b"ab", b"cd", b"ef"], 5, None),  # over the bound: no copy
    ],
)
async def test_the_tee_copies_what_the_app_reads_up_to_its_bound(
    chunks: list[bytes], limit: int, expected: bytes | None
) -> None:
    pending = _messages(*chunks)

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    tee = BodyTee(receive, limit)
    read = [await tee.receive() for _ in chunks]
    assert [m["body"] for m in read] == chunks  # the app gets every message as it was
    assert tee.body == expected


async def test_the_tee_keeps_nothing_of_a_body_cut_by_a_disconnect_or_not_read_whole() -> None:
    pending = [*_messages(b"ab", b"cd")[:1], {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return pending.pop(0)

    tee = BodyTee(receive, 100)
    await tee.receive()
    assert tee.body is None  # only part of it read so far
    assert (await tee.receive())["type"] == "http.disconnect"
    assert tee.body is None


def test_fingerprint_is_keyed_hmac_of_canonical_json() -> None:
    a = fingerprint(KEY, parse_json(b'{"b": 1, "a": [1, 2]}'), b"", "http")
    b = fingerprint(KEY, parse_json(b'{"a":[1,2],"b":1}'), b"", "http")
    assert a == b == hmac.digest(b"k" * 16, b'{"a":[1,2],"b":1}', "sha256")
    other_key = fingerprint(new_hmac(b"j" * 16), parse_json(b'{"a":[1,2],"b":1}'), b"", "http")
    assert other_key != a


def test_oip_request_id_is_not_part_of_the_input() -> None:
    with_id = fingerprint(KEY, {"id": "1", "inputs": []}, b"", "oip-v2-rest")
    without = fingerprint(KEY, {"inputs": []}, b"", "oip-v2-rest")
    assert with_id == without
    assert fingerprint(KEY, {"id": "1"}, b"", "http") != fingerprint(KEY, {}, b"", "http")


def test_non_json_body_is_fingerprinted_raw_and_unencodable_values_give_nothing() -> None:
    assert parse_json(b"\xff\xfe") is NOT_JSON and parse_json(b"") is NOT_JSON
    assert fingerprint(KEY, NOT_JSON, b"raw", "http") == hmac.digest(b"k" * 16, b"raw", "sha256")
    assert fingerprint(KEY, object(), b"", "http") == b""


def test_deeply_nested_json_does_not_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    parsed = parse_json(deep)
    assert fingerprint(KEY, parsed, deep, "http") != b""


def test_body_caller_id_accepts_only_printable_bounded_text() -> None:
    assert body_caller_id({"id": "req-1"}) == "req-1"
    assert body_caller_id({"id": "has space"}) is None
    assert body_caller_id({"id": "x" * 257}) is None
    assert body_caller_id({"id": 5}) is None and body_caller_id([1]) is None


def test_features_come_only_from_the_allow_list_and_only_numbers() -> None:
    oip = {
        "inputs": [
            {"name": "age", "data": [41]},
            {"name": "ssn", "data": [123456789]},
            {"name": "flag", "data": [True]},
            {"name": "nan", "data": [float("nan")]},
            {"name": "name", "data": ["Alice"]},
        ]
    }
    allowed = frozenset({"age", "flag", "nan", "name"})
    assert request_features(oip, "oip-v2-rest", allowed) == {"age": 41.0}
    kserve = {"instances": [{"age": 3, "ssn": 1}]}
    assert request_features(kserve, "kserve-v1", frozenset({"age"})) == {"age": 3.0}
    assert request_features({"age": 2, "x": 1}, "http", frozenset({"age"})) == {"age": 2.0}
    assert request_features(oip, "oip-v2-rest", frozenset()) == {}


@pytest.mark.parametrize(
    "body",
    [
        {"instances": [[41, 5]], "age": 99},
        {"instances": [], "age": 99},
        {"instances": "rows", "age": 99},
        {"instances": [{"x": 1}], "age": 99},
    ],
)
def test_kserve_features_come_from_the_first_instance_never_from_the_body_around_it(
    body: dict[str, object],
) -> None:
    assert request_features(body, "kserve-v1", frozenset({"age"})) == {}


@pytest.mark.parametrize("name", [["x"], {"x": 1}, 7, None])
def test_a_tensor_name_that_is_not_a_string_is_skipped_not_an_error(name: object) -> None:
    # A client may send any JSON value as the name: a list or object is
    # unhashable and must not raise out of the allow-list check.
    oip = {"inputs": [{"name": name, "data": [1.0]}, {"name": "x", "data": [2.0]}]}
    assert request_features(oip, "oip-v2-rest", frozenset({"x"})) == {"x": 2.0}


def test_injected_id_keeps_the_rest_of_the_body_byte_for_byte() -> None:
    body = b'  { "inputs": [1, 2] }'
    out = inject_oip_id(body, {"inputs": [1, 2]}, "p-1")
    assert out == b'  {"id":"p-1", "inputs": [1, 2] }'
    assert json.loads(inject_oip_id(b"{}", {}, "p-2")) == {"id": "p-2"}
    assert json.loads(inject_oip_id(b"{}", {}, 'q"\\')) == {"id": 'q"\\'}


def test_content_length_is_replaced_not_duplicated() -> None:
    headers = [(b"host", b"h"), (b"content-length", b"3")]
    assert with_content_length(headers, 10) == [(b"host", b"h"), (b"content-length", b"10")]


def test_a_chunked_upload_given_a_length_loses_its_transfer_encoding() -> None:
    # The echoed id makes the body whole: HTTP forbids both framings on one message.
    headers = [(b"host", b"h"), (b"transfer-encoding", b"chunked"), (b"x-a", b"1")]
    out = with_content_length(headers, 12)
    assert out == [(b"host", b"h"), (b"x-a", b"1"), (b"content-length", b"12")]


def test_only_a_utf8_body_takes_the_injected_id() -> None:
    # The id is spliced in as UTF-8 bytes; a BOM in front of "{" is kept as it was.
    text = '{"inputs": []}'
    assert is_utf8_json(text.encode()) and is_utf8_json(text.encode("utf-8-sig"))
    for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"):
        assert not is_utf8_json(text.encode(encoding)), encoding
    bom = inject_oip_id(text.encode("utf-8-sig"), {"inputs": []}, "p-3")
    assert json.loads(bom) == {"id": "p-3", "inputs": []}

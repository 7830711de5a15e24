"""RELIABILITY rows 17, 29, 30: what a batch may cost a running collector before it is refused."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import msgpack
import pytest

from predtrace.collector import hash_token, new_token
from predtrace.wire import gzip_bytes

from .conftest import Post, Start


def _header(producer: bytes, keys: int) -> bytes:
    """A batch map of ``keys`` keys, its version, producer_id and seq 1 written."""
    return (
        bytes([0x80 | keys])
        + b"\x00\x92\x01\x00\x01"
        + bytes([0xA0 | len(producer)])
        + producer
        + b"\x02\x01"
    )


def _junk(mib: int) -> bytes:
    """Arrays of alternating empty maps and nils: a map per 2 bytes, some 36 bytes each built."""
    inner = b"\xdc\x04\x00" + b"\x80\xc0" * 512
    count = mib * 1024 * 1024 // len(inner)
    return b"\xdc" + count.to_bytes(2, "big") + inner * count


def _tokens(tmp_path: Path) -> tuple[str, str]:
    token = new_token()
    path = tmp_path / "tokens.toml"
    path.write_text(
        f'[[token]]\nname = "edge"\nsha256 = "{hash_token(token)}"\n'
        'scopes = ["ingest"]\nproducers = ["edge-*"]\n'
    )
    return token, str(path)


async def test_a_token_not_allowed_for_the_producer_id_is_refused_before_any_event_is_built(
    start: Start, post: Post, tmp_path: Path
) -> None:
    token, tokens = _tokens(tmp_path)
    collector = await start(tokens_file=tokens)
    # An event that cannot be decoded (a string that is not UTF-8): the
    # producer was checked only after the whole decode.
    events = b"\x06\x91\x81\x01\xa2\xff\xfe"
    foreign = await post(collector, _header(b"pod-1", 4) + events, token=token)
    assert foreign.status == 403 and "producer_id" in foreign.text, foreign
    own = await post(collector, _header(b"edge-1", 4) + events, token=token)
    assert own.status == 200 and own.ack is not None, own  # decoded: the event rejected alone
    (rejection,) = own.ack.rejected
    assert rejection.index == 0 and "malformed msgpack" in rejection.reason


async def test_values_under_unknown_batch_keys_cost_a_pass_over_their_bytes_not_their_decode(
    start: Start, post: Post, tmp_path: Path
) -> None:
    # A few KiB gzip'd, 4 MiB inflated, some 150 MB if built (the tester's
    # attack, 63 MiB inflated, took 2.6 GB), whether the token may send as
    # the producer or not.
    token, tokens = _tokens(tmp_path)
    collector = await start(tokens_file=tokens)
    junk = _junk(4)
    for producer, status in ((b"pod-1", 403), (b"edge-1", 200)):
        body = gzip_bytes(_header(producer, 5) + b"\x06\x90\x07" + junk)
        assert len(body) < 64 * 1024
        tracemalloc.start()
        try:
            answer = await post(collector, body, token=token, **{"Content-Encoding": "gzip"})
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert answer.status == status, answer
        assert peak < 2 * len(junk) + 4 * 1024 * 1024


def _batch_with(bad_event: dict[int, object]) -> bytes:
    good = [{1: f"good-{i}"} for i in range(5)]
    return msgpack.packb(
        {0: [1, 0], 1: "edge-1", 2: 1, 6: [good[0], bad_event, *good[1:]]}, use_bin_type=True
    )


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({1: "bad", 16: {"emb": [0.5] * 1536}}, "max_array_len"),  # an embedding as a feature
        ({1: "bad", 7: [{1: "m", 6: "r"}] * 1025}, "max_array_len"),  # past 1,024 models
        ({1: "bad", 20: b"\xff\xfe"}, ""),  # a new key of a later version: ignored, read
    ],
    ids=["embedding", "too-many-models", "unknown-key"],
)
async def test_an_event_past_its_own_bounds_is_rejected_alone_and_the_rest_stored(
    start: Start, post: Post, bad: dict[int, object], reason: str
) -> None:
    collector = await start()
    answer = await post(collector, _batch_with(bad))
    assert answer.status == 200, answer
    if not reason:
        assert answer.ack.accepted == 6
        return
    assert answer.ack.accepted == 5
    (rejection,) = answer.ack.rejected
    assert rejection.index == 1 and reason in rejection.reason

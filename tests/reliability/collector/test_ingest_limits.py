"""RELIABILITY rows 17, 29, 30: what a batch may cost a running collector before it is refused."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

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
    # An event that cannot be decoded (a string that is not UTF-8): was a 400
    # for it, the producer checked only after the whole decode.
    events = b"\x06\x91\x81\x01\xa2\xff\xfe"
    foreign = await post(collector, _header(b"pod-1", 4) + events, token=token)
    assert foreign.status == 403 and "producer_id" in foreign.text, foreign
    own = await post(collector, _header(b"edge-1", 4) + events, token=token)
    assert own.status == 400 and "malformed msgpack" in own.text, own


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

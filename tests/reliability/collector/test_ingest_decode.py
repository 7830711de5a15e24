"""Decoding a batch: which bodies leave the event loop, how many decode at once, what they cost."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import pytest

from predtrace.collector import PARTS, _budget, _ingest, _ingest_rows
from predtrace.collector.testing import ChainedProducer, make_events
from predtrace.wire import BatchHeader, DecodeLimits, gzip_bytes

from .conftest import Post, Start


async def _until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail after ``within_s`` seconds."""
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not reached within {within_s:g} s")


class SlowDecode:
    """``prepare`` that waits for ``go`` and records what it saw (runs in any thread)."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.threads: list[threading.Thread] = []
        self.bodies: list[bytes] = []
        self.running = self.peak = 0
        self._lock = threading.Lock()
        self._real = _ingest.prepare

    def __call__(
        self,
        body: bytes,
        limits: DecodeLimits,
        received_ns: int,
        header: BatchHeader | None = None,
    ) -> _ingest_rows._Prepared:
        with self._lock:
            self.threads.append(threading.current_thread())
            self.bodies.append(body)
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            self.go.wait(30)
            return self._real(body, limits, received_ns, header)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def slow_decode(monkeypatch: pytest.MonkeyPatch) -> SlowDecode:
    fake = SlowDecode()
    monkeypatch.setattr(_ingest, "prepare", fake)
    return fake


async def test_a_small_gzip_body_is_decoded_in_a_thread_never_on_the_event_loop(
    start: Start, post: Post, slow_decode: SlowDecode
) -> None:
    slow_decode.go.set()
    collector = await start()
    producer = ChainedProducer("p")
    plain = producer.body(make_events(3))
    gzipped = producer.body(make_events(3), compress=True)
    assert len(gzipped) < len(plain) < 64 * 1024  # both under the inline threshold
    assert (await post(collector, plain)).status == 200
    assert (await post(collector, gzipped, **{"Content-Encoding": "gzip"})).status == 200
    loop_thread = threading.current_thread()
    assert slow_decode.threads[0] is loop_thread  # a small plain body: cheaper inline
    assert slow_decode.threads[1] is not loop_thread  # what it inflates to is unknown


async def test_no_more_than_two_batches_are_decoded_at_once_however_many_arrive(
    start: Start, post: Post, slow_decode: SlowDecode
) -> None:
    collector = await start()
    decoding = collector.runner.app[PARTS].decoding
    bodies = [ChainedProducer(f"p{i}").body(make_events(3), compress=True) for i in range(6)]
    posts = [asyncio.create_task(post(collector, body)) for body in bodies]
    try:
        # Two decode, the four others queue for a slot (not for a pool thread).
        await _until(lambda: slow_decode.running == 2 and decoding.waiting == 4)
    finally:
        slow_decode.go.set()
    answers = await asyncio.gather(*posts)
    assert [a.status for a in answers] == [200] * 6
    assert slow_decode.peak == _budget.DECODES_AT_ONCE == 2


async def test_a_gzip_body_holds_its_decompressed_size_and_its_rows_of_the_in_flight_budget(
    start: Start, post: Post, slow_decode: SlowDecode
) -> None:
    collector = await start()
    budget = collector.runner.app[PARTS].budget
    body = ChainedProducer("p").body(make_events(300), compress=True)
    sent = asyncio.create_task(post(collector, body))
    try:
        await _until(lambda: slow_decode.running == 1)
        (inflated,) = slow_decode.bodies
        assert len(inflated) > 4 * len(body)  # the setup compresses well
        rows = _ingest_rows.decode_cost(len(inflated), 300)
        assert budget.used == len(body) + len(inflated) + rows
    finally:
        slow_decode.go.set()
    assert (await sent).status == 200
    assert budget.used == 0


async def test_a_gzip_body_that_inflates_past_the_in_flight_cap_is_stored_not_refused(
    start: Start, post: Post
) -> None:
    # A valid config (in-flight cap >= body cap) and a batch within the decoder's
    # limits: a permanent refusal here would make the sender quarantine it.
    collector = await start(max_body_bytes=64 * 1024, max_inflight_bytes=128 * 1024)
    payload = ChainedProducer("p").body(make_events(1000))
    assert len(payload) > 128 * 1024
    answer = await post(collector, gzip_bytes(payload), **{"Content-Encoding": "gzip"})
    assert answer.status == 200, answer
    assert collector.runner.app[PARTS].budget.used == 0
    assert (await post(collector, ChainedProducer("q").body(make_events(2)))).status == 200


async def test_a_body_gzipd_twice_is_400_and_never_inflated_again(start: Start, post: Post) -> None:
    collector = await start()
    twice = gzip_bytes(ChainedProducer("p").body(make_events(3), compress=True))
    answer = await post(collector, twice, **{"Content-Encoding": "gzip"})
    assert answer.status == 400 and "gzip'd twice" in answer.text, answer

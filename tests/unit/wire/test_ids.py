"""Prediction ids (UUIDv7) and parsing of the ids people paste."""

from __future__ import annotations

import os
import re
import select
import signal
import time
import types
import uuid

import pytest

from predtrace.wire import (
    InvalidIdError,
    UuidV7Generator,
    _ids,  # the module generator's internals
    classify_lookup_id,
    new_prediction_id,
    parse_prediction_id,
    parse_span_id,
    parse_trace_id,
    producer_id_base,
    restarted_producer_id,
    uuid7_timestamp_ms,
)


def test_new_ids_are_valid_uuid7_and_strictly_increasing() -> None:
    ids = [new_prediction_id() for _ in range(20_000)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_stay_ordered_when_the_clock_goes_back(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = UuidV7Generator()
    times = iter([5_000_000_000_000, 4_000_000_000_000, 4_000_000_000_000])
    monkeypatch.setattr("predtrace.wire._ids.time.time_ns", lambda: next(times))
    a, b, c = gen.new(), gen.new(), gen.new()
    assert a < b < c


def test_counter_overflow_borrows_the_next_millisecond(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = UuidV7Generator()
    monkeypatch.setattr("predtrace.wire._ids.time.time_ns", lambda: 7_000_000_000_000)
    ids = [gen.new() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_timestamp_is_readable_back() -> None:
    pid = new_prediction_id()
    ms = uuid7_timestamp_ms(pid)
    assert ms is not None
    assert abs(ms - uuid.UUID(pid).int.bit_length()) > 0
    assert uuid7_timestamp_ms("caller-id-1") is None
    assert uuid7_timestamp_ms(str(uuid.uuid4())) is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_never_repeats_the_parent_ids() -> None:
    gen_state_before = new_prediction_id()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        os.write(write_fd, "\n".join(new_prediction_id() for _ in range(100)).encode())
        os._exit(0)
    os.close(write_fd)
    parent_ids = {new_prediction_id() for _ in range(100)}
    with os.fdopen(read_fd, "rb") as pipe:
        child_ids = set(pipe.read().decode().split("\n"))
    os.waitpid(pid, 0)
    assert len(child_ids) == 100
    assert not parent_ids & child_ids
    assert gen_state_before not in child_ids


def test_parse_trace_id_accepts_hex_and_traceparent() -> None:
    hex_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    expected = bytes.fromhex(hex_id)
    assert parse_trace_id(hex_id) == expected
    assert parse_trace_id(hex_id.upper()) == expected
    assert parse_trace_id(f" 0x{hex_id} ") == expected
    assert parse_trace_id(f"00-{hex_id}-00f067aa0ba902b7-01") == expected


@pytest.mark.parametrize("bad", ["", "abc", "g" * 32, "0" * 32, "4bf92f3577b34da6a3ce929d0e0e47"])
def test_parse_trace_id_errors_say_what_is_expected(bad: str) -> None:
    with pytest.raises(InvalidIdError, match="trace id must"):
        parse_trace_id(bad)


def test_parse_span_id() -> None:
    assert parse_span_id("00f067aa0ba902b7") == bytes.fromhex("00f067aa0ba902b7")
    with pytest.raises(InvalidIdError, match="span id must be 16 hex digits"):
        parse_span_id("00f067aa")


def test_parse_prediction_id_normalises_uuids_and_keeps_caller_ids() -> None:
    u = "0190b7a2-3c4d-7e5f-8a9b-0c1d2e3f4a5b"
    assert parse_prediction_id(u.upper()) == u
    assert parse_prediction_id(u.replace("-", "")) == u
    assert parse_prediction_id("urn:uuid:" + u) == u
    assert parse_prediction_id("{" + u + "}") == u
    assert parse_prediction_id("req-42/a") == "req-42/a"


@pytest.mark.parametrize("bad", ["", "has space", "x" * 257, "tab\there"])
def test_parse_prediction_id_refuses_unprintable_or_long(bad: str) -> None:
    with pytest.raises(InvalidIdError):
        parse_prediction_id(bad)


def test_classify_lookup_id_returns_both_candidates_for_32_hex() -> None:
    hex_id = "0190b7a23c4d7e5f8a9b0c1d2e3f4a5b"
    trace, pred = classify_lookup_id(hex_id)
    assert trace == bytes.fromhex(hex_id)
    assert pred == str(uuid.UUID(hex_id))
    trace, pred = classify_lookup_id("req-42")
    assert trace is None
    assert pred == "req-42"
    with pytest.raises(InvalidIdError):
        classify_lookup_id("two words")


def test_a_restarted_producer_id_is_the_base_plus_six_hex_digits() -> None:
    once = restarted_producer_id("edge-7")
    assert re.fullmatch(r"edge-7-r[0-9a-f]{6}", once)
    assert once != restarted_producer_id("edge-7")
    assert producer_id_base(once) == "edge-7"
    assert producer_id_base("edge-7") == "edge-7"
    assert producer_id_base("edge-7-rnothex") == "edge-7-rnothex"


def _read_child_report(read_fd: int, timeout: float) -> bytes:
    """All the child writes to the pipe until it closes it, or what came before ``timeout``."""

    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([read_fd], [], [], left)
        if not ready:
            break
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _reap(pid: int, timeout: float) -> int:
    """Wait for the child; kill it if it is still there after ``timeout``. Its exit status."""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_reseeds_the_module_generator_right_after_the_fork(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Compares the random source itself, not ids that differ by their timestamp
    # anyway: the next 64 bits of the module generator's RNG, and the next id
    # under a frozen clock. Without the after-fork reseed, parent and child
    # hold the same generator state and both draws are equal, every time.

    gen = _ids._GENERATOR
    frozen_ns = time.time_ns()
    monkeypatch.setattr(_ids, "time", types.SimpleNamespace(time_ns=lambda: frozen_ns))
    # A known start for both sides (the one a reseed gives), put back after the test.
    monkeypatch.setattr(gen, "_last_ms", 0)
    monkeypatch.setattr(gen, "_counter", 0)
    rng = gen._rng
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report and leave, whatever happens; never back into pytest
        code = 1
        try:
            os.close(read_fd)
            os.write(write_fd, f"{rng.getrandbits(64)} {new_prediction_id()}".encode())
            code = 0
        finally:
            os._exit(code)
    try:
        os.close(write_fd)
        parent_bits, parent_id = rng.getrandbits(64), new_prediction_id()
        report = _read_child_report(read_fd, timeout=10.0)
    finally:
        os.close(read_fd)
        status = _reap(pid, timeout=10.0)
    assert os.waitstatus_to_exitcode(status) == 0, report
    child_bits, child_id = report.decode().split(" ")
    assert uuid7_timestamp_ms(child_id) == uuid7_timestamp_ms(parent_id)  # the frozen clock
    assert int(child_bits) != parent_bits
    assert child_id != parent_id  # only their random bits can tell them apart

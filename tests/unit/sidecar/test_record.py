"""Spool record framing and the scanner: checksums, resync, torn tails, limits."""

from __future__ import annotations

from predtrace.sidecar.spool import HEADER_SIZE, encode_record, scan

LIMIT = 1024


def _frames(n: int, start: int = 1) -> list[bytes]:
    return [encode_record(i, 1000 + i, f"payload-{i}".encode()) for i in range(start, start + n)]


def test_scan_returns_every_record_in_order_with_index_time_and_payload() -> None:
    data = b"".join(_frames(5))
    result = scan(data, expected_index=1, max_payload=LIMIT, final=True)
    assert [(r.index, r.ts_ns, r.payload) for r in result.records] == [
        (i, 1000 + i, f"payload-{i}".encode()) for i in range(1, 6)
    ]
    assert result.valid_end == len(data)
    assert (result.corrupt_regions, result.skipped, result.trailing_garbage) == (0, 0, 0)


def test_scan_of_a_partial_buffer_stops_before_the_incomplete_record() -> None:
    frames = _frames(3)
    data = b"".join(frames)[:-3]
    result = scan(data, expected_index=1, max_payload=LIMIT, final=False)
    assert [r.index for r in result.records] == [1, 2]
    assert result.consumed == len(frames[0]) + len(frames[1])
    assert result.trailing_garbage == 0


def test_scan_of_a_final_buffer_reports_a_torn_tail_as_trailing_garbage() -> None:
    frames = _frames(3)
    data = b"".join(frames)[:-3]
    result = scan(data, expected_index=1, max_payload=LIMIT, final=True)
    assert [r.index for r in result.records] == [1, 2]
    assert result.valid_end == len(frames[0]) + len(frames[1])
    assert result.trailing_garbage == len(frames[2]) - 3


def test_scan_skips_a_record_with_a_flipped_bit_and_counts_it() -> None:
    frames = _frames(5)
    data = bytearray(b"".join(frames))
    data[len(frames[0]) + len(frames[1]) + HEADER_SIZE + 2] ^= 0x01
    result = scan(bytes(data), expected_index=1, max_payload=LIMIT, final=True)
    assert [r.index for r in result.records] == [1, 2, 4, 5]
    assert (result.corrupt_regions, result.skipped) == (1, 1)


def test_scan_resyncs_after_a_corrupted_length_field() -> None:
    frames = _frames(4)
    data = bytearray(b"".join(frames))
    data[len(frames[0]) + 3] = 0xFF  # the length now claims far more than the limit
    result = scan(bytes(data), expected_index=1, max_payload=LIMIT, final=True)
    assert [r.index for r in result.records] == [1, 3, 4]
    assert result.skipped == 1


def test_scan_honours_skip_through_until_and_limits() -> None:
    data = b"".join(_frames(10))
    seek = scan(data, expected_index=1, max_payload=LIMIT, final=True, skip_through=4, until=7)
    assert [r.index for r in seek.records] == [5, 6, 7]
    capped = scan(data, expected_index=1, max_payload=LIMIT, final=True, max_records=2)
    assert [r.index for r in capped.records] == [1, 2]
    assert capped.consumed == capped.records[-1].end
    by_bytes = scan(data, expected_index=1, max_payload=LIMIT, final=True, max_bytes=1)
    assert len(by_bytes.records) == 1


def test_scan_counts_an_index_gap_as_skipped_records() -> None:
    data = b"".join(_frames(2, start=1) + _frames(2, start=6))
    result = scan(data, expected_index=1, max_payload=LIMIT, final=True)
    assert [r.index for r in result.records] == [1, 2, 6, 7]
    assert result.skipped == 3


def test_a_damaged_run_across_two_buffers_is_one_region() -> None:
    frames = [encode_record(i, i, bytes([i]) * 200) for i in range(1, 41)]
    data = bytearray(b"".join(frames))
    start = sum(len(f) for f in frames[:3])
    data[start : start + 3000] = bytes(3000)  # records 4 to about 30, zeroed
    head = scan(bytes(data[:2500]), expected_index=1, max_payload=LIMIT, final=False)
    assert [r.index for r in head.records] == [1, 2, 3]
    assert (head.corrupt_regions, head.ends_in_damage) == (1, True)
    tail = scan(
        bytes(data[head.consumed :]),
        expected_index=4,
        max_payload=LIMIT,
        final=True,
        continues_damage=True,
    )
    assert tail.corrupt_regions == 0  # the same run, counted once by the head
    assert tail.records[-1].index == 40
    alone = scan(bytes(data[head.consumed :]), expected_index=4, max_payload=LIMIT, final=True)
    assert alone.corrupt_regions == 1  # without the hint it would be a second region

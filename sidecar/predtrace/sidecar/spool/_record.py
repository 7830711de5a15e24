"""Spool records: one checksummed frame per event, and the scanner that reads them back.

A record is a 26-byte header and the payload (the event's msgpack map bytes,
encoded once at intake so the shipper assembles batches by concatenation)::

    0  2  magic a7 5c
    2  4  payload length (u32 LE)
    6  8  record index (u64 LE): global, gap-free when written
    14 8  spool time, unix ns (u64 LE): when the sidecar took the event
    22 4  CRC32C of bytes 2..22 and the payload (u32 LE)

The index in every header lets a reader count exactly how many records a
corrupt region held, and lets the high-water mark survive skipped records.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import google_crc32c

MAGIC: Final = b"\xa7\x5c"
HEADER_SIZE: Final = 26
_FIELDS: Final = struct.Struct("<IQQ")
_CRC: Final = struct.Struct("<I")
_HEADER: Final = struct.Struct("<2sIQQI")


def encode_record(index: int, ts_ns: int, payload: bytes) -> bytes:
    """Frame one payload as a spool record."""
    fields = _FIELDS.pack(len(payload), index, ts_ns)
    crc = google_crc32c.extend(google_crc32c.value(fields), payload)
    return b"".join((MAGIC, fields, _CRC.pack(crc), payload))


@dataclass(slots=True, frozen=True)
class Record:
    """One record read back from a segment."""

    index: int
    ts_ns: int
    payload: bytes
    end: int  # offset just after the record, relative to the scanned buffer


@dataclass(slots=True)
class ScanResult:
    """What a scan found in a buffer.

    ``valid_end`` is the offset after the last valid record (where a torn
    tail is cut); ``consumed`` where the next scan should start when the
    buffer was not final. ``corrupt_regions`` counts runs of bad bytes
    between valid records; ``skipped`` the record indexes those runs held.
    ``ends_in_damage``: the buffer ended inside a run of bad bytes, already
    counted, that the next buffer continues. ``at_limit``: a record was left
    for the next read by ``max_bytes`` or ``until``; ``resume_index`` is its
    index (the records missing before it are counted in ``skipped`` here).
    ``next_expected``: the index expected at ``consumed``, the one after the
    last record the scan passed, taken or skipped over (``skip_through``), or
    ``resume_index`` at a limit; ``expected_index`` when it found no record.
    A buffer whose records were all passed over still moves it on, so the next
    buffer does not count them as a gap.
    """

    records: list[Record]
    valid_end: int
    consumed: int
    corrupt_regions: int = 0
    skipped: int = 0
    trailing_garbage: int = 0
    ends_in_damage: bool = False
    at_limit: bool = False
    resume_index: int | None = None
    next_expected: int | None = None


def _parse_at(data: bytes, pos: int, max_payload: int) -> Record | int | None:
    """A valid record at ``pos``; an int (bytes needed) if incomplete; None if invalid."""
    if len(data) - pos < HEADER_SIZE:
        return HEADER_SIZE
    header: tuple[bytes, int, int, int, int] = _HEADER.unpack_from(data, pos)
    magic, length, index, ts_ns, crc = header
    if magic != MAGIC or length > max_payload:
        return None
    end = pos + HEADER_SIZE + length
    if end > len(data):
        return end - pos
    payload = data[pos + HEADER_SIZE : end]  # one copy, checked and then kept
    expected: int = google_crc32c.extend(google_crc32c.value(data[pos + 2 : pos + 22]), payload)
    if expected != crc:
        return None
    return Record(index, ts_ns, payload, end)


def scan(
    data: bytes,
    *,
    expected_index: int | None,
    max_payload: int,
    final: bool,
    max_records: int | None = None,
    max_bytes: int | None = None,
    skip_through: int = 0,
    until: int | None = None,
    taken_before: bool = False,
    continues_damage: bool = False,
) -> ScanResult:
    """Read records from ``data``, skipping corrupt regions.

    Args:
        data: bytes read from a segment, starting at a record boundary.
        expected_index: index of the first record, if known; gaps count as skipped.
        max_payload: the largest payload a valid record can have.
        final: ``data`` reaches the end of what is readable; an incomplete or
            invalid tail is then trailing garbage (a torn tail), not "more to read".
        max_records: stop after this many records.
        max_bytes: take no record that would bring the payloads past this many
            bytes (the first record of a read is taken whatever its size).
        skip_through: pass over records with an index <= this (a seek); they
            count toward nothing.
        until: stop before the first record with an index above this.
        taken_before: the caller already holds records of this read (so
            ``max_bytes`` applies to the first record here too).
        continues_damage: ``data`` starts inside a damaged region the previous
            buffer ended in (its ``ends_in_damage``), already counted there.
    """
    result = ScanResult([], 0, 0, next_expected=expected_index)
    pos, total = 0, 0
    while pos < len(data):
        if (max_records is not None and len(result.records) >= max_records) or (
            max_bytes is not None and total >= max_bytes
        ):
            break
        found = _parse_at(data, pos, max_payload)
        if isinstance(found, Record):
            if (until is not None and found.index > until) or (
                max_bytes is not None
                and (result.records or taken_before)
                and found.index > skip_through
                and total + len(found.payload) > max_bytes  # a cap: only a read's first may pass
            ):
                # The next read resumes at this record, past any damage this
                # scan counted since the last record it took (the records that
                # damage held count as skipped there, by the index gap).
                # Damage and lost records before it are counted here, with
                # the region they sit in; the next read expects this record.
                _count_gap(result, found, expected_index)
                result.consumed = pos
                result.at_limit = True
                result.resume_index = result.next_expected = found.index
                break
            _count_gap(result, found, expected_index)
            expected_index = result.next_expected = found.index + 1
            if found.index > skip_through:
                result.records.append(found)
                total += len(found.payload)
            pos = result.valid_end = result.consumed = found.end
            continue
        # Bad bytes at the very start of a buffer that continues a damaged
        # region belong to that region: counted once, by the buffer before.
        counted = not (continues_damage and pos == 0)
        nxt = _resync(data, pos + 1, max_payload)
        if nxt is not None:
            if counted:
                result.corrupt_regions += 1
            pos = nxt
            continue
        result.consumed = _stop(
            result, data, pos, invalid=found is None, final=final, limit=max_payload, count=counted
        )
        break
    return result


def _stop(
    result: ScanResult,
    data: bytes,
    pos: int,
    *,
    invalid: bool,
    final: bool,
    limit: int,
    count: bool,
) -> int:
    """Where to resume after the last valid record when nothing valid follows."""
    if final:
        result.trailing_garbage = len(data) - pos
        return len(data)
    # Any record starting before ``safe`` would lie whole in the buffer and
    # have been found, so those bytes are garbage; the rest may be a record
    # that the next, longer read completes.
    safe = len(data) - (HEADER_SIZE + limit)
    if invalid and safe > pos:
        if count:
            result.corrupt_regions += 1
        result.ends_in_damage = True
        return safe
    return pos


def _count_gap(result: ScanResult, record: Record, expected_index: int | None) -> None:
    if expected_index is not None and record.index > expected_index:
        result.skipped += record.index - expected_index


def _resync(data: bytes, start: int, max_payload: int) -> int | None:
    """Offset of the next complete valid record at or after ``start``."""
    pos = data.find(MAGIC, start)
    while pos != -1:
        if isinstance(_parse_at(data, pos, max_payload), Record):
            return pos
        pos = data.find(MAGIC, pos + 1)
    return None

"""Spool metadata files: the segment index and the two-slot state (high-water mark).

The index lists sealed segments so a restart need not rescan them; it is a
cache, rebuilt by scanning when missing or damaged (RELIABILITY rule 5). A
clean close lists the active segment too, so that records cut from its end
before the next start are counted, not taken for a torn write.

The state holds the high-water mark (every record index <= hwm is delivered)
and the shipper's own opaque bytes. It alternates between two slot files,
each checksummed and numbered: a torn or rotten write costs at most the
newest state, never all of it, and the older slot is only ever behind
(duplicates, never loss).
"""

from __future__ import annotations

import contextlib
import posixpath
import struct
from dataclasses import dataclass
from typing import Final

import google_crc32c
import msgpack

from predtrace.sidecar.spool._files import FaultPoints, FileLayer, write_whole

INDEX_NAME: Final = "index"
STATE_NAMES: Final = ("state.0", "state.1")
_INDEX_MAGIC: Final = b"PTIX1"
_STATE_MAGIC: Final = b"PTST1"
_FRAME: Final = struct.Struct("<5sII")  # magic, crc32c of the body, body length


def _frame(magic: bytes, body: bytes) -> bytes:
    return _FRAME.pack(magic, google_crc32c.value(body), len(body)) + body


def _unframe(magic: bytes, data: bytes) -> bytes | None:
    if len(data) < _FRAME.size:
        return None
    got_magic, crc, length = _FRAME.unpack_from(data)
    body = data[_FRAME.size : _FRAME.size + length]
    if got_magic != magic or len(body) != length or google_crc32c.value(body) != crc:
        return None
    return body


@dataclass(slots=True)
class SegmentMeta:
    """What the index remembers of a sealed segment (or of the active one, at a clean close)."""

    first: int
    last: int
    count: int
    size: int
    first_ts: int


def read_index(files: FileLayer, directory: str) -> dict[int, SegmentMeta] | None:
    """The index by first record index, or None when missing or damaged."""
    path = posixpath.join(directory, INDEX_NAME)
    try:
        body = _unframe(_INDEX_MAGIC, files.read(path, 0, files.size(path)))
        if body is None:
            return None
        rows = msgpack.unpackb(body, use_list=True, max_array_len=10_000_000)
        metas = [SegmentMeta(*(int(v) for v in row)) for row in rows]
    except (OSError, ValueError, TypeError, msgpack.UnpackException):
        return None
    return {m.first: m for m in metas}


def write_index(
    files: FileLayer, directory: str, metas: list[SegmentMeta], faults: FaultPoints
) -> None:
    """Write the index atomically: temporary file, fsync, rename, fsync the directory.

    Raises:
        OSError: the index could not be written; the temporary file is gone
            and the previous index, if any, is still in place.
    """
    body = msgpack.packb([[m.first, m.last, m.count, m.size, m.first_ts] for m in metas])
    tmp = posixpath.join(directory, INDEX_NAME + ".tmp")
    try:
        write_whole(files, tmp, _frame(_INDEX_MAGIC, body))
        faults.hit("index.before_rename")
        files.rename(tmp, posixpath.join(directory, INDEX_NAME))
    except OSError:
        # A half-written temporary index is of no use, and on a full disk it
        # holds room the spool needs: remove it before reporting the failure.
        with contextlib.suppress(OSError):
            files.unlink(tmp)
        raise
    files.fsync_dir(directory)


@dataclass(slots=True, frozen=True)
class SpoolState:
    """The durable high-water mark and the shipper's state bytes."""

    generation: int = 0
    hwm: int = 0
    meta: bytes = b""


def read_state(files: FileLayer, directory: str) -> tuple[SpoolState | None, int]:
    """The newest valid state slot (None if no slot is valid) and how many slots were bad."""
    best: SpoolState | None = None
    bad = 0
    for name in STATE_NAMES:
        path = posixpath.join(directory, name)
        if not files.exists(path):
            continue
        state = _parse_state(files.read(path, 0, files.size(path)))
        if state is None:
            bad += 1
        elif best is None or state.generation > best.generation:
            best = state
    return best, bad


def _parse_state(data: bytes) -> SpoolState | None:
    body = _unframe(_STATE_MAGIC, data)
    if body is None:
        return None
    try:
        generation, hwm, meta = msgpack.unpackb(body)
        if type(generation) is not int or type(hwm) is not int or not isinstance(meta, bytes):
            return None
        return SpoolState(generation, hwm, meta)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None


def write_state(files: FileLayer, directory: str, state: SpoolState) -> None:
    """Overwrite the slot of this generation's parity and fsync it."""
    path = posixpath.join(directory, STATE_NAMES[state.generation % 2])
    created = not files.exists(path)
    body = msgpack.packb([state.generation, state.hwm, state.meta], use_bin_type=True)
    handle = files.open(path, create=True)
    try:
        data = _frame(_STATE_MAGIC, body)
        files.pwrite(handle, data, 0)
        files.truncate(handle, len(data))
        files.fsync(handle)
    finally:
        files.close(handle)
    if created:
        files.fsync_dir(directory)

"""Batch assembly by concatenation: spool records are already msgpack event maps.

Intake encodes each event once, into the bytes the spool stores; the shipper
builds a batch (proto/FORMAT.md) by writing the batch header and appending
those bytes unchanged. Nothing is decoded or re-encoded on the way out, which
is what lets a drain of a million spooled events run at disk speed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack

from predtrace.wire import FORMAT_MAJOR, FORMAT_MINOR, PredictionEvent, event_to_map


def encode_event(event: PredictionEvent) -> bytes:
    """The msgpack map bytes of one event, as the spool stores and the batch carries them."""
    return msgpack.packb(event_to_map(event), use_bin_type=True)  # type: ignore[no-any-return]


def batch_id_for(producer_id: str, seq: int) -> bytes:
    """A batch id derived from (producer, seq), so a rebuilt batch has identical bytes."""
    return hashlib.sha256(f"{producer_id}\x00{seq}".encode()).digest()[:16]


def assemble_payload(
    *,
    producer_id: str,
    seq: int,
    created_at_unix_nano: int,
    prev_digest: bytes,
    events: Sequence[bytes],
) -> bytes:
    """The uncompressed batch bytes (what the hash chain covers) around encoded events."""
    packer = msgpack.Packer(use_bin_type=True)
    head: list[tuple[int, object]] = [
        (0, [FORMAT_MAJOR, FORMAT_MINOR]),
        (1, producer_id),
        (2, seq),
        (3, batch_id_for(producer_id, seq)),
        (4, created_at_unix_nano),
    ]
    if prev_digest:
        head.append((5, prev_digest))
    parts = [packer.pack_map_header(len(head) + 1)]
    for key, value in head:
        parts.append(packer.pack(key))
        parts.append(packer.pack(value))
    parts.append(packer.pack(6))
    parts.append(packer.pack_array_header(len(events)))
    parts.extend(events)
    return b"".join(parts)

"""The msgpack batch codec: EventBatch <-> bytes on the wire (proto/FORMAT.md).

Producers encode after the queue (in the exporter) and the collector decodes
on ingest. Map keys are the proto field numbers, key 0 of a batch holds the
format version. The decoder is bounded in every dimension and raises only
WireError: a bad batch is refused with a reason, a bad event inside a good
batch is rejected alone (partial success). One event's map is written and
read in ``_maps``; what a store would refuse is decided in ``_problems``.
"""

from __future__ import annotations

import hashlib
import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgpack

from predtrace.wire._errors import WireError, WireTooLargeError
from predtrace.wire._event import (
    EventBatch,
    IngestAck,
    PredictionEvent,
    Rejection,
)
from predtrace.wire._event_reader import (
    BYTES_PER_CONTAINER,
    _TooManyContainersError,
    open_packed_events,
)
from predtrace.wire._limits import DEFAULT_LIMITS, DecodeLimits
from predtrace.wire._maps import _Fields, event_from_map, event_to_map
from predtrace.wire._reader import FORMAT_MAJOR, read_batch_events, read_batch_header
from predtrace.wire._unpacker import _MSGPACK_ERRORS, _malformed

FORMAT_MINOR: Final = 0
GZIP_MAGIC: Final = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class DecodedBatch:
    """A decoded batch: the valid events, the rejected ones, and its digest.

    ``digest`` is the SHA-256 of the uncompressed msgpack bytes: the next batch
    of the same producer carries it as ``prev_digest``.
    """

    batch: EventBatch
    rejected: tuple[Rejection, ...]
    digest: bytes


def encode_events_payload(batch: EventBatch) -> bytes:
    """Encode a batch to uncompressed msgpack bytes (what the digest covers)."""
    body: dict[int, Any] = {
        0: [FORMAT_MAJOR, FORMAT_MINOR],
        1: batch.producer_id,
        2: batch.seq,
        6: [event_to_map(e) for e in batch.events],
    }
    if batch.batch_id:
        body[3] = batch.batch_id
    if batch.created_at_unix_nano:
        body[4] = batch.created_at_unix_nano
    if batch.prev_digest:
        body[5] = batch.prev_digest
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def pack_events(events: Sequence[PredictionEvent]) -> bytes:
    """A msgpack array of event maps: ``RecordBatchRequest.packed_events``.

    Example:
        >>> RecordBatchRequest(packed_events=pack_events(events))
    """
    return msgpack.packb([event_to_map(e) for e in events], use_bin_type=True)  # type: ignore[no-any-return]


def unpack_events(
    data: bytes, *, first_index: int = 0, limits: DecodeLimits = DEFAULT_LIMITS
) -> tuple[list[PredictionEvent], list[int], list[Rejection]]:
    """Read ``pack_events`` bytes: the good events, their positions, and rejections.

    A bad event is rejected alone (positions count from ``first_index``).
    Strings, binaries and maps are bounded here by the size of ``data`` only:
    one event over the per-field limits must not cost the others, so those
    are the consumer's to check per event (``event_problem``, as the
    sidecar's intake does for every event).

    Raises:
        WireTooLargeError: more bytes or events than ``limits`` allow.
        WireError: the bytes are not a msgpack array (nothing is accepted).
    """
    raw = unpack_event_maps(data, limits=limits)
    return _events_from_maps(raw, limits, first_index=first_index)


def unpack_event_maps(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> list[object]:
    """The items of ``pack_events`` bytes, not yet checked (``event_from_map`` checks one).

    Each is built within the bounds of one event (``open_packed_events``); one
    past them is an ``UnreadableEvent`` in its place. To hold one event's
    objects at a time, iterate ``open_packed_events`` instead.

    Raises:
        WireTooLargeError: more bytes or events than ``limits`` allow.
        WireError: the bytes are not a msgpack array.
    """
    return list(open_packed_events(data, limits))


def _events_from_maps(
    items: Sequence[object], limits: DecodeLimits, *, first_index: int = 0
) -> tuple[list[PredictionEvent], list[int], list[Rejection]]:
    """Build events from raw maps: the good ones, their positions, and rejections."""
    events: list[PredictionEvent] = []
    positions: list[int] = []
    rejected: list[Rejection] = []
    for index, item in enumerate(items, first_index):
        try:
            events.append(event_from_map(item, limits))
        except WireError as exc:
            rejected.append(event_rejection(index, item, exc))
            continue
        positions.append(index)
    return events, positions, rejected


# Level 1: on realistic batches (bench/codec.py's events) it gives 127 bytes an
# event against 123.5 at level 6, for less than half the CPU (2.6 against
# 5.8 us an event), and compression runs once per event in every producer.
GZIP_LEVEL: Final = 1


def encode_batch(batch: EventBatch, *, compress: bool = False, level: int = GZIP_LEVEL) -> bytes:
    """Encode a batch for the wire, gzip'd when ``compress`` is set.

    Example:
        >>> body = encode_batch(EventBatch("edge-7", 1, events), compress=True)
    """
    payload = encode_events_payload(batch)
    if not compress:
        return payload
    return gzip_bytes(payload, level)


def gzip_bytes(payload: bytes, level: int = GZIP_LEVEL) -> bytes:
    """Gzip ``payload`` (a standard gzip member, mtime 0 for reproducible bytes)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(payload) + compressor.flush()


def batch_digest(payload: bytes) -> bytes:
    """SHA-256 of uncompressed batch bytes: the link of the per-producer chain."""
    return hashlib.sha256(payload).digest()


# -- decoding -----------------------------------------------------------------


def gunzip_bounded(data: bytes, max_bytes: int) -> bytes:
    """Decompress a gzip payload, refusing to produce more than ``max_bytes``.

    Raises:
        WireTooLargeError: the output would exceed ``max_bytes`` (gzip bomb).
        WireError: the bytes are not valid gzip.
    """
    decompressor = zlib.decompressobj(31)
    try:
        out = decompressor.decompress(data, max_bytes + 1)
    except zlib.error as exc:
        raise WireError(f"invalid gzip data: {exc}") from None
    if len(out) > max_bytes or decompressor.unconsumed_tail:
        raise WireTooLargeError(f"decompressed body exceeds {max_bytes} bytes")
    if not decompressor.eof:
        raise WireError("truncated gzip data")
    if decompressor.unused_data:
        raise WireError("trailing bytes after the gzip data (one gzip member only)")
    return out


def unpack_bounded(payload: bytes, limits: DecodeLimits) -> object:
    """Unpack msgpack bytes with every declared length, and the number of containers, bounded.

    For values built whole (acknowledgements); batches and packed events are
    read in parts by ``_reader``, with bounds per event. An empty map or array is one
    byte on the wire and some 60 in memory, a map of one entry three bytes and
    224. What predtrace's encoder writes spends at least three bytes a
    container (the densest event, a one-character id and an empty output, is
    six bytes in two; an empty additional model, one byte, is refused by
    ``event_problem``), so at most one container per ``BYTES_PER_CONTAINER``
    bytes is allowed: up to about 75 times the bytes (maps of one entry).

    Raises:
        WireError: malformed, truncated, trailing data or a bound exceeded.
    """
    count = itertools.count()
    most = len(payload) // BYTES_PER_CONTAINER + 64

    def counted(container: _C) -> _C:
        if next(count) > most:
            raise _TooManyContainersError
        return container

    try:
        return msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=False,
            use_list=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_array_len=max(limits.max_events, limits.max_map_len),
            max_map_len=limits.max_map_len,
            max_ext_len=0,
            object_hook=counted,
            list_hook=counted,
        )
    except _TooManyContainersError:
        raise WireError(
            f"more than one map or array per {BYTES_PER_CONTAINER} bytes of msgpack"
        ) from None
    except msgpack.ExtraData:
        raise WireError("trailing bytes after the msgpack value") from None
    except _MSGPACK_ERRORS as exc:
        raise _malformed(exc) from None


_C = TypeVar("_C")


@dataclass(frozen=True, slots=True)
class RawBatch:
    """A batch whose header is checked but whose events are still int-keyed maps.

    For a consumer with its own fast path per event (the collector builds its
    store rows straight from the maps); ``event_from_map`` is the precise path
    that decides every rejection and its reason.
    """

    producer_id: str
    seq: int
    batch_id: bytes
    created_at_unix_nano: int
    prev_digest: bytes
    events: list[Any]
    digest: bytes


def decode_batch_raw(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> RawBatch:
    """Decode wire bytes (gzip'd or not) and check the batch header, not the events.

    Every event map is built (each within its bounds, see ``read_batch_events``);
    a consumer that needs one at a time reads them with ``read_batch_events``.

    Raises:
        WireTooLargeError: the body or its decompressed form is over the limits.
        WireError: the batch itself is malformed (the whole body is refused).
    """
    if len(data) > limits.max_bytes:
        raise WireTooLargeError(f"body exceeds {limits.max_bytes} bytes")
    payload = data
    if data[:2] == GZIP_MAGIC:
        payload = gunzip_bounded(data, limits.max_decompressed_bytes)
    header = read_batch_header(payload, limits)
    return RawBatch(
        producer_id=header.producer_id,
        seq=header.seq,
        batch_id=header.batch_id,
        created_at_unix_nano=header.created_at_unix_nano,
        prev_digest=header.prev_digest,
        events=list(read_batch_events(payload, header, limits)),
        digest=batch_digest(payload),
    )


def event_rejection(index: int, item: object, exc: WireError) -> Rejection:
    """The rejection of the raw event at ``index`` that ``event_from_map`` refused."""
    pid = item.get(1) if isinstance(item, dict) else None
    return Rejection(index, str(exc), pid if isinstance(pid, str) else "")


def decode_batch(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> DecodedBatch:
    """Decode wire bytes (gzip'd or not) into a batch, rejecting bad events alone.

    Raises:
        WireTooLargeError: the body or its decompressed form is over the limits.
        WireError: the batch itself is malformed (the whole body is refused).
    """
    raw = decode_batch_raw(data, limits=limits)
    events, _, rejected = _events_from_maps(raw.events, limits)
    batch = EventBatch(
        producer_id=raw.producer_id,
        seq=raw.seq,
        events=events,
        batch_id=raw.batch_id,
        created_at_unix_nano=raw.created_at_unix_nano,
        prev_digest=raw.prev_digest,
    )
    return DecodedBatch(batch, tuple(rejected), raw.digest)


# -- acknowledgements -------------------------------------------------------


def encode_ack(ack: IngestAck) -> bytes:
    """Encode the collector's answer (msgpack, keys from ``IngestAck``)."""
    body: dict[int, Any] = {1: ack.producer_id, 2: ack.seq, 3: ack.accepted}
    if ack.rejected:
        body[4] = [{1: r.index, 2: r.prediction_id, 3: r.reason} for r in ack.rejected]
    if ack.duplicate:
        body[5] = True
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_ack(data: bytes, *, limits: DecodeLimits = DEFAULT_LIMITS) -> IngestAck:
    """Decode the collector's answer.

    Raises:
        WireError: the bytes are not a valid acknowledgement.
    """
    f = _Fields(unpack_bounded(data, limits), "ack")
    raw_rejected = f.raw.get(4, [])
    if not isinstance(raw_rejected, list):
        raise WireError("ack.rejected must be an array")
    rejected = []
    for item in raw_rejected:
        r = _Fields(item, "ack.rejected[]")
        rejected.append(
            Rejection(r.uint(1, "index"), r.text(3, "reason"), r.text(2, "prediction_id"))
        )
    return IngestAck(
        producer_id=f.text(1, "producer_id"),
        seq=f.uint(2, "seq"),
        accepted=f.uint(3, "accepted"),
        rejected=tuple(rejected),
        duplicate=f.raw.get(5) is True,
    )

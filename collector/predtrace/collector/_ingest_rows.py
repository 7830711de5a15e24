"""A batch's bytes into store rows: inflated when gzip'd, its events one at a time.

The ingest endpoint (``_ingest``) reads the header first (``open_batch``),
charges what the decode costs (``decode_cost``), then turns the events into
rows (``prepare``): a plain, valid event straight from its msgpack map (the
store's fast path), any other through the wire's precise decoder and the
store's checks, which reject it alone with a reason. All of it is CPU-bound:
a big or gzip'd batch is decoded in a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from predtrace.collector.store import (
    IngestRecord,
    event_problem,
    fast_prediction_row,
    prediction_row,
)
from predtrace.collector.store._ops import Row
from predtrace.wire import (
    BatchHeader,
    DecodeLimits,
    Rejection,
    WireError,
    batch_digest,
    event_from_map,
    event_rejection,
    gunzip_bounded,
    read_batch_events,
    read_batch_header,
)
from predtrace.wire._codec import GZIP_MAGIC

# What a decode keeps until its batch is stored, beyond its payload: its rows
# (``decode_cost``). Measured with tracemalloc (test_ingest_limits.py): some
# 350 bytes a row plus about 3 per byte of realistic events (bench/codec.py's:
# 1,550 bytes a row of 404 on the wire); short texts cost more per byte but
# stay within the per-row part. Text kept as JSON with escapes (control
# characters, 6 bytes each) costs more, up to about twice its charge; and a
# batch charged more than the whole budget goes alone (it is charged the
# budget). So one batch of little but control characters may hold several
# times ``max_decompressed_bytes``. Counting control bytes to charge them
# would take a pass over every payload on the event loop: a cost to every
# batch for the sake of such odd ones.
ROW_BYTES: Final = 1024
ROW_BYTES_PER_PAYLOAD_BYTE: Final = 4


@dataclass(frozen=True, slots=True)
class _Prepared:
    record: IngestRecord
    rejected: tuple[Rejection, ...]


def prepare(
    payload: bytes, limits: DecodeLimits, received_ns: int, header: BatchHeader | None = None
) -> _Prepared:
    """Build the store rows of a batch's msgpack bytes (CPU-bound: big ones run in a thread).

    ``header`` is the batch's, when it was read before (``open_batch``). The
    events are built one at a time and only their rows are kept: a plain,
    valid event becomes its row straight from the msgpack map; any other goes
    through the wire's precise decoder and the store's checks, which reject it
    alone with a reason.

    Raises:
        WireTooLargeError / WireError: the body is refused whole.
    """
    if header is None:
        header = read_batch_header(payload, limits)
    producer_id, seq, max_id = header.producer_id, header.seq, limits.max_id_len
    rows: list[Row] = []
    rejected: list[Rejection] = []
    for index, item in enumerate(read_batch_events(payload, header, limits)):
        row = fast_prediction_row(item, producer_id, seq, received_ns, max_id)
        if row is None:
            row = _precise_row(item, index, limits, rejected, (producer_id, seq, received_ns))
        if row is not None:
            rows.append(row)
    record = IngestRecord(
        producer_id=producer_id,
        seq=seq,
        digest=batch_digest(payload),
        prev_digest=header.prev_digest,
        batch_id=header.batch_id,
        created_ns=min(header.created_at_unix_nano, 2**63 - 1),
        received_ns=received_ns,
        rows=rows,
        rejected=len(rejected),
    )
    return _Prepared(record, tuple(rejected))


def open_batch(body: bytes, limits: DecodeLimits) -> tuple[bytes, BatchHeader]:
    """A body's msgpack bytes (inflated when gzip'd) and its header (CPU-bound: run in a thread).

    Raises:
        WireTooLargeError / WireError: the body is refused whole.
    """
    payload = inflate(body, limits) if body[:2] == GZIP_MAGIC else body
    return payload, read_batch_header(payload, limits)


def inflate(body: bytes, limits: DecodeLimits) -> bytes:
    """The msgpack bytes of a gzip'd body (CPU-bound: run in a thread).

    Raises:
        WireTooLargeError: they would exceed ``limits.max_decompressed_bytes``.
        WireError: the body is not one valid gzip member of a msgpack batch.
    """
    payload = gunzip_bounded(body, limits.max_decompressed_bytes)
    if payload[:2] == GZIP_MAGIC:
        # The decoder would inflate it again, past what was charged for it.
        raise WireError("batch must be a msgpack map, not gzip'd twice")
    return payload


def decode_cost(payload_len: int, event_count: int) -> int:
    """Bytes a decode keeps until its batch is stored, beyond the payload: its rows.

    Not the event being built: one at a time per decode, each within the
    reader's per-event bounds, and only ``DECODES_AT_ONCE`` decodes run in
    threads (plus small bodies on the event loop), so those objects are
    bounded whatever the number of batches in flight.
    """
    return ROW_BYTES * event_count + ROW_BYTES_PER_PAYLOAD_BYTE * payload_len


def _precise_row(
    item: object,
    index: int,
    limits: DecodeLimits,
    rejected: list[Rejection],
    origin: tuple[str, int, int],
) -> Row | None:
    """The row of an event off the fast path, or None with its rejection appended."""
    try:
        event = event_from_map(item, limits)
    except WireError as exc:
        rejected.append(event_rejection(index, item, exc))
        return None
    problem = event_problem(event)
    if problem is not None:
        rejected.append(Rejection(index, problem, event.prediction_id))
        return None
    return prediction_row(event, *origin)

"""Write plans; the ingest plan, one batch, is here.

The ingest plan is idempotent on (producer_id, seq): a batch already stored is
answered as a duplicate and nothing is written. It checks the per-producer hash
chain in both directions (the stored predecessor's digest against this batch's
``prev_digest``, and this digest against a successor that arrived first), and
records breaks and re-used sequence numbers in ``chain_events``. Gaps are not
recorded here: the gap report derives them from ``batches``. In the same
transaction it keeps ``served``, ``deployments`` and ``images`` up to date with
what the events say they ran on.

The registration plan lives in ``_registration`` and is re-exported here, so
that the store takes every write plan from one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from predtrace.collector.store._ops import Exec, ExecMany, Fetch, Insert, Plan, Row
from predtrace.collector.store._registration import OnConflict, register_plan
from predtrace.collector.store._rows import ServedKey, served_key
from predtrace.collector.store._schema import PREDICTION_COLUMNS
from predtrace.wire._limits import INT63_MAX

__all__ = ["IngestOutcome", "IngestRecord", "OnConflict", "ingest_plan", "register_plan"]


@dataclass(frozen=True, slots=True)
class IngestRecord:
    """A decoded, validated batch ready for the store."""

    producer_id: str
    seq: int
    digest: bytes
    prev_digest: bytes
    batch_id: bytes
    created_ns: int
    received_ns: int
    rows: Sequence[Row]
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What the store did with a batch; ``chain`` is ok/first/gap/unchained/mismatch."""

    duplicate: bool
    stored: int
    chain: str
    # Same (producer, seq) stored before with other bytes: nothing of this
    # batch was stored, and the sender must hear so (409), not "duplicate".
    conflict: bool = False


_CHAIN_EVENT = (
    "INSERT INTO chain_events (producer_id, seq, kind, expected, actual, received_ns)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def _chain_event(rec: IngestRecord, seq: int, kind: str, expected: bytes, actual: bytes) -> Exec:
    return Exec(_CHAIN_EVENT, (rec.producer_id, seq, kind, expected, actual, rec.received_ns))


def _chain_status(rec: IngestRecord, before: bytes | None) -> str:
    if rec.seq == 1:
        return "first"
    if before is None:
        return "gap"
    if not rec.prev_digest:
        return "unchained"
    return "ok" if before == rec.prev_digest else "mismatch"


def ingest_plan(rec: IngestRecord) -> Plan[IngestOutcome]:
    """Store a batch once; return whether it was a duplicate and its chain status."""
    near = yield Fetch(
        "SELECT seq, digest, prev_digest, stored FROM batches"
        " WHERE producer_id = ? AND seq >= ? AND seq <= ?",
        # min(): the last valid seq (2**63-1) has no successor to bind.
        (rec.producer_id, rec.seq - 1, min(rec.seq + 1, INT63_MAX)),
    )
    by_seq = {row[0]: row for row in near}
    if rec.seq in by_seq:
        return (yield from _duplicate(rec, bytes(by_seq[rec.seq][1]), by_seq[rec.seq][3]))
    before = by_seq.get(rec.seq - 1)
    chain = _chain_status(rec, bytes(before[1]) if before else None)
    inserted = yield Fetch(
        "INSERT INTO batches (producer_id, seq, batch_id, digest, prev_digest, created_ns,"
        " received_ns, stored, rejected, chain) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (producer_id, seq) DO NOTHING RETURNING seq",
        (
            rec.producer_id,
            rec.seq,
            rec.batch_id or None,
            rec.digest,
            rec.prev_digest or None,
            rec.created_ns,
            rec.received_ns,
            len(rec.rows),
            rec.rejected,
            chain,
        ),
    )
    if not inserted:
        # A concurrent delivery of this (producer, seq) committed first: same
        # bytes are a duplicate, other bytes a conflict (never a silent ack).
        winner = yield Fetch(
            "SELECT digest, stored FROM batches WHERE producer_id = ? AND seq = ?",
            (rec.producer_id, rec.seq),
        )
        if winner:
            return (yield from _duplicate(rec, bytes(winner[0][0]), winner[0][1]))
        return IngestOutcome(duplicate=True, stored=len(rec.rows), chain="duplicate")
    breaks = 1 if chain == "mismatch" else 0
    if chain == "mismatch" and before is not None:
        yield _chain_event(rec, rec.seq, "mismatch", bytes(before[1]), rec.prev_digest)
    breaks += yield from _check_successor(rec, by_seq.get(rec.seq + 1))
    if rec.rows:
        yield Insert("predictions", PREDICTION_COLUMNS, rec.rows)
        yield from _upsert_runtime_lineage(rec)
    yield from _upsert_producer(rec, breaks)
    return IngestOutcome(duplicate=False, stored=len(rec.rows), chain=chain)


def _duplicate(rec: IngestRecord, digest: bytes, stored: int) -> Plan[IngestOutcome]:
    if digest != rec.digest:
        # Same (producer, seq), different bytes: the producer re-used a number.
        yield _chain_event(rec, rec.seq, "seq_reused", digest, rec.digest)
        return IngestOutcome(duplicate=True, stored=0, chain="seq_reused", conflict=True)
    return IngestOutcome(duplicate=True, stored=stored, chain="duplicate")


def _check_successor(rec: IngestRecord, after: Row | None) -> Plan[int]:
    if after is None or not after[2]:
        return 0
    if bytes(after[2]) == rec.digest:
        yield Exec(
            "UPDATE batches SET chain = 'ok' WHERE producer_id = ? AND seq = ? AND chain = 'gap'",
            (rec.producer_id, rec.seq + 1),
        )
        return 0
    yield _chain_event(rec, rec.seq + 1, "mismatch", rec.digest, bytes(after[2]))
    return 1


def _upsert_producer(rec: IngestRecord, breaks: int) -> Plan[None]:
    yield Exec(
        "INSERT INTO producers (producer_id, first_seq, last_seq, batches, events, chain_breaks,"
        " first_received_ns, last_received_ns) VALUES (?, ?, ?, 1, ?, ?, ?, ?)"
        " ON CONFLICT (producer_id) DO UPDATE SET"
        " first_seq = CASE WHEN excluded.first_seq < producers.first_seq"
        " THEN excluded.first_seq ELSE producers.first_seq END,"
        " last_seq = CASE WHEN excluded.last_seq > producers.last_seq"
        " THEN excluded.last_seq ELSE producers.last_seq END,"
        " batches = producers.batches + 1, events = producers.events + excluded.events,"
        " chain_breaks = producers.chain_breaks + excluded.chain_breaks,"
        " last_received_ns = excluded.last_received_ns",
        (
            rec.producer_id,
            rec.seq,
            rec.seq,
            len(rec.rows),
            breaks,
            rec.received_ns,
            rec.received_ns,
        ),
    )


_SERVED_UPSERT = (
    "INSERT INTO served (deployment_id, model_name, model_version, model_alias, image_digest,"
    " predictions, first_seen_ns, last_seen_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (deployment_id, model_name, model_version, model_alias, image_digest)"
    " DO UPDATE SET predictions = served.predictions + excluded.predictions,"
    " first_seen_ns = CASE WHEN served.first_seen_ns = 0"
    " OR (excluded.first_seen_ns > 0 AND excluded.first_seen_ns < served.first_seen_ns)"
    " THEN excluded.first_seen_ns ELSE served.first_seen_ns END,"
    " last_seen_ns = CASE WHEN excluded.last_seen_ns > served.last_seen_ns"
    " THEN excluded.last_seen_ns ELSE served.last_seen_ns END"
)


def _served_groups(rows: Sequence[Row]) -> dict[ServedKey, list[int]]:
    """[count, first, last] timestamps per served key.

    ``first`` is the earliest of the events that have a timestamp (0: none
    has). An event without one (0) may have been made at any time: taken as
    the earliest, it would date its group to 1970, and a group that names
    only an alias would then read as older than the alias's every move.
    """
    groups: dict[ServedKey, list[int]] = {}
    for row in rows:
        key, ts = served_key(row), row[3]
        group = groups.get(key)
        if group is None:
            groups[key] = [1, ts, ts]
        else:
            group[0] += 1
            if ts and (not group[1] or ts < group[1]):
                group[1] = ts
            group[2] = max(group[2], ts)
    return groups


def _upsert_runtime_lineage(rec: IngestRecord) -> Plan[None]:
    """Deployments, images and deployment SERVES model version, from the events."""
    groups = _served_groups(rec.rows)
    # Sorted, so concurrent PostgreSQL transactions lock rows in the same order.
    served = [key + tuple(groups[key]) for key in sorted(groups)]
    yield ExecMany(_SERVED_UPSERT, served)
    deployments: dict[str, tuple[str, str, int, int]] = {}
    images: dict[str, str] = {}
    for row in rec.rows:
        if row[14]:
            seen = deployments.get(row[14])
            first, last = (min(seen[2], row[3]), max(seen[3], row[3])) if seen else (row[3],) * 2
            deployments[row[14]] = (row[15], row[16], first, last)
        if row[19]:
            images[row[19]] = row[20] or images.get(row[19], "")
    yield from _upsert_deployments(deployments)
    if images:
        yield ExecMany(
            "INSERT INTO images (digest, name) VALUES (?, ?) ON CONFLICT (digest) DO UPDATE SET"
            " name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE images.name END",
            sorted(images.items()),
        )


def _upsert_deployments(deployments: dict[str, tuple[str, str, int, int]]) -> Plan[None]:
    if not deployments:
        return
    yield ExecMany(
        "INSERT INTO deployments (id, service, namespace, started_ns, ended_ns, first_seen_ns,"
        " last_seen_ns, origin) VALUES (?, ?, ?, 0, 0, ?, ?, 'runtime')"
        " ON CONFLICT (id) DO UPDATE SET"
        " first_seen_ns = CASE WHEN deployments.first_seen_ns = 0"
        " OR excluded.first_seen_ns < deployments.first_seen_ns"
        " THEN excluded.first_seen_ns ELSE deployments.first_seen_ns END,"
        " last_seen_ns = CASE WHEN excluded.last_seen_ns > deployments.last_seen_ns"
        " THEN excluded.last_seen_ns ELSE deployments.last_seen_ns END",
        [(key, *value) for key, value in sorted(deployments.items())],
    )

"""Plans for the per-producer gap report and for retention.

The producer list is answered a page at a time (``Page``): a token bound to
``edge-7`` may create ``edge-7-r??????`` producers, so their number is not the
operator's to bound. Retention deletes in small chunks, each its own
transaction, so ingest is never blocked for long; the ``served`` counts are
decremented in the same transaction as the rows they count. Lineage nodes are
kept.
"""

from __future__ import annotations

from typing import Final

from predtrace.collector.store._chain import Json
from predtrace.collector.store._ops import Exec, ExecMany, Fetch, Plan, Row, in_list
from predtrace.collector.store._rows import iso_time

MAX_GAP_RANGES: Final = 100


def _producer_json(row: Row) -> Json:
    return {
        "producer_id": row[0],
        "first_seq": row[1],
        "last_seq": row[2],
        "batches": row[3],
        "events": row[4],
        "chain_breaks": row[5],
        "first_received": iso_time(row[6]),
        "last_received": iso_time(row[7]),
        "missing_batches": max(0, row[2] - row[3]),
    }


_PRODUCER_COLUMNS: Final = (
    "SELECT producer_id, first_seq, last_seq, batches, events, chain_breaks,"
    " first_received_ns, last_received_ns FROM producers"
)


PAGE_LIMIT: Final = 1000
"""Rows a list answer (producers, completeness's models) holds unless asked for other."""
MAX_PAGE_LIMIT: Final = 10_000
"""The most rows a list answer may be asked for: a few megabytes of JSON at most."""


class Page(list[Json]):
    """One page of a list answer, in a stable order, and what it left out.

    A list, so that what reads only the rows takes it as one. ``total``
    counts every stored row; ``next_after`` is the key of the last row listed
    when more follow (ask again with ``after=`` it), else None.
    """

    __slots__ = ("next_after", "total")

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.next_after: str | None = None

    @property
    def truncated(self) -> bool:
        """Whether rows follow this page."""
        return self.next_after is not None


def producers_plan(limit: int = PAGE_LIMIT, after: str | None = None) -> Plan[Page]:
    """Producers by id after ``after``, at most ``limit``; ``missing_batches`` > 0 means a gap.

    The primary key orders and bounds the scan, so a page costs its rows
    whatever the fleet's size; ``total`` is counted only when the page is
    not the whole list.
    """
    where, args = ("", ()) if after is None else (" WHERE producer_id > ?", (after,))
    rows = yield Fetch(
        _PRODUCER_COLUMNS + where + " ORDER BY producer_id LIMIT ?", (*args, limit + 1)
    )
    page = Page()
    page.extend(_producer_json(row) for row in rows[:limit])
    if len(rows) > limit:
        page.next_after = str(rows[limit - 1][0])
    if after is None and not page.truncated:
        page.total = len(page)
    else:
        counted = yield Fetch("SELECT count(*) FROM producers")
        page.total = int(counted[0][0])
    return page


def producer_plan(producer_id: str) -> Plan[Json | None]:
    """One producer's gap report: missing seq ranges and chain events."""
    rows = yield Fetch(_PRODUCER_COLUMNS + " WHERE producer_id = ?", (producer_id,))
    if not rows:
        return None
    report = _producer_json(rows[0])
    gaps = yield Fetch(
        "SELECT prev + 1, seq - 1 FROM (SELECT seq, LAG(seq) OVER (ORDER BY seq) AS prev"
        " FROM batches WHERE producer_id = ?) t WHERE seq - prev > 1 ORDER BY seq LIMIT ?",
        (producer_id, MAX_GAP_RANGES),
    )
    ranges = [[int(a), int(b)] for a, b in gaps]
    if int(rows[0][1]) > 1:
        ranges.insert(0, [1, int(rows[0][1]) - 1])
    report["missing_ranges"] = ranges
    events = yield Fetch(
        "SELECT seq, kind, expected, actual, received_ns FROM chain_events"
        " WHERE producer_id = ? ORDER BY seq, id LIMIT ?",
        (producer_id, MAX_GAP_RANGES),
    )
    report["chain_events"] = [
        {
            "seq": e[0],
            "kind": e[1],
            "expected": bytes(e[2]).hex() if e[2] is not None else None,
            "actual": bytes(e[3]).hex() if e[3] is not None else None,
            "received": iso_time(e[4]),
        }
        for e in events
    ]
    return report


_GROUP = (
    "deployment_id, model_name, model_version,"
    " CASE WHEN model_version = '' THEN model_alias ELSE '' END, image_digest"
)


def uncount_plan(where: str, args: tuple[object, ...]) -> Plan[None]:
    """Decrement ``served`` by the predictions matching ``where`` (about to be removed)."""
    groups = yield Fetch(
        f"SELECT {_GROUP}, count(*) FROM predictions WHERE {where} GROUP BY 1, 2, 3, 4, 5",  # noqa: S608 - fixed fragments
        args,
    )
    yield ExecMany(
        "UPDATE served SET predictions = predictions - ? WHERE deployment_id = ?"
        " AND model_name = ? AND model_version = ? AND model_alias = ? AND image_digest = ?",
        sorted((int(g[5]), *g[:5]) for g in groups),
    )


def expire_predictions_plan(cutoff_ns: int, chunk: int) -> Plan[int]:
    """Delete up to ``chunk`` predictions received before ``cutoff_ns``; return how many."""
    rows = yield Fetch(
        "SELECT id FROM predictions WHERE received_ns < ? ORDER BY received_ns LIMIT ?",
        (cutoff_ns, chunk),
    )
    if not rows:
        return 0
    ids = tuple(r[0] for r in rows)
    where = f"id IN ({in_list(len(ids))})"
    yield from uncount_plan(where, ids)
    yield Exec(f"DELETE FROM predictions WHERE {where}", ids)  # noqa: S608 - placeholders only
    return len(ids)


def expire_rows_plan(table: str, cutoff_ns: int, chunk: int) -> Plan[int]:
    """Delete up to ``chunk`` rows of ``batches`` or ``chain_events`` received before the cutoff."""
    key = {"batches": "producer_id, seq", "chain_events": "id"}[table]
    done = yield Exec(
        f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table}"  # noqa: S608 - fixed names
        " WHERE received_ns < ? LIMIT ?)",
        (cutoff_ns, chunk),
    )
    return int(done[0][0])


def record_retention_plan(started_ns: int, finished_ns: int, report: str) -> Plan[None]:
    """Keep the report of one retention pass (the last ones are served by the API)."""
    yield Exec(
        "INSERT INTO retention_runs (started_ns, finished_ns, report) VALUES (?, ?, ?)",
        (started_ns, finished_ns, report),
    )


def retention_runs_plan(limit: int) -> Plan[list[Row]]:
    """The latest retention reports, newest first."""
    rows = yield Fetch(
        "SELECT started_ns, finished_ns, report FROM retention_runs ORDER BY id DESC LIMIT ?",
        (limit,),
    )
    return rows

"""Read plans over the served groups: completeness per model, and every group.

Completeness is the share of predictions whose lineage chain is complete,
per model and in total. It reads ``served`` (deployment SERVES model
version), which the ingest plan and retention keep exact: one chain per
(deployment, model, version, alias, image) group, weighted by its count,
not one per prediction.
"""

from __future__ import annotations

from typing import Final

from predtrace.collector.store._chain import ChainKey, Json, chain_plan
from predtrace.collector.store._maintenance import PAGE_LIMIT
from predtrace.collector.store._ops import Fetch, Plan, Row


def served_groups_plan() -> Plan[list[Row]]:
    """Every (deployment, model, version, alias, image) group with its prediction count."""
    rows = yield Fetch(
        "SELECT model_name, model_version, model_alias, deployment_id, image_digest, predictions,"
        " first_seen_ns FROM served WHERE predictions > 0"
        " ORDER BY model_name, model_version, deployment_id, image_digest"
    )
    return rows


# Served groups read at once by ``completeness_plan``: its memory holds a chunk
# and a page of models, not one row per group (a producer may name many models).
_GROUPS_AT_ONCE: Final = 1000
_SERVED_KEY: Final = "deployment_id, model_name, model_version, model_alias, image_digest"


def _served_chunk(after: Row | None, chunk: int) -> Plan[list[Row]]:
    """Up to ``chunk`` served groups with predictions, after ``after`` in primary key order.

    Each row: the five key columns, the prediction count, the first seen time.
    """
    where, args = "", ()
    if after is not None:  # a row value: the primary key index bounds the scan
        where, args = f" AND ({_SERVED_KEY}) > (?, ?, ?, ?, ?)", tuple(after[:5])
    rows = yield Fetch(
        f"SELECT {_SERVED_KEY}, predictions, first_seen_ns FROM served"  # noqa: S608 - fixed SQL fragments, values are bound
        f" WHERE predictions > 0{where} ORDER BY {_SERVED_KEY} LIMIT ?",
        (*args, chunk),
    )
    return rows


class _ModelPage:
    """The entries of the first ``limit`` model names after ``after`` (code point order).

    Groups come in key order, not by model: entries are kept for at most
    twice the page, then cut back to the page; a name past the last one kept
    then (``ceiling``) has ``limit`` names before it and is left out for good,
    so no entry is ever cut and begun again without its earlier groups.
    """

    def __init__(self, limit: int, after: str | None) -> None:
        self.limit, self.after = limit, after
        self.entries: dict[str, Json] = {}
        self.ceiling: str | None = None
        self.beyond = False  # a model past the page exists

    def entry(self, model: str) -> Json | None:
        """The entry that counts ``model``'s groups, or None when it is not on the page."""
        if self.after is not None and model <= self.after:
            return None
        if self.ceiling is not None and model > self.ceiling:
            self.beyond = True
            return None
        found = self.entries.get(model)
        if found is None:
            found = {"model": model, "predictions": 0, "complete": 0, "missing": {}}
            self.entries[model] = found
            if len(self.entries) > 2 * self.limit:
                self._cut()
        return found

    def _cut(self) -> None:
        names = sorted(self.entries)
        for name in names[self.limit :]:
            del self.entries[name]
        self.ceiling, self.beyond = names[self.limit - 1], True

    def listed(self) -> list[Json]:
        """The page's entries by name, each with its share."""
        if len(self.entries) > self.limit:
            self._cut()
        listed = [self.entries[name] for name in sorted(self.entries)]
        for entry in listed:
            n = int(entry["predictions"])  # type: ignore[call-overload]
            entry["share"] = int(entry["complete"]) / n if n else 1.0  # type: ignore[call-overload]
        return listed


def completeness_plan(
    limit: int = PAGE_LIMIT, after: str | None = None, chunk: int = _GROUPS_AT_ONCE
) -> Plan[Json]:
    """Per model: the share of predictions whose chain is complete, and what is missing.

    The totals (``predictions``, ``complete``, ``share``) cover every model;
    ``models`` lists at most ``limit``, by name after ``after``: ``total``
    counts every model, ``truncated`` says more follow, from ``next_after``
    on. Served groups are read ``chunk`` at a time.
    """
    page = _ModelPage(limit, after)
    total = complete = 0
    last: Row | None = None
    while True:
        rows = yield from _served_chunk(last, chunk)
        for row in rows:
            key: ChainKey = (row[1], row[2], row[3], row[0], row[4])
            chain = yield from chain_plan(key, int(row[6] or 0))
            count = int(row[5])
            total += count
            complete += count if chain["complete"] else 0
            entry = page.entry(str(row[1]))
            if entry is not None:
                _count_group(entry, chain, count)
        if len(rows) < chunk:
            break
        last = rows[-1]
    models = page.listed()
    answer: Json = {
        "predictions": total,
        "complete": complete,
        "share": complete / total if total else 1.0,
        "models": models,
        "total": len(models),
        "truncated": page.beyond,
    }
    if page.beyond or after is not None:
        counted = yield Fetch("SELECT count(DISTINCT model_name) FROM served WHERE predictions > 0")
        answer["total"] = int(counted[0][0])
    if page.beyond:
        answer["next_after"] = str(models[-1]["model"])
    return answer


def _count_group(entry: Json, chain: Json, count: int) -> None:
    """Add one served group of ``count`` predictions to its model's entry."""
    entry["predictions"] = int(entry["predictions"]) + count  # type: ignore[call-overload]
    if chain["complete"]:
        entry["complete"] = int(entry["complete"]) + count  # type: ignore[call-overload]
    counts = entry["missing"]
    assert isinstance(counts, dict)  # noqa: S101 - _ModelPage.entry sets a dict
    for hop in chain["missing"]:  # type: ignore[attr-defined]
        counts[hop["hop"]] = counts.get(hop["hop"], 0) + count

"""Read plans behind the query API; the pivot by trace or prediction id is here.

The pivot lists the predictions of a trace (or prediction ids) with their
lineage chains, within a row limit and a byte budget. The other read plans
live beside it and are re-exported here, so that the store and the API take
every read plan from one place: model lineage and impact (``_impact``),
completeness and the served groups (``_completeness``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Final

from predtrace.collector.store._chain import (
    AliasState,
    ChainKey,
    Json,
    alias_plan,
    alias_state,
    chain_plan,
)
from predtrace.collector.store._commits import AmbiguousCommitError
from predtrace.collector.store._completeness import completeness_plan, served_groups_plan
from predtrace.collector.store._impact import impact_plan, model_lineage_plan
from predtrace.collector.store._ops import Fetch, Plan, Row, in_list
from predtrace.collector.store._rows import SELECT_PREDICTION, prediction_json
from predtrace.collector.store._schema import PREDICTION_COLUMNS

__all__ = [
    "PIVOT_MAX_BYTES",
    "AmbiguousCommitError",
    "PivotAnswer",
    "chain_key",
    "completeness_plan",
    "impact_plan",
    "model_lineage_plan",
    "pivot_plan",
    "served_groups_plan",
]

PIVOT_MAX_BYTES: Final = 16 * 1024 * 1024
"""JSON bytes the listed predictions of one pivot answer may take, chains included."""

# The text columns of a prediction row: all but these numbers and binaries.
# Each character is at least one byte of JSON, so the sum of their lengths is a
# lower bound of a row's size in the answer that the store computes without
# handing the text over.
_NOT_TEXT: Final = frozenset(
    {"trace_id", "span_id", "ts_ns", "duration_ns", "received_ns", "seq", "status"}
    | {"input_fingerprint", "output_score", "output_value", "sampled"}
)
_TEXT_COLUMNS: Final = tuple(c for c in PREDICTION_COLUMNS if c not in _NOT_TEXT)
_TEXT_SIZE: Final = " + ".join(f"coalesce(length({c}), 0)" for c in _TEXT_COLUMNS)
_KEY_COLUMNS: Final = "model_name, model_version, model_alias, deployment_id, image_digest"
_LINEAGE_KEY: Final = len(', "lineage": ')


class PivotAnswer(list[Json]):
    """The predictions a pivot lists (oldest first), and what it left out.

    A list, so that what only reads the listed predictions (the registry
    fallback) takes it as one. ``total`` counts every stored match. When
    the row limit or the byte budget left some out (``cut_by``), ``unlisted``
    holds one entry per chain group (model, version, alias, deployment, image)
    with unlisted predictions: how many, and the chain's missing hops; so
    ``complete`` still covers every stored prediction. ``unlisted`` is None
    when the groups were too many to check (``complete`` is then unknown).
    """

    __slots__ = ("cut_by", "total", "unlisted")

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.cut_by: str | None = None
        self.unlisted: list[Json] | None = []

    @property
    def complete(self) -> bool | None:
        """Whether every stored prediction's chain is complete; None when unknown."""
        if not all(_lineage(p)["complete"] for p in self):
            return False
        if self.unlisted is None:
            return None
        return all(group["complete"] for group in self.unlisted)


def _lineage(prediction: Json) -> Json:
    lineage = prediction["lineage"]
    assert isinstance(lineage, dict)  # noqa: S101 - the pivot plan sets it
    return lineage


def chain_key(row: Row) -> ChainKey:
    """The chain key of a prediction row."""
    return (row[8], row[9], row[10], row[14], row[19])


def _match(column: str, value: object) -> tuple[str, tuple[object, ...]]:
    """``WHERE`` text and arguments: a tuple ``value`` matches any of its items."""
    if column not in ("trace_id", "prediction_id"):
        raise ValueError(f"cannot look predictions up by {column}")
    values = tuple(dict.fromkeys(value)) if isinstance(value, tuple) else (value,)
    return f"{column} IN ({in_list(len(values))})", values


def _fitting(sized: Sequence[Row], max_bytes: int) -> list[object]:
    """Ids of the leading rows whose text alone stays within ``max_bytes``."""
    ids, used = [], 0
    for row_id, size in sized:
        used += int(size)
        if used > max_bytes:
            break
        ids.append(row_id)
    return ids


def _size(value: object) -> int:
    return len(json.dumps(value, default=str))


def pivot_plan(
    column: str, value: object, limit: int, max_bytes: int = PIVOT_MAX_BYTES
) -> Plan[tuple[PivotAnswer, list[ChainKey]]]:
    """Predictions by ``trace_id`` or ``prediction_id`` (both indexed) with their chains.

    At most ``limit`` predictions and ``max_bytes`` of their JSON are listed
    (see ``PivotAnswer``); also returned: the keys whose model version is
    unregistered, listed or not.
    """
    where, args = _match(column, value)
    # Sizes first: a row too big for the budget is never loaded.
    sized = yield Fetch(
        f"SELECT id, {_TEXT_SIZE} FROM predictions WHERE {where} ORDER BY ts_ns, id LIMIT ?",  # noqa: S608 - fixed SQL fragments, values are bound
        (*args, limit + 1),
    )
    ids = _fitting(sized[:limit], max_bytes)
    rows: list[Row] = []
    if ids:
        # The trace or prediction id index drives the fetch: PostgreSQL's
        # partitioned table has no index on ``id`` alone.
        rows = yield Fetch(
            f"{SELECT_PREDICTION} WHERE {where} AND id IN ({in_list(len(ids))}) ORDER BY ts_ns, id",
            (*args, *ids),
        )
    answer = PivotAnswer()
    # One chain per key, and for a key that names only an alias one per
    # ``alias_state``: one trace may hold predictions from before and after
    # the alias moved, each explained by its own time.
    chains: dict[tuple[ChainKey, AliasState], Json] = {}
    aliases: dict[ChainKey, tuple[str, int, int] | None] = {}
    sizes: dict[tuple[ChainKey, AliasState], int] = {}
    listed: Counter[ChainKey] = Counter()
    room = max_bytes
    for row in rows:
        key, ts = chain_key(row), int(row[3])
        state: AliasState = ""
        if key[0] and key[2] and not key[1]:
            if key not in aliases:
                aliases[key] = yield from alias_plan(key[0], key[2])
            known = aliases[key]
            state = alias_state(ts, known[1], known[2]) if known is not None else ""
        if (key, state) not in chains:  # rows come oldest first: its earliest prediction
            chains[key, state] = yield from chain_plan(key, ts)
            sizes[key, state] = _size(chains[key, state])
        prediction = prediction_json(row)
        room -= _size(prediction) + _LINEAGE_KEY + sizes[key, state]
        if room < 0:
            break
        prediction["lineage"] = chains[key, state]
        answer.append(prediction)
        listed[key] += 1
    answer.total = len(sized)
    first: dict[ChainKey, Json] = {}
    for (key, _), chain in chains.items():
        first.setdefault(key, chain)
    if len(answer) < len(sized):
        answer.cut_by = "limit" if len(answer) == limit else "bytes"
        yield from _unlisted_plan(answer, (where, args), limit, listed, first)
    unresolved = [k for k, c in first.items() if c["model_version"] is None and k[0] and k[1]]
    return answer, unresolved


def _unlisted_plan(
    answer: PivotAnswer,
    match: tuple[str, tuple[object, ...]],
    limit: int,
    listed: Counter[ChainKey],
    chains: dict[ChainKey, Json],
) -> Plan[None]:
    """Count every stored match, and check the chains of the groups left out."""
    where, args = match
    counted = yield Fetch(f"SELECT count(*) FROM predictions WHERE {where}", args)  # noqa: S608 - fixed SQL fragments, values are bound
    answer.total = int(counted[0][0])
    groups = yield Fetch(
        f"SELECT {_KEY_COLUMNS}, count(*), min(ts_ns) FROM predictions WHERE {where}"  # noqa: S608 - fixed SQL fragments, values are bound
        f" GROUP BY {_KEY_COLUMNS} ORDER BY {_KEY_COLUMNS} LIMIT ?",
        (*args, limit + 1),
    )
    if len(groups) > limit:
        answer.unlisted = None  # too many chains to check in one answer
        return
    entries: list[Json] = []
    for group in groups:
        key: ChainKey = (group[0], group[1], group[2], group[3], group[4])
        left = int(group[5]) - listed[key]
        if left <= 0:
            continue
        if key not in chains:
            chains[key] = yield from chain_plan(key, int(group[6] or 0))
        entries.append(
            {
                "model": {"name": key[0], "version": key[1], "alias": key[2]},
                "deployment": key[3],
                "image_digest": key[4],
                "predictions": left,
                "complete": chains[key]["complete"],
                "missing": chains[key]["missing"],
            }
        )
    answer.unlisted = entries

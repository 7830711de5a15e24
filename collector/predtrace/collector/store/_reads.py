"""Read plans behind the query API; the pivot by trace or prediction id is here.

The pivot lists the predictions of a trace (or prediction ids) with their
lineage chains, within a row limit and a byte budget; of the groups it
leaves out it says only their missing hops, found without loading their
nodes (a run's body may be large, and a thousand groups may share it). The
other read plans live beside it and are re-exported here, so that the store
and the API take every read plan from one place: model lineage and impact
(``_impact``), completeness and the served groups (``_completeness``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Final, TypeVar

from predtrace.collector.store._chain import (
    AliasState,
    ChainKey,
    Json,
    Nodes,
    alias_plan,
    alias_state,
    chain_gaps_plan,
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
    unresolved = [k for k, c in first.items() if c["model_version"] is None and k[0] and k[1]]
    if len(answer) < len(sized):
        answer.cut_by = "limit" if len(answer) == limit else "bytes"
        unresolved += yield from _unlisted_plan(answer, (where, args), limit, listed, first)
    return answer, unresolved


def _unlisted_plan(
    answer: PivotAnswer,
    match: tuple[str, tuple[object, ...]],
    limit: int,
    listed: Counter[ChainKey],
    chains: Mapping[ChainKey, Json],
) -> Plan[list[ChainKey]]:
    """Count every stored match, and check the chains of the groups left out.

    A group with no chain in ``chains`` gets only its missing hops
    (``chain_gaps_plan``), its nodes read once for all groups (``_Gaps``):
    up to ``limit`` groups may share one run, whose body may be large.
    Returns the keys of these groups whose model version is unregistered.
    """
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
        return []
    entries: list[Json] = []
    unresolved: list[ChainKey] = []
    nodes = _Gaps()
    for group in groups:
        key: ChainKey = (group[0], group[1], group[2], group[3], group[4])
        left = int(group[5]) - listed[key]
        if left <= 0:
            continue
        gaps = chains.get(key)
        if gaps is None:
            gaps, registered = yield from chain_gaps_plan(key, int(group[6] or 0), nodes)
            if not registered and key[0] and key[1]:
                unresolved.append(key)
        entries.append(
            {
                "model": {"name": key[0], "version": key[1], "alias": key[2]},
                "deployment": key[3],
                "image_digest": key[4],
                "predictions": left,
                "complete": gaps["complete"],
                "missing": gaps["missing"],
            }
        )
    answer.unlisted = entries
    return unresolved


_K = TypeVar("_K")
_V = TypeVar("_V")


def _once(known: dict[_K, _V], key: _K, plan: Plan[_V]) -> Plan[_V]:
    """What ``plan`` gives for ``key``, run only the first time ``key`` is asked."""
    if key not in known:
        known[key] = yield from plan
    return known[key]


class _Gaps(Nodes):
    """The nodes the missing hops of a pivot's unlisted groups need, each read once.

    A run's commit and whether it logged a dataset, not its params, tags
    and datasets: the nodes are never shown, and a run registered many
    times over may be large.
    """

    def __init__(self) -> None:
        self._aliases: dict[tuple[str, str], tuple[str, int, int] | None] = {}
        self._models: dict[tuple[str, str], Json | None] = {}
        self._runs: dict[str, Json | None] = {}
        self._images: dict[tuple[str, str], list[str]] = {}

    def alias(self, name: str, alias: str) -> Plan[tuple[str, int, int] | None]:
        """``alias_plan``, once per alias."""
        return (yield from _once(self._aliases, (name, alias), super().alias(name, alias)))

    def model(self, name: str, version: str) -> Plan[Json | None]:
        """``model_plan``, once per version."""
        return (yield from _once(self._models, (name, version), super().model(name, version)))

    def run(self, run_id: str) -> Plan[Json | None]:
        """The run's ``id``, ``commit`` and whether it has ``datasets``, once per run."""
        return (yield from _once(self._runs, run_id, _run_gaps_plan(run_id)))

    def images(self, name: str, version: str, registered: list[str]) -> Plan[list[str]]:
        """``known_images_plan``, once per version."""
        found = super().images(name, version, registered)
        return (yield from _once(self._images, (name, version), found))


def _run_gaps_plan(run_id: str) -> Plan[Json | None]:
    """What ``run_missing`` reads of a run (no body), or None when it is not stored.

    Its datasets as ``run_plan`` reads them: those with a stored dataset node.
    """
    rows = yield Fetch(
        "SELECT r.commit_sha, EXISTS (SELECT 1 FROM run_datasets u"
        " JOIN datasets d ON d.digest = u.digest WHERE u.run_id = r.run_id)"
        " FROM runs r WHERE r.run_id = ?",
        (run_id,),
    )
    if not rows:
        return None
    sha, datasets = rows[0]
    return {"id": run_id, "commit": {"sha": sha} if sha else None, "datasets": bool(datasets)}

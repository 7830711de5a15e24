"""Read plans behind the query API: the pivot, model lineage, impact, completeness, gaps.

Counts and time ranges come from ``served`` (deployment SERVES model version),
which the ingest plan keeps exact in the same transaction as the predictions
and retention keeps exact when it deletes them; so impact and completeness
cost one row per (deployment, model version, image), not one per prediction.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import Final

from predtrace.collector.store._chain import (
    ChainKey,
    Json,
    alias_moved_plan,
    chain_plan,
    deployment_plan,
    model_plan,
    run_plan,
)
from predtrace.collector.store._ops import Fetch, Plan, Row, in_list
from predtrace.collector.store._rows import SELECT_PREDICTION, iso_time, prediction_json
from predtrace.collector.store._schema import PREDICTION_COLUMNS
from predtrace.collector.store._writes import same_commit

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
_MIN_SHORT_SHA: Final = 7


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
    chains: dict[ChainKey, Json] = {}
    after_move: dict[ChainKey, Json] = {}  # alias-only groups: their predictions after the move
    moves: dict[ChainKey, int] = {}
    sizes: dict[tuple[ChainKey, bool], int] = {}
    listed: Counter[ChainKey] = Counter()
    room = max_bytes
    for row in rows:
        key, ts = chain_key(row), int(row[3])
        if key not in chains:  # rows come oldest first: its earliest prediction
            chains[key] = yield from chain_plan(key, ts)
            sizes[key, False] = _size(chains[key])
        chain, later = chains[key], False
        if key[2] and not key[1] and chain["model_version"] is None:
            # Unresolved because the alias moved after the group's first
            # prediction: one made after the move is the alias's version's.
            if key not in moves:
                moves[key] = yield from alias_moved_plan(key[0], key[2])
            if moves[key] and ts >= moves[key]:
                if key not in after_move:
                    after_move[key] = yield from chain_plan(key, ts)
                    sizes[key, True] = _size(after_move[key])
                chain, later = after_move[key], True
        prediction = prediction_json(row)
        room -= _size(prediction) + _LINEAGE_KEY + sizes[key, later]
        if room < 0:
            break
        prediction["lineage"] = chain
        answer.append(prediction)
        listed[key] += 1
    answer.total = len(sized)
    if len(answer) < len(sized):
        answer.cut_by = "limit" if len(answer) == limit else "bytes"
        yield from _unlisted_plan(answer, (where, args), limit, listed, chains)
    unresolved = [k for k, c in chains.items() if c["model_version"] is None and k[0] and k[1]]
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


def _deployments_of(
    name: str, version: str, image: str | None, *, imageless: bool = True
) -> Plan[list[Json]]:
    """Per deployment, the predictions of a model version (in ``image``, when given).

    With ``image``, predictions that name no image count too when ``imageless``.
    Predictions that name only an alias count when the alias points at the
    version and did since before the first of them (as ``completeness`` says).
    """
    sql = (
        "SELECT deployment_id, sum(predictions), min(CASE WHEN first_seen_ns > 0"
        " THEN first_seen_ns END), max(last_seen_ns) FROM ("
        "SELECT deployment_id, predictions, first_seen_ns, last_seen_ns, image_digest"
        " FROM served WHERE model_name = ? AND model_version = ?"
        " UNION ALL SELECT s.deployment_id, s.predictions, s.first_seen_ns, s.last_seen_ns,"
        " s.image_digest FROM served s JOIN model_aliases a"
        " ON a.name = s.model_name AND a.alias = s.model_alias"
        " WHERE s.model_name = ? AND s.model_version = '' AND s.model_alias <> ''"
        " AND a.version = ? AND s.first_seen_ns >= a.moved_ns) g WHERE 1 = 1"
    )
    args: tuple[object, ...] = (name, version, name, version)
    if image is not None:
        condition = " AND image_digest IN (?, '')" if imageless else " AND image_digest = ?"
        sql, args = sql + condition, (*args, image)
    rows = yield Fetch(sql + " GROUP BY deployment_id ORDER BY deployment_id", args)
    return [
        {
            "id": r[0],
            "predictions": int(r[1] or 0),
            "first_seen": iso_time(r[2] or 0),
            "last_seen": iso_time(r[3] or 0),
        }
        for r in rows
    ]


def model_lineage_plan(name: str, version: str) -> Plan[Json | None]:
    """A model version's run, commit, datasets, images and deployments, or None."""
    model = yield from model_plan(name, version)
    if model is None:
        return None
    run = (yield from run_plan(str(model["run_id"]))) if model["run_id"] else None
    deployments = yield from _deployments_of(name, version, None)
    for item in deployments:
        if item["id"]:
            item["node"] = yield from deployment_plan(str(item["id"]))
    model["images"] = yield from _images_of(name, version, model)
    missing = [hop for hop, ok in _hops_present(model, run, deployments) if not ok]
    return {
        "model_version": model,
        "run": run,
        "deployments": deployments,
        "predictions": sum(int(d["predictions"]) for d in deployments),  # type: ignore[call-overload]
        "missing": missing,
        "complete": not missing,
    }


def _images_of(name: str, version: str, model: Json | None) -> Plan[list[str]]:
    """The images a model version is known in: registered, and named by its predictions."""
    served = yield Fetch(
        "SELECT DISTINCT image_digest FROM served WHERE model_name = ? AND model_version = ?"
        " AND image_digest <> ''",
        (name, version),
    )
    registered = model["images"] if model is not None else []
    return sorted({*registered, *(r[0] for r in served)})  # type: ignore[misc]


def _imageless(name: str, version: str) -> Plan[int]:
    """How many predictions of a model version name no image."""
    rows = yield Fetch(
        "SELECT sum(predictions) FROM served WHERE model_name = ? AND model_version = ?"
        " AND image_digest = ''",
        (name, version),
    )
    return int(rows[0][0] or 0) if rows else 0


def _hops_present(model: Json, run: Json | None, deps: list[Json]) -> list[tuple[str, bool]]:
    return [
        ("run", run is not None),
        ("commit", run is not None and run["commit"] is not None),
        ("datasets", run is not None and bool(run["datasets"])),
        ("image", bool(model["images"])),
        ("deployment", any(d["id"] for d in deps)),
    ]


def _runs_for(kind: str, value: str) -> Plan[tuple[list[str], Json | None]]:
    if kind == "dataset":
        node = yield Fetch("SELECT digest, source, name FROM datasets WHERE digest = ?", (value,))
        runs = yield Fetch(
            "SELECT run_id FROM run_datasets WHERE digest = ? ORDER BY run_id", (value,)
        )
        found = {"digest": node[0][0], "source": node[0][1], "name": node[0][2]} if node else None
        return [r[0] for r in runs], found
    # Registration's rule (same_commit): case does not matter, and a short sha
    # of 7+ hex digits names the same commit as a full one, whichever was given
    # and whichever was stored. Every such form shares its first 7 characters.
    candidates = yield Fetch(
        "SELECT run_id, commit_sha FROM runs WHERE lower(substr(commit_sha, 1, 7)) = ?",
        (value[:_MIN_SHORT_SHA].lower(),),
    )
    runs = [r for r in candidates if same_commit(r[1], value)]
    shas = sorted({r[1] for r in runs})
    return sorted(r[0] for r in runs), ({"sha": shas} if shas else None)


def _models_for(kind: str, value: str, run_ids: Sequence[str]) -> Plan[list[Row]]:
    if kind == "image":
        rows = yield Fetch(
            "SELECT name, version FROM model_images WHERE image_digest = ?"
            " UNION SELECT model_name, model_version FROM served"
            " WHERE image_digest = ? AND model_version <> ''",
            (value, value),
        )
        return sorted(rows)
    if not run_ids:
        return []
    rows = yield Fetch(
        f"SELECT name, version FROM model_versions WHERE run_id IN ({in_list(len(run_ids))})",  # noqa: S608 - placeholders only
        tuple(run_ids),
    )
    return sorted(rows)


def impact_plan(kind: str, value: str) -> Plan[Json | None]:
    """From a dataset digest, commit sha (or prefix) or image digest to the predictions.

    Returns None when the store knows nothing of ``value``.
    """
    if kind not in ("dataset", "commit", "image"):
        raise ValueError(f"impact by {kind!r}: use dataset, commit or image")
    run_ids: list[str] = []
    node: Json | None = None
    if kind != "image":
        run_ids, node = yield from _runs_for(kind, value)
    models = yield from _models_for(kind, value, run_ids)
    if node is None and not run_ids and not models:
        return None
    versions = []
    for name, version in models:
        model = yield from model_plan(name, version)
        if kind != "image":
            deployments = yield from _deployments_of(name, version, None)
            versions.append(_impact_entry(name, version, model, deployments))
            continue
        # A prediction that names no image was served from this one only if
        # it is the version's only known image; else it is reported apart.
        sole = (yield from _images_of(name, version, model)) == [value]
        deployments = yield from _deployments_of(name, version, value, imageless=sole)
        entry = _impact_entry(name, version, model, deployments)
        entry["image_unknown"] = 0 if sole else (yield from _imageless(name, version))
        versions.append(entry)
    return {
        "query": {"kind": kind, "value": value},
        "node": node,
        "runs": run_ids,
        "model_versions": versions,
        "predictions": sum(int(v["predictions"]) for v in versions),  # type: ignore[call-overload]
    }


def _impact_entry(name: str, version: str, model: Json | None, deps: list[Json]) -> Json:
    firsts = [str(d["first_seen"]) for d in deps if d["first_seen"]]
    lasts = [str(d["last_seen"]) for d in deps if d["last_seen"]]
    return {
        "name": name,
        "version": version,
        "run_id": model["run_id"] if model else None,
        "predictions": sum(int(d["predictions"]) for d in deps),  # type: ignore[call-overload]
        "first_seen": min(firsts) if firsts else None,
        "last_seen": max(lasts) if lasts else None,
        "deployments": deps,
    }


def served_groups_plan() -> Plan[list[Row]]:
    """Every (deployment, model, version, alias, image) group with its prediction count."""
    rows = yield Fetch(
        "SELECT model_name, model_version, model_alias, deployment_id, image_digest, predictions,"
        " first_seen_ns FROM served WHERE predictions > 0"
        " ORDER BY model_name, model_version, deployment_id, image_digest"
    )
    return rows


def completeness_plan() -> Plan[Json]:
    """Per model: the share of predictions whose chain is complete, and what is missing."""
    groups = yield from served_groups_plan()
    models: dict[str, Json] = {}
    total = complete = 0
    for row in groups:
        chain = yield from chain_plan((row[0], row[1], row[2], row[3], row[4]), int(row[6] or 0))
        count = int(row[5])
        entry = models.setdefault(
            row[0], {"model": row[0], "predictions": 0, "complete": 0, "missing": {}}
        )
        entry["predictions"] = int(entry["predictions"]) + count  # type: ignore[call-overload]
        total += count
        if chain["complete"]:
            entry["complete"] = int(entry["complete"]) + count  # type: ignore[call-overload]
            complete += count
        for hop in chain["missing"]:  # type: ignore[attr-defined]
            counts = entry["missing"]
            assert isinstance(counts, dict)  # noqa: S101 - built just above
            counts[hop["hop"]] = counts.get(hop["hop"], 0) + count
    for entry in models.values():
        n = int(entry["predictions"])  # type: ignore[call-overload]
        entry["share"] = int(entry["complete"]) / n if n else 1.0  # type: ignore[call-overload]
    return {
        "predictions": total,
        "complete": complete,
        "share": complete / total if total else 1.0,
        "models": sorted(models.values(), key=lambda m: str(m["model"])),
    }

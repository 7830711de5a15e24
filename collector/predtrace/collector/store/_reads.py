"""Read plans behind the query API: the pivot, model lineage, impact, completeness, gaps.

Counts and time ranges come from ``served`` (deployment SERVES model version),
which the ingest plan keeps exact in the same transaction as the predictions
and retention keeps exact when it deletes them; so impact and completeness
cost one row per (deployment, model version, image), not one per prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from predtrace.collector.store._chain import (
    ChainKey,
    Json,
    chain_plan,
    deployment_plan,
    model_plan,
    run_plan,
)
from predtrace.collector.store._ops import Fetch, Plan, Row, in_list
from predtrace.collector.store._rows import SELECT_PREDICTION, iso_time, prediction_json

_FULL_SHA: Final = 40


def chain_key(row: Row) -> ChainKey:
    """The chain key of a prediction row."""
    return (row[8], row[9], row[10], row[14], row[19])


def predictions_plan(column: str, value: object, limit: int) -> Plan[list[Row]]:
    """Predictions by ``trace_id`` or ``prediction_id`` (both indexed), oldest first."""
    if column not in ("trace_id", "prediction_id"):
        raise ValueError(f"cannot look predictions up by {column}")
    rows = yield Fetch(
        f"{SELECT_PREDICTION} WHERE {column} = ? ORDER BY ts_ns, id LIMIT ?",
        (value, limit),
    )
    return rows


def pivot_plan(column: str, value: object, limit: int) -> Plan[tuple[list[Json], list[ChainKey]]]:
    """Predictions with their chains; also the keys whose model version is unregistered."""
    rows = yield from predictions_plan(column, value, limit)
    chains: dict[ChainKey, Json] = {}
    out = []
    for row in rows:
        key = chain_key(row)
        if key not in chains:
            chains[key] = yield from chain_plan(key)
        prediction = prediction_json(row)
        prediction["lineage"] = chains[key]
        out.append(prediction)
    unresolved = [k for k, c in chains.items() if c["model_version"] is None and k[0] and k[1]]
    return out, unresolved


def _deployments_of(name: str, version: str, image: str | None) -> Plan[list[Json]]:
    sql = (
        "SELECT deployment_id, sum(predictions), min(CASE WHEN first_seen_ns > 0"
        " THEN first_seen_ns END), max(last_seen_ns) FROM served"
        " WHERE model_name = ? AND model_version = ?"
    )
    args: tuple[object, ...] = (name, version)
    if image is not None:
        sql, args = sql + " AND image_digest IN (?, '')", (*args, image)
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
    images = yield Fetch(
        "SELECT DISTINCT image_digest FROM served WHERE model_name = ? AND model_version = ?"
        " AND image_digest <> ''",
        (name, version),
    )
    model["images"] = sorted({*model["images"], *(r[0] for r in images)})  # type: ignore[misc]
    missing = [hop for hop, ok in _hops_present(model, run, deployments) if not ok]
    return {
        "model_version": model,
        "run": run,
        "deployments": deployments,
        "predictions": sum(int(d["predictions"]) for d in deployments),  # type: ignore[call-overload]
        "missing": missing,
        "complete": not missing,
    }


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
    if len(value) >= _FULL_SHA:
        runs = yield Fetch("SELECT run_id, commit_sha FROM runs WHERE commit_sha = ?", (value,))
    else:
        runs = yield Fetch(
            "SELECT run_id, commit_sha FROM runs WHERE substr(commit_sha, 1, ?) = ?",
            (len(value), value),
        )
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
        deployments = yield from _deployments_of(name, version, value if kind == "image" else None)
        versions.append(_impact_entry(name, version, model, deployments))
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
        "SELECT model_name, model_version, model_alias, deployment_id, image_digest, predictions"
        " FROM served WHERE predictions > 0"
        " ORDER BY model_name, model_version, deployment_id, image_digest"
    )
    return rows


def completeness_plan() -> Plan[Json]:
    """Per model: the share of predictions whose chain is complete, and what is missing."""
    groups = yield from served_groups_plan()
    models: dict[str, Json] = {}
    total = complete = 0
    for row in groups:
        chain = yield from chain_plan((row[0], row[1], row[2], row[3], row[4]))
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

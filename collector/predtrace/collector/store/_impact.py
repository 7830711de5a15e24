"""Read plans from a node of the lineage graph to the predictions: model lineage, impact.

A model version's lineage (its run, commit, datasets, images, deployments)
and the impact of a dataset, commit or image (the model versions built from
it, and where and how much they served). Counts and time ranges come from
``served`` (deployment SERVES model version), which the ingest plan keeps
exact in the same transaction as the predictions and retention keeps exact
when it deletes them; so these cost one row per (deployment, model version,
image), not one per prediction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final

from predtrace.collector.store._chain import (
    ALIAS_HOLDS,
    ALIAS_JOIN,
    DEPLOYMENT_COLUMNS,
    Json,
    deployment_node,
    image_key,
    known_images_plan,
    model_plan,
    run_missing,
    run_plan,
)
from predtrace.collector.store._commits import (
    MIN_SHORT_SHA,
    AmbiguousCommitError,
    distinct_commits,
    same_commit,
)
from predtrace.collector.store._ops import Fetch, Plan, Row, in_list
from predtrace.collector.store._rows import iso_time

_HEX64: Final = re.compile(r"[0-9a-f]{64}")


DEPLOYMENTS_LISTED: Final = 1000
"""Deployments a model version lists in a lineage or impact answer: those with the
most predictions (ties by id), in that order. Its totals count every one."""


def _served_of(
    name: str, version: str, image: Sequence[str] | None, imageless: bool
) -> tuple[str, tuple[object, ...]]:
    """``FROM`` text (with its arguments) of the served groups of a model version.

    ``image``: the spellings of one image. With it, predictions that name no
    image count too when ``imageless``.
    Predictions that name only an alias count when the alias points at the
    version and did since before the first of them (``ALIAS_HOLDS``, as
    ``trace`` and ``completeness`` say).
    """
    sql = (
        "(SELECT deployment_id, predictions, first_seen_ns, last_seen_ns, image_digest"  # noqa: S608 - fixed SQL fragments, values are bound
        " FROM served WHERE model_name = ? AND model_version = ?"
        " UNION ALL SELECT s.deployment_id, s.predictions, s.first_seen_ns, s.last_seen_ns,"
        f" s.image_digest FROM {ALIAS_JOIN}"
        " WHERE s.model_name = ? AND s.model_version = '' AND s.model_alias <> ''"
        f" AND a.version = ? AND {ALIAS_HOLDS}) g WHERE 1 = 1"
    )
    args: tuple[object, ...] = (name, version, name, version)
    if image is not None:
        forms = (*image, "") if imageless else tuple(image)
        sql, args = sql + f" AND image_digest IN ({in_list(len(forms))})", (*args, *forms)
    return sql, args


# First and last sight of what a group or a version served (a prediction
# without a timestamp is first seen at 0: not a time).
_FIRST: Final = "min(CASE WHEN first_seen_ns > 0 THEN first_seen_ns END)"
_LAST: Final = "max(last_seen_ns)"
# The deployment node's columns, of the listing's ``LEFT JOIN deployments d``.
_NODE: Final = ", ".join(f"d.{c.strip()}" for c in DEPLOYMENT_COLUMNS.split(","))


def _deployments_of(
    name: str,
    version: str,
    image: Sequence[str] | None = None,
    *,
    imageless: bool = True,
    nodes: bool = False,
) -> Plan[Json]:
    """What a model version served (in ``image``, when given; see ``_served_of``).

    ``deployments``: up to ``DEPLOYMENTS_LISTED``, each with its predictions,
    time range and, with ``nodes``, its stored ``node`` (id '' has none); ``predictions``,
    ``first_seen`` and ``last_seen`` cover every deployment, as do
    ``deployments_total`` and ``deployments_truncated`` (completeness's
    ``total`` and ``truncated``); ``named``: whether any names a deployment.
    """
    source, args = _served_of(name, version, image, imageless)
    totals = yield Fetch(
        "SELECT count(DISTINCT deployment_id),"  # noqa: S608 - fixed SQL fragments, values are bound
        " count(DISTINCT CASE WHEN deployment_id <> '' THEN deployment_id END),"
        f" sum(predictions), {_FIRST}, {_LAST} FROM {source}",
        args,
    )
    # The deployment nodes in the same query: one lookup per listed one
    # would be a thousand round trips on PostgreSQL.
    rows = yield Fetch(
        f"SELECT l.deployment_id, l.n, l.first_ns, l.last_ns, {_NODE} FROM"  # noqa: S608 - fixed SQL fragments, values are bound
        " (SELECT deployment_id, coalesce(sum(predictions), 0) AS n,"
        f" {_FIRST} AS first_ns, {_LAST} AS last_ns FROM {source}"
        " GROUP BY deployment_id ORDER BY n DESC, deployment_id LIMIT ?) l"
        " LEFT JOIN deployments d ON d.id = l.deployment_id ORDER BY l.n DESC, l.deployment_id",
        (*args, DEPLOYMENTS_LISTED),
    )
    total, named, predictions, first_ns, last_ns = totals[0]
    return {
        "deployments": [_deployment(r, nodes) for r in rows],
        "deployments_total": int(total),
        "deployments_truncated": int(total) > len(rows),
        "predictions": int(predictions or 0),
        "first_seen": iso_time(first_ns or 0),
        "last_seen": iso_time(last_ns or 0),
        "named": bool(named),
    }


def _deployment(row: Row, node: bool) -> Json:
    """A listed deployment of ``_deployments_of``'s listing row, with its ``node``."""
    item: Json = {
        "id": row[0],
        "predictions": int(row[1] or 0),
        "first_seen": iso_time(row[2] or 0),
        "last_seen": iso_time(row[3] or 0),
    }
    if node and row[0]:
        item["node"] = deployment_node(row[4:]) if row[4] is not None else None
    return item


def model_lineage_plan(name: str, version: str) -> Plan[Json | None]:
    """A model version's run, commit, datasets, images and deployments, or None.

    ``missing`` names the hops not known; ``missing_reasons`` says why each
    is missing, as ``trace`` does (same shape as a chain's ``missing``).
    ``deployments`` lists at most ``DEPLOYMENTS_LISTED`` (see ``_deployments_of``).
    """
    model = yield from model_plan(name, version)
    if model is None:
        return None
    run = (yield from run_plan(str(model["run_id"]))) if model["run_id"] else None
    served = yield from _deployments_of(name, version, nodes=True)
    model["images"] = yield from _images_of(name, version, model)
    reasons = _lineage_missing(name, version, model, run, bool(served["named"]))
    return {
        "model_version": model,
        "run": run,
        "deployments": served["deployments"],
        "deployments_total": served["deployments_total"],
        "deployments_truncated": served["deployments_truncated"],
        "predictions": served["predictions"],
        "missing": [str(m["hop"]) for m in reasons],
        "missing_reasons": reasons,
        "complete": not reasons,
    }


def _lineage_missing(
    name: str, version: str, model: Json, run: Json | None, deployed: bool
) -> list[Json]:
    """The missing hops of a model version's lineage, each with its reason."""
    missing: list[Json] = []

    def miss(hop: str, reason: str) -> None:
        missing.append({"hop": hop, "reason": reason})

    if run is None:
        reason = "registered without a run" if not model["run_id"] else "run is not registered"
        miss("run", f"model version {name}/{version}: {reason} ({model['run_id'] or '-'})")
    run_missing(run, True, miss)
    if not model["images"]:
        miss(
            "image", f"no image registered for {name}/{version}, and none named by its predictions"
        )
    if not deployed:
        miss(
            "deployment",
            f"no deployment registered for {name}/{version}, and none named by its predictions",
        )
    order = ("run", "commit", "datasets", "image", "deployment")
    return sorted(missing, key=lambda m: order.index(str(m["hop"])))


def _images_of(name: str, version: str, model: Json | None) -> Plan[list[str]]:
    """The images a model version is known in: registered, and named by its predictions."""
    registered = model["images"] if model is not None else []
    assert isinstance(registered, list)  # noqa: S101 - model_plan sets a list
    return (yield from known_images_plan(name, version, [str(i) for i in registered]))


def _imageless(name: str, version: str) -> Plan[int]:
    """How many predictions of a model version name no image (by version or alias)."""
    rows = yield Fetch(
        "SELECT sum(predictions) FROM (SELECT predictions FROM served"  # noqa: S608 - fixed SQL fragments, values are bound
        " WHERE model_name = ? AND model_version = ? AND image_digest = ''"
        f" UNION ALL SELECT s.predictions FROM {ALIAS_JOIN}"
        " WHERE s.model_name = ? AND s.model_version = '' AND s.model_alias <> ''"
        f" AND a.version = ? AND s.image_digest = '' AND {ALIAS_HOLDS}) g",
        (name, version, name, version),
    )
    return int(rows[0][0] or 0) if rows else 0


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
        (value[:MIN_SHORT_SHA].lower(),),
    )
    runs = [r for r in candidates if same_commit(r[1], value)]
    shas = sorted({r[1] for r in runs})
    commits = distinct_commits(shas)
    if len(commits) > 1:
        raise AmbiguousCommitError(value, commits)
    return sorted(r[0] for r in runs), ({"sha": shas} if shas else None)


def _image_spellings(value: str) -> Plan[list[str]]:
    """The stored spellings of the image ``value`` names (``image_key``), ``value`` first.

    A CI hook registers ``sha256:X``, a runtime may report ``repo@sha256:X``
    or ``X``: one image. Only a sha256 digest has other spellings; any other
    text is matched as given.
    """
    key = image_key(value)
    if not _HEX64.fullmatch(key):
        return [value]
    # LIKE narrows (these tables hold a row per image or group, not per
    # prediction); image_key decides.
    pattern = f"%{key}"
    rows = yield Fetch(
        "SELECT image_digest FROM served WHERE lower(image_digest) LIKE ?"
        " UNION SELECT image_digest FROM model_images WHERE lower(image_digest) LIKE ?"
        " UNION SELECT digest FROM images WHERE lower(digest) LIKE ?",
        (pattern, pattern, pattern),
    )
    stored = {str(r[0]) for r in rows if image_key(str(r[0])) == key}
    return [value, *sorted(stored - {value})]


def _models_for(kind: str, values: Sequence[str], run_ids: Sequence[str]) -> Plan[list[Row]]:
    if kind == "image":
        # Predictions that name only an alias count for the version it
        # points at, by the pivot's rule (as in ``_deployments_of``).
        marks = in_list(len(values))
        rows = yield Fetch(
            f"SELECT name, version FROM model_images WHERE image_digest IN ({marks})"  # noqa: S608 - fixed SQL fragments, values are bound
            " UNION SELECT model_name, model_version FROM served"
            f" WHERE image_digest IN ({marks}) AND model_version <> ''"
            f" UNION SELECT a.name, a.version FROM {ALIAS_JOIN}"
            f" WHERE s.image_digest IN ({marks}) AND s.model_version = ''"
            f" AND s.model_alias <> '' AND {ALIAS_HOLDS}",
            (*values, *values, *values),
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

    An image is found in any of its spellings (``image_key``); the answer's
    node names those stored. Returns None when the store knows nothing of
    ``value``.

    Raises:
        AmbiguousCommitError: a short sha that several stored commits begin with.
    """
    if kind not in ("dataset", "commit", "image"):
        raise ValueError(f"impact by {kind!r}: use dataset, commit or image")
    run_ids: list[str] = []
    node: Json | None = None
    spellings = [value]
    if kind != "image":
        run_ids, node = yield from _runs_for(kind, value)
    else:
        spellings = yield from _image_spellings(value)
        if len(spellings) > 1:
            node = {"digest": value, "stored_as": spellings[1:]}
    models = yield from _models_for(kind, spellings, run_ids)
    if node is None and not run_ids and not models:
        return None
    versions = []
    for name, version in models:
        model = yield from model_plan(name, version)
        if kind != "image":
            served = yield from _deployments_of(name, version)
            versions.append(_impact_entry(name, version, model, served))
            continue
        # A prediction that names no image was served from this one only if
        # it is the version's only known image; else it is reported apart.
        images = yield from _images_of(name, version, model)
        sole = {image_key(i) for i in images} == {image_key(value)}
        served = yield from _deployments_of(name, version, spellings, imageless=sole)
        entry = _impact_entry(name, version, model, served)
        entry["image_unknown"] = 0 if sole else (yield from _imageless(name, version))
        versions.append(entry)
    return {
        "query": {"kind": kind, "value": value},
        "node": node,
        "runs": run_ids,
        "model_versions": versions,
        "predictions": sum(int(v["predictions"]) for v in versions),  # type: ignore[call-overload]
    }


def _impact_entry(name: str, version: str, model: Json | None, served: Json) -> Json:
    """One model version of an impact answer: what ``_deployments_of`` found it served."""
    return {
        "name": name,
        "version": version,
        "run_id": model["run_id"] if model else None,
        "predictions": served["predictions"],
        "first_seen": served["first_seen"],
        "last_seen": served["last_seen"],
        "deployments": served["deployments"],
        "deployments_total": served["deployments_total"],
        "deployments_truncated": served["deployments_truncated"],
    }

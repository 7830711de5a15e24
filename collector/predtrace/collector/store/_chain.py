"""The lineage chain of one prediction group, as a store plan (DESIGN §3, §7).

prediction -> deployment (pod, image digest) -> model version -> training run ->
commit and datasets. Every hop that cannot be followed is named in ``missing``
with the reason, so the on-call engineer sees exactly where the chain breaks.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final

from predtrace.collector.store._ops import Fetch, Plan
from predtrace.collector.store._rows import iso_time

ChainKey = tuple[str, str, str, str, str]
"""(model name, model version, model alias, deployment id, image digest)."""
Json = dict[str, object]
HOPS: Final = ("deployment", "image", "model_version", "run", "commit", "datasets")


def deployment_plan(deployment_id: str) -> Plan[Json | None]:
    """The deployment node, or None when nothing is stored under that id."""
    rows = yield Fetch(
        "SELECT id, service, namespace, started_ns, ended_ns, first_seen_ns, last_seen_ns,"
        " origin FROM deployments WHERE id = ?",
        (deployment_id,),
    )
    if not rows:
        return None
    row = rows[0]
    return {
        "id": row[0],
        "service": row[1],
        "namespace": row[2],
        "started": iso_time(row[3]),
        "ended": iso_time(row[4]),
        "first_seen": iso_time(row[5]),
        "last_seen": iso_time(row[6]),
        "origin": row[7],
    }


def model_plan(name: str, version: str) -> Plan[Json | None]:
    """The model version node with its aliases and images, or None."""
    rows = yield Fetch(
        "SELECT name, version, registry, registry_id, artifact_digest, source, run_id, origin"
        " FROM model_versions WHERE name = ? AND version = ?",
        (name, version),
    )
    if not rows:
        return None
    aliases = yield Fetch(
        "SELECT alias FROM model_aliases WHERE name = ? AND version = ? ORDER BY alias",
        (name, version),
    )
    images = yield Fetch(
        "SELECT image_digest FROM model_images WHERE name = ? AND version = ?"
        " ORDER BY image_digest",
        (name, version),
    )
    keys = ("name", "version", "registry", "registry_id", "artifact_digest", "source", "run_id")
    model: Json = dict(zip(keys, rows[0][:7], strict=True))
    model["origin"] = rows[0][7]
    model["aliases"] = [r[0] for r in aliases]
    model["images"] = [r[0] for r in images]
    return model


def run_plan(run_id: str) -> Plan[Json | None]:
    """The run node with its commit and datasets, or None."""
    rows = yield Fetch(
        "SELECT run_id, registry, name, url, params, metrics, tags, commit_sha, origin"
        " FROM runs WHERE run_id = ?",
        (run_id,),
    )
    if not rows:
        return None
    row = rows[0]
    run: Json = {"id": row[0], "registry": row[1], "name": row[2], "url": row[3]}
    run.update(params=json.loads(row[4]), metrics=json.loads(row[5]), tags=json.loads(row[6]))
    run["origin"] = row[8]
    run["commit"] = None
    if row[7]:
        commits = yield Fetch("SELECT sha, repo FROM commits WHERE sha = ?", (row[7],))
        run["commit"] = {"sha": row[7], "repo": commits[0][1] if commits else ""}
    datasets = yield Fetch(
        "SELECT d.digest, d.source, d.name, u.context FROM run_datasets u"
        " JOIN datasets d ON d.digest = u.digest WHERE u.run_id = ? ORDER BY d.digest",
        (run_id,),
    )
    run["datasets"] = [
        {"digest": d[0], "source": d[1], "name": d[2], "context": d[3]} for d in datasets
    ]
    return run


def image_plan(digest: str) -> Plan[Json]:
    """The image node (a digest with no stored name still is a node)."""
    rows = yield Fetch("SELECT name FROM images WHERE digest = ?", (digest,))
    return {"digest": digest, "name": rows[0][0] if rows else ""}


def _resolve_version(
    name: str, version: str, alias: str, since_ns: int
) -> Plan[tuple[str, bool, str]]:
    """(version, resolved through the alias, why not) of what a prediction names.

    An alias resolves to the version it points at only for predictions made
    after it last moved there (``since_ns``, the earliest of them; 0: not
    known): an older one was served by an earlier version.
    """
    if version or not (name and alias):
        return version, False, ""
    rows = yield Fetch(
        "SELECT version, moved_ns FROM model_aliases WHERE name = ? AND alias = ?",
        (name, alias),
    )
    if not rows:
        return "", False, ""
    current, moved_ns = rows[0][0], int(rows[0][1] or 0)
    if since_ns and since_ns < moved_ns:
        return (
            "",
            False,
            (
                f"model {name} has no version, and alias {alias!r} was moved to version "
                f"{current} at {iso_time(moved_ns)}, after these predictions began "
                f"({iso_time(since_ns)}): the version that served them is unknown"
            ),
        )
    return current, True, ""


def alias_moved_plan(name: str, alias: str) -> Plan[int]:
    """When alias ``name@alias`` was last moved to another version (0: never, or unknown)."""
    rows = yield Fetch(
        "SELECT moved_ns FROM model_aliases WHERE name = ? AND alias = ?", (name, alias)
    )
    return int(rows[0][0] or 0) if rows else 0


def _model_missing(name: str, version: str, alias: str) -> str:
    if not name:
        return "the prediction names no model"
    if not version:
        return f"model {name} has no version and alias {alias!r} is not registered"
    return f"model version {name}/{version} is not registered (CI hook, OpenLineage or MLflow)"


def chain_plan(key: ChainKey, since_ns: int = 0) -> Plan[Json]:
    """The chain of one (model, deployment, image) group with its missing hops.

    ``since_ns``: when the earliest prediction explained was made (0: not
    known), for a group that names only an alias (see ``_resolve_version``).
    """
    name, version, alias, deployment_id, image = key
    missing: list[Json] = []

    def miss(hop: str, reason: str) -> None:
        missing.append({"hop": hop, "reason": reason})

    version, via_alias, unresolved = yield from _resolve_version(name, version, alias, since_ns)
    deployment = (yield from deployment_plan(deployment_id)) if deployment_id else None
    if deployment_id and deployment is None:
        deployment = {"id": deployment_id}
    if not deployment_id:
        miss("deployment", "the prediction names no deployment (deployment id or service)")
    model = (yield from model_plan(name, version)) if name and version else None
    run = None
    if model is None:
        miss("model_version", unresolved or _model_missing(name, version, alias))
    else:
        model["resolved_via_alias"] = alias if via_alias else None
        run = (yield from run_plan(str(model["run_id"]))) if model["run_id"] else None
    images = model["images"] if model is not None else []
    image_digest = image or (str(images[0]) if isinstance(images, list) and images else "")
    if not image_digest:
        miss("image", "no image digest in the event and none registered for the model version")
    if model is not None and run is None:
        reason = "registered without a run" if not model["run_id"] else "run is not registered"
        miss("run", f"model version {name}/{version}: {reason} ({model['run_id'] or '-'})")
    if model is None:
        miss("run", "unknown: the model version is not registered")
    _run_missing(run, model is not None, miss)
    chain: Json = {
        "deployment": deployment,
        "image": (yield from image_plan(image_digest)) if image_digest else None,
        "model_version": model,
        "run": run,
        "missing": sorted(missing, key=lambda m: HOPS.index(str(m["hop"]))),
        "complete": not missing,
    }
    return chain


def _run_missing(run: Json | None, known: bool, miss: Callable[[str, str], None]) -> None:
    if run is None:
        reason = "unknown: no training run" if known else "unknown: no model version"
        miss("commit", reason)
        miss("datasets", reason)
        return
    if run["commit"] is None:
        miss("commit", f"run {run['id']} has no commit (tag mlflow.source.git.commit)")
    if not run["datasets"]:
        miss("datasets", f"run {run['id']} logged no dataset inputs")

"""The lineage chain of one prediction group, as a store plan (DESIGN §3, §7).

prediction -> deployment (pod, image digest) -> model version -> training run ->
commit and datasets. Every hop that cannot be followed is named in ``missing``
with the reason, so the on-call engineer sees exactly where the chain breaks.
``chain_plan`` gives the nodes too; ``chain_gaps_plan`` only the missing hops,
for groups an answer counts but does not list (a run's body may be large).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Final, Literal

from predtrace.collector.store._ops import Fetch, Plan, Row
from predtrace.collector.store._rows import iso_time

ChainKey = tuple[str, str, str, str, str]
"""(model name, model version, model alias, deployment id, image digest)."""
Json = dict[str, object]
HOPS: Final = ("deployment", "image", "model_version", "run", "commit", "datasets")


DEPLOYMENT_COLUMNS: Final = (
    "id, service, namespace, started_ns, ended_ns, first_seen_ns, last_seen_ns, origin"
)
"""The ``deployments`` columns of a node (``deployment_node``), in its order."""


def deployment_plan(deployment_id: str) -> Plan[Json | None]:
    """The deployment node, or None when nothing is stored under that id."""
    rows = yield Fetch(
        f"SELECT {DEPLOYMENT_COLUMNS} FROM deployments WHERE id = ?",  # noqa: S608 - fixed SQL fragments, values are bound
        (deployment_id,),
    )
    return deployment_node(rows[0]) if rows else None


def deployment_node(row: Row) -> Json:
    """The deployment node of a row of ``DEPLOYMENT_COLUMNS``."""
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


AliasState = Literal["", "untimed", "moved", "registered"]
"""Whether a prediction naming only an alias is explained by the alias's version.

"": it is. "untimed": it has no timestamp and the alias has moved (or was
first learned after predictions named it). "moved": it was made before the
alias last moved, or before the store first learned the alias while
predictions already named it. "registered": it was made before the store
learned of the version the alias points at.
"""

# An alias-only ``served`` row ``s`` counts for the version its alias ``a``
# points at (whose ``model_versions`` row is ``v``) by ``alias_state``'s rule,
# applied to the row's first prediction: its first timestamped one
# (``first_seen_ns``), or 0 when none of its predictions has a timestamp.
ALIAS_HOLDS: Final = (
    "((s.first_seen_ns > 0 AND s.first_seen_ns >= a.moved_ns"
    " AND s.first_seen_ns >= coalesce(v.registered_ns, 0))"
    " OR (s.first_seen_ns = 0 AND a.moved_ns = 0))"
)
ALIAS_JOIN: Final = (
    "served s JOIN model_aliases a ON a.name = s.model_name AND a.alias = s.model_alias"
    " LEFT JOIN model_versions v ON v.name = a.name AND v.version = a.version"
)
"""``FROM`` text of the alias-only served rows with their alias and its version."""


def alias_state(ts_ns: int | None, moved_ns: int, registered_ns: int) -> AliasState:
    """Whether a prediction made at ``ts_ns`` is explained by its alias's current version.

    ``moved_ns``: since when the alias points there (0: since before any
    prediction named it); ``registered_ns``: when the store learned of that
    version. ``ts_ns`` None: no particular prediction (the alias as it is
    now); 0: a prediction without a timestamp, which may be from any time,
    so it is explained only by an alias that never moved.
    """
    if ts_ns is None:
        return ""
    if ts_ns == 0:
        return "untimed" if moved_ns else ""
    if ts_ns < moved_ns:
        return "moved"
    # A version the store learned of after the prediction: the alias may
    # have pointed elsewhere then (MLflow's creation time is not stored; the
    # store's first sight of the version is no earlier than it).
    if ts_ns < registered_ns:
        return "registered"
    return ""


def alias_plan(name: str, alias: str) -> Plan[tuple[str, int, int] | None]:
    """(version, moved_ns, the version's registered_ns) of an alias, or None."""
    rows = yield Fetch(
        "SELECT a.version, a.moved_ns, coalesce(v.registered_ns, 0) FROM model_aliases a"
        " LEFT JOIN model_versions v ON v.name = a.name AND v.version = a.version"
        " WHERE a.name = ? AND a.alias = ?",
        (name, alias),
    )
    if not rows:
        return None
    return str(rows[0][0]), int(rows[0][1] or 0), int(rows[0][2] or 0)


def _unresolved_reason(
    name: str, alias: str, known: tuple[str, int, int], state: AliasState, since_ns: int
) -> str:
    current, moved_ns, registered_ns = known
    head = f"model {name} has no version, and alias {alias!r}"
    tail = "the version that served them is unknown"
    if state == "untimed":
        return (
            f"model {name} has no version, the prediction has no timestamp, and alias "
            f"{alias!r} was moved to version {current}, or first made known to the store, "
            f"at {iso_time(moved_ns)}: the version that served it is unknown"
        )
    if state == "moved":
        return (
            f"{head} was moved to version {current}, or first made known to the store, at "
            f"{iso_time(moved_ns)}, after these predictions began ({iso_time(since_ns)}): {tail}"
        )
    return (
        f"{head} points at version {current}, which the store learned of at "
        f"{iso_time(registered_ns)}, after these predictions began ({iso_time(since_ns)}): "
        f"{tail}"
    )


class Nodes:
    """How a chain reads the alias, model version, run and images its hops follow.

    These read them whole, each time: what a listed chain shows. The pivot's
    unlisted groups read through a subclass (``_reads``) that takes only what
    their missing hops need, once per answer.
    """

    def alias(self, name: str, alias: str) -> Plan[tuple[str, int, int] | None]:
        """``alias_plan``."""
        return (yield from alias_plan(name, alias))

    def model(self, name: str, version: str) -> Plan[Json | None]:
        """``model_plan``."""
        return (yield from model_plan(name, version))

    def run(self, run_id: str) -> Plan[Json | None]:
        """``run_plan``: ``run_missing`` reads its ``id``, ``commit`` and ``datasets``."""
        return (yield from run_plan(run_id))

    def images(self, name: str, version: str, registered: list[str]) -> Plan[list[str]]:
        """``known_images_plan``."""
        return (yield from known_images_plan(name, version, registered))


def _resolve_version(
    name: str, version: str, alias: str, since_ns: int | None, nodes: Nodes
) -> Plan[tuple[str, bool, str]]:
    """(version, resolved through the alias, why not) of what a prediction names.

    An alias resolves to the version it points at only for predictions it
    pointed there for (``alias_state``; ``since_ns``: the earliest of them).
    """
    if version or not (name and alias):
        return version, False, ""
    known = yield from nodes.alias(name, alias)
    if known is None:
        return "", False, ""
    state = alias_state(since_ns, known[1], known[2])
    if state:
        return "", False, _unresolved_reason(name, alias, known, state, since_ns or 0)
    return known[0], True, ""


def known_images_plan(name: str, version: str, registered: list[str]) -> Plan[list[str]]:
    """The images a model version is known in: ``registered``, and named by its predictions.

    Predictions that name only an alias count for the version by the rule
    the pivot explains them by (``ALIAS_HOLDS``).
    """
    served = yield Fetch(
        "SELECT DISTINCT image_digest FROM served WHERE model_name = ? AND model_version = ?"  # noqa: S608 - fixed SQL fragments, values are bound
        " AND image_digest <> ''"
        f" UNION SELECT DISTINCT s.image_digest FROM {ALIAS_JOIN}"
        " WHERE s.model_name = ? AND s.model_version = '' AND s.model_alias <> ''"
        f" AND a.version = ? AND s.image_digest <> '' AND {ALIAS_HOLDS}",
        (name, version, name, version),
    )
    return sorted({*registered, *(str(r[0]) for r in served)})


def _model_missing(name: str, version: str, alias: str) -> str:
    if not name:
        return "the prediction names no model"
    if not version:
        return f"model {name} has no version and alias {alias!r} is not registered"
    return f"model version {name}/{version} is not registered (CI hook, OpenLineage or MLflow)"


class _Hops:
    """What a group's chain found: its model version, run and image, and the hops missing."""

    __slots__ = ("image", "missing", "model", "run", "via_alias")

    def __init__(self) -> None:
        self.model: Json | None = None
        self.run: Json | None = None
        self.image, self.via_alias = "", False
        self.missing: list[Json] = []

    def miss(self, hop: str, reason: str) -> None:
        self.missing.append({"hop": hop, "reason": reason})


def _hops_plan(key: ChainKey, since_ns: int | None, nodes: Nodes) -> Plan[_Hops]:
    """Follow a group's chain through ``nodes``; ``missing`` ends in ``HOPS`` order."""
    name, version, alias, deployment_id, image = key
    hops = _Hops()
    version, hops.via_alias, unresolved = yield from _resolve_version(
        name, version, alias, since_ns, nodes
    )
    if not deployment_id:
        hops.miss("deployment", "the prediction names no deployment (deployment id or service)")
    model = (yield from nodes.model(name, version)) if name and version else None
    if model is None:
        hops.miss("model_version", unresolved or _model_missing(name, version, alias))
    elif model["run_id"]:
        hops.run = yield from nodes.run(str(model["run_id"]))
    hops.image = image
    if not image and model is not None:
        hops.image, reason = yield from _only_image(name, version, model, nodes)
        if reason:
            hops.miss("image", reason)
    elif not image:
        hops.miss("image", "no image digest in the event, and no model version to look one up by")
    if model is not None and hops.run is None:
        reason = "registered without a run" if not model["run_id"] else "run is not registered"
        hops.miss("run", f"model version {name}/{version}: {reason} ({model['run_id'] or '-'})")
    if model is None:
        hops.miss("run", "unknown: the model version is not registered")
    run_missing(hops.run, model is not None, hops.miss)
    hops.missing.sort(key=lambda m: HOPS.index(str(m["hop"])))
    hops.model = model
    return hops


def chain_plan(key: ChainKey, since_ns: int | None = None) -> Plan[Json]:
    """The chain of one (model, deployment, image) group with its missing hops.

    ``since_ns``: when the earliest prediction explained was made (0: it has
    no timestamp; None: no particular prediction), for a group that names
    only an alias (see ``alias_state``).
    """
    hops = yield from _hops_plan(key, since_ns, Nodes())
    deployment_id = key[3]
    deployment = (yield from deployment_plan(deployment_id)) if deployment_id else None
    if deployment_id and deployment is None:
        deployment = {"id": deployment_id}
    if hops.model is not None:
        hops.model["resolved_via_alias"] = key[2] if hops.via_alias else None
    chain: Json = {
        "deployment": deployment,
        "image": (yield from image_plan(hops.image)) if hops.image else None,
        "model_version": hops.model,
        "run": hops.run,
        "missing": hops.missing,
        "complete": not hops.missing,
    }
    return chain


def chain_gaps_plan(key: ChainKey, since_ns: int | None, nodes: Nodes) -> Plan[tuple[Json, bool]]:
    """(``{"complete", "missing"}`` of a group's chain, its model version is registered).

    As ``chain_plan`` says them, without the nodes: for groups an answer
    counts but does not list, whose nodes ``nodes`` may read in part.
    """
    hops = yield from _hops_plan(key, since_ns, nodes)
    return {"complete": not hops.missing, "missing": hops.missing}, hops.model is not None


def image_key(text: str) -> str:
    """What identifies an image digest however it is spelled: the digest's hex digits.

    ``sha256:X`` (a CI hook), ``repo@sha256:X`` and ``docker-pullable://repo@sha256:X``
    (what a runtime reports), and ``X`` alone name one image; case does not
    matter. Text of another shape is its own key.
    """
    text = text.strip().lower()
    head, sep, tail = text.rpartition("sha256:")
    return tail if sep and (not head or head.endswith(("@", "://"))) else text


def _only_image(name: str, version: str, model: Json, nodes: Nodes) -> Plan[tuple[str, str]]:
    """(image, why none) of a prediction that names no image, by its model version.

    The version's image only when it has one known image (registered, or
    named by its other predictions): of several, which one served the
    prediction is not known (``impact --image`` counts it apart for the same
    reason).
    """
    registered = model["images"] if isinstance(model["images"], list) else []
    images = yield from nodes.images(name, version, [str(i) for i in registered])
    distinct = len({image_key(i) for i in images})
    if distinct == 1:
        # One image, perhaps in several spellings: sha256:X when stored so.
        plain = sorted(images, key=lambda i: (not i.lower().startswith("sha256:"), len(i), i))
        return plain[0], ""
    if not images:
        return "", (
            f"no image digest in the event and none known for model version {name}/{version}"
        )
    return "", (
        f"the event names no image, and model version {name}/{version} is in "
        f"{distinct} images ({', '.join(images[:3])}{', …' if len(images) > 3 else ''})"
    )


def run_missing(run: Json | None, known: bool, miss: Callable[[str, str], None]) -> None:
    """Name the commit and datasets hops a run lacks (``known``: the model version is).

    ``run``: its ``commit`` (None when it has none) and ``datasets`` (empty
    or false when it logged none) are read, nothing more.
    """
    if run is None:
        reason = "unknown: no training run" if known else "unknown: no model version"
        miss("commit", reason)
        miss("datasets", reason)
        return
    if run["commit"] is None:
        miss("commit", f"run {run['id']} has no commit (tag mlflow.source.git.commit)")
    if not run["datasets"]:
        miss("datasets", f"run {run['id']} logged no dataset inputs")

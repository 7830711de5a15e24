"""The write plan of one lineage registration (CI hook, MLflow, OpenLineage, API).

A registration merges runs, commits, datasets, model versions, aliases,
images and deployments into the graph. Links that answer "trained on what"
are evidence: a registration that contradicts them is refused, replaces
them, or keeps them, as its caller says (``OnConflict``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final, Literal

from predtrace.collector._errors import LineageConflictError
from predtrace.collector.lineage import Registration
from predtrace.collector.store._commits import MIN_SHORT_SHA, same_commit
from predtrace.collector.store._ops import Exec, ExecMany, Fetch, Plan, Serialize, in_list


def _merge(table: str, column: str) -> str:
    """Keep the stored value when the new one is empty."""
    return (
        f"{column} = CASE WHEN excluded.{column} <> '' THEN excluded.{column}"
        f" ELSE {table}.{column} END"
    )


def _fill(table: str, column: str) -> str:
    """Keep the stored value; take the new one only where nothing is stored."""
    return (
        f"{column} = CASE WHEN {table}.{column} <> '' THEN {table}.{column}"
        f" ELSE excluded.{column} END"
    )


def _longer(table: str, column: str) -> str:
    """Of two agreeing values (a short sha and the full one), keep the longer."""
    return (
        f"{column} = CASE WHEN length(excluded.{column}) > length({table}.{column})"
        f" THEN excluded.{column} ELSE {table}.{column} END"
    )


# Every registration of a PostgreSQL store takes this transaction lock, so the
# conflict check and the write it guards are one step (SQLite has one writer).
_REGISTER_LOCK: Final = 0x70726564  # "pred"

OnConflict = Literal["refuse", "replace", "keep"]


def register_plan(
    reg: Registration, now_ns: int, *, on_conflict: OnConflict = "refuse"
) -> Plan[list[str]]:
    """Merge one registration into the graph (empty fields keep what is stored).

    The links that answer "trained on what" (a run's commit, a model
    version's run and artifact digest) are evidence. When a registration
    contradicts a stored one (a commit that is not a prefix of the stored
    sha or the other way round, another run, another digest), ``on_conflict``
    decides: ``refuse`` raises and writes nothing; ``replace`` overwrites,
    and a run's datasets or a model version's image given with it become the
    only ones stored (a wrong link is corrected by registering the right one);
    ``keep`` writes everything else and leaves the stored links as they are
    (for sources that are not the authority on them: MLflow lookups,
    OpenLineage events). Returns the conflicts that were kept.

    A model version's run link that only OpenLineage made (its runId is its
    own, ``Registration.run_authority``) is not evidence against a
    registration that is the authority on the run: that one replaces it
    whatever ``on_conflict`` says. Two authorities that disagree conflict.

    Raises:
        LineageConflictError: ``refuse`` and a contradiction (nothing written).
    """
    yield Serialize(_REGISTER_LOCK)
    found = {} if on_conflict == "replace" else (yield from _conflicts(reg))
    conflicts = list(found.values())
    if conflicts and on_conflict == "refuse":
        raise LineageConflictError(
            "; ".join(conflicts)
            + " (stored lineage kept; register with --replace, or ?replace=true, to correct it)"
        )
    keep = frozenset(found)  # the links to leave as stored (``keep``)
    if reg.commit is not None:
        # A full sha registered after a short one (or the other way round)
        # keeps the repository the other form was registered with.
        repo = reg.commit.repo or (yield from _known_repo(reg.commit.sha))
        yield Exec(
            "INSERT INTO commits (sha, repo, registered_ns) VALUES (?, ?, ?)"  # noqa: S608 - fixed SQL fragments, values are bound
            f" ON CONFLICT (sha) DO UPDATE SET {_merge('commits', 'repo')}",
            (reg.commit.sha, repo, now_ns),
        )
    if reg.run is not None:
        yield from _register_run(reg, now_ns, keep=keep, replace=on_conflict == "replace")
    if reg.image is not None:
        yield Exec(
            "INSERT INTO images (digest, name) VALUES (?, ?)"  # noqa: S608 - fixed SQL fragments, values are bound
            f" ON CONFLICT (digest) DO UPDATE SET {_merge('images', 'name')}",
            (reg.image.digest, reg.image.name),
        )
    if reg.model is not None:
        yield from _register_model(reg, now_ns, keep=keep, replace=on_conflict == "replace")
    if reg.deployment is not None:
        yield from _register_deployment(reg)
    return conflicts


def _known_repo(sha: str) -> Plan[str]:
    """The repository stored for another form of the same commit ("" if none)."""
    if len(sha) < MIN_SHORT_SHA:
        return ""
    rows = yield Fetch(
        "SELECT sha, repo FROM commits WHERE repo <> '' AND lower(substr(sha, 1, 7)) = ?",
        (sha[:MIN_SHORT_SHA].lower(),),
    )
    return next((repo for stored, repo in rows if same_commit(stored, sha)), "")


def _conflicts(reg: Registration) -> Plan[dict[str, str]]:
    """Stored links ``reg`` contradicts: column -> what is wrong."""
    # Reads only, before any write: a refused registration leaves no trace.
    problems: dict[str, str] = {}
    if reg.run is not None and reg.commit is not None:
        rows = yield Fetch("SELECT commit_sha FROM runs WHERE run_id = ?", (reg.run.run_id,))
        if rows and rows[0][0] and not same_commit(rows[0][0], reg.commit.sha):
            problems["commit_sha"] = (
                f"run {reg.run.run_id} is built from commit {rows[0][0]}, not {reg.commit.sha}"
            )
    model = reg.model
    if model is not None:
        rows = yield Fetch(
            "SELECT v.run_id, v.artifact_digest, p.run_id FROM model_versions v"
            " LEFT JOIN provisional_runs p ON p.name = v.name AND p.version = v.version"
            " WHERE v.name = ? AND v.version = ?",
            (model.name, model.version),
        )
        if rows:
            stored_run, stored_digest, provisional = rows[0]
            run_id = reg.run.run_id if reg.run else ""
            # A link only OpenLineage made (its runId is its own) gives way to
            # a registration that is the authority on the run: no conflict.
            gives_way = reg.run_authority and provisional == stored_run
            if stored_run and run_id and stored_run != run_id and not gives_way:
                problems["run_id"] = (
                    f"model {model.name}/{model.version} was produced by run {stored_run}, "
                    f"not {run_id}"
                )
            digest = model.artifact_digest
            if stored_digest and digest and stored_digest.lower() != digest.lower():
                problems["artifact_digest"] = (
                    f"model {model.name}/{model.version} has artifact digest {stored_digest}, "
                    f"not {digest}"
                )
    return problems


def _register_run(
    reg: Registration, now_ns: int, *, keep: frozenset[str], replace: bool
) -> Plan[None]:
    run = reg.run
    assert run is not None  # noqa: S101 - checked by the caller
    commit = _fill if "commit_sha" in keep else _merge if replace else _longer
    merges = ", ".join(
        [*(_merge("runs", c) for c in ("registry", "name", "url")), commit("runs", "commit_sha")]
    )
    yield Exec(
        "INSERT INTO runs (run_id, registry, name, url, params, metrics, tags, commit_sha,"  # noqa: S608 - fixed SQL fragments, values are bound
        " origin, registered_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        f" ON CONFLICT (run_id) DO UPDATE SET {merges},"
        " params = CASE WHEN excluded.params <> '{}' THEN excluded.params ELSE runs.params END,"
        " metrics = CASE WHEN excluded.metrics <> '{}' THEN excluded.metrics"
        " ELSE runs.metrics END,"
        " tags = CASE WHEN excluded.tags <> '{}' THEN excluded.tags ELSE runs.tags END,"
        " origin = excluded.origin",
        (
            run.run_id,
            run.registry,
            run.name,
            run.url,
            json.dumps(dict(run.params)),
            json.dumps(dict(run.metrics)),
            json.dumps(dict(run.tags)),
            reg.commit.sha if reg.commit else "",
            reg.source,
            now_ns,
        ),
    )
    if reg.datasets:
        yield ExecMany(
            "INSERT INTO datasets (digest, source, name, registered_ns) VALUES (?, ?, ?, ?)"  # noqa: S608 - fixed SQL fragments, values are bound
            f" ON CONFLICT (digest) DO UPDATE SET {_merge('datasets', 'source')},"
            f" {_merge('datasets', 'name')}",
            [(d.digest, d.source, d.name, now_ns) for d in reg.datasets],
        )
        yield ExecMany(
            "INSERT INTO run_datasets (run_id, digest, context) VALUES (?, ?, ?)"  # noqa: S608 - fixed SQL fragments, values are bound
            f" ON CONFLICT (run_id, digest) DO UPDATE SET {_merge('run_datasets', 'context')}",
            [(run.run_id, d.digest, d.context) for d in reg.datasets],
        )
        if replace:
            digests = sorted({d.digest for d in reg.datasets})
            yield Exec(
                "DELETE FROM run_datasets WHERE run_id = ?"  # noqa: S608 - placeholders only
                f" AND digest NOT IN ({in_list(len(digests))})",
                (run.run_id, *digests),
            )


def _register_model(
    reg: Registration, now_ns: int, *, keep: frozenset[str], replace: bool
) -> Plan[None]:
    model = reg.model
    assert model is not None  # noqa: S101 - checked by the caller
    # The run link this registration sets (none: the stored one stays as it is).
    run_id = reg.run.run_id if reg.run is not None and "run_id" not in keep else ""
    stored: tuple[str, str] = ("", "")
    if run_id and not reg.run_authority:
        rows = yield Fetch(
            "SELECT v.run_id, coalesce(p.run_id, '') FROM model_versions v"
            " LEFT JOIN provisional_runs p ON p.name = v.name AND p.version = v.version"
            " WHERE v.name = ? AND v.version = ?",
            (model.name, model.version),
        )
        stored = (str(rows[0][0]), str(rows[0][1])) if rows else stored
    columns = ("registry", "registry_id", "artifact_digest", "source", "run_id")
    # A registration that is no authority on the version (an OpenLineage
    # event naming it as an output) fills what is empty and leaves the rest,
    # its origin included: a version MLflow told of stays MLflow's, and its
    # aliases are still followed there. Unless it replaces on purpose.
    authority = reg.run_authority or replace
    kept = keep if authority else keep | set(columns) - {"run_id"}
    origin = "excluded.origin" if authority else "model_versions.origin"
    yield Exec(
        "INSERT INTO model_versions (name, version, registry, registry_id, artifact_digest,"  # noqa: S608 - fixed SQL fragments, values are bound
        " source, run_id, origin, registered_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (name, version) DO UPDATE SET "
        + ", ".join((_fill if c in kept else _merge)("model_versions", c) for c in columns)
        + f", origin = {origin}",
        (
            model.name,
            model.version,
            model.registry,
            model.registry_id,
            model.artifact_digest,
            model.source,
            reg.run.run_id if reg.run else "",
            reg.source,
            now_ns,
        ),
    )
    if run_id:
        yield from _mark_run_link(reg, model.name, model.version, run_id, stored)
    if model.aliases:
        yield from _register_aliases(model.name, model.version, model.aliases, now_ns)
    if reg.image is not None:
        yield Exec(
            "INSERT INTO model_images (name, version, image_digest) VALUES (?, ?, ?)"
            " ON CONFLICT (name, version, image_digest) DO NOTHING",
            (model.name, model.version, reg.image.digest),
        )
        if replace:
            yield from _replace_image(reg, model.name, model.version, reg.image.digest)


def _mark_run_link(
    reg: Registration, name: str, version: str, run_id: str, stored: tuple[str, str]
) -> Plan[None]:
    """Record whether the version's run link ``run_id`` (just written) is provisional.

    An authority's link is evidence (no row). A link only OpenLineage made is
    provisional (a row naming it), unless it repeats the authority's stored
    one: agreeing does not weaken it. ``stored`` is the (run_id, provisional
    run_id) read before the write, for OpenLineage's registrations.
    """
    if reg.run_authority:
        yield Exec("DELETE FROM provisional_runs WHERE name = ? AND version = ?", (name, version))
        return
    stored_run, provisional = stored
    if stored_run == run_id and provisional != stored_run:
        return  # the authority's link, repeated
    yield Exec(
        "INSERT INTO provisional_runs (name, version, run_id) VALUES (?, ?, ?)"
        " ON CONFLICT (name, version) DO UPDATE SET run_id = excluded.run_id",
        (name, version, run_id),
    )


def _register_aliases(name: str, version: str, aliases: Sequence[str], now_ns: int) -> Plan[None]:
    """Point ``aliases`` at ``version``, stamping since when the store knows they do.

    A move to another version is stamped with its time. So is an alias the
    store learns only now while predictions that name it (and no version)
    are stored already: the alias may have pointed elsewhere when they were
    made (MLflow and a CI hook say where an alias points, not since when), so
    they are reported unknown rather than explained by a version that may
    not have served them, even not existed then. An alias learned before
    any prediction named it holds for all of them (0).
    """
    yield ExecMany(
        "UPDATE model_aliases SET version = ?, moved_ns = ?"
        " WHERE name = ? AND alias = ? AND version <> ?",
        [(version, now_ns, name, a, version) for a in aliases],
    )
    named = yield Fetch(
        "SELECT DISTINCT model_alias FROM served WHERE model_name = ? AND model_version = ''"  # noqa: S608 - placeholders only
        f" AND model_alias IN ({in_list(len(aliases))}) AND predictions > 0",
        (name, *aliases),
    )
    predicted = {str(r[0]) for r in named}
    yield ExecMany(
        "INSERT INTO model_aliases (name, alias, version, moved_ns) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name, alias) DO NOTHING",
        [(name, a, version, now_ns if a in predicted else 0) for a in aliases],
    )


def _replace_image(reg: Registration, name: str, version: str, image: str) -> Plan[None]:
    """Forget the other images registered for a model version (and this deployment's)."""
    yield Exec(
        "DELETE FROM model_images WHERE name = ? AND version = ? AND image_digest <> ?",
        (name, version, image),
    )
    if reg.deployment is not None:
        # Only the placeholder a registration made (no prediction named it):
        # what predictions said they ran on stays as they said it.
        yield Exec(
            "DELETE FROM served WHERE deployment_id = ? AND model_name = ?"
            " AND model_version = ? AND image_digest <> ? AND predictions = 0",
            (reg.deployment.id, name, version, image),
        )


def _register_deployment(reg: Registration) -> Plan[None]:
    dep = reg.deployment
    assert dep is not None  # noqa: S101 - checked by the caller
    yield Exec(
        "INSERT INTO deployments (id, service, namespace, started_ns, ended_ns, first_seen_ns,"  # noqa: S608 - fixed SQL fragments, values are bound
        " last_seen_ns, origin) VALUES (?, ?, ?, ?, ?, 0, 0, ?) ON CONFLICT (id) DO UPDATE SET "
        + ", ".join(_merge("deployments", c) for c in ("service", "namespace"))
        + ", started_ns = CASE WHEN excluded.started_ns > 0 THEN excluded.started_ns"
        " ELSE deployments.started_ns END,"
        " ended_ns = CASE WHEN excluded.ended_ns > 0 THEN excluded.ended_ns"
        " ELSE deployments.ended_ns END",
        (dep.id, dep.service, dep.namespace, dep.started_ns, dep.ended_ns, reg.source),
    )
    if reg.model is not None:
        image = reg.image.digest if reg.image else ""
        yield Exec(
            "INSERT INTO served (deployment_id, model_name, model_version, model_alias,"
            " image_digest, predictions, first_seen_ns, last_seen_ns)"
            " VALUES (?, ?, ?, '', ?, 0, 0, 0) ON CONFLICT DO NOTHING",
            (dep.id, reg.model.name, reg.model.version, image),
        )

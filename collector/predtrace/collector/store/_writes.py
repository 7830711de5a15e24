"""Write plans: one ingested batch, one lineage registration.

The ingest plan is idempotent on (producer_id, seq): a batch already stored is
answered as a duplicate and nothing is written. It checks the per-producer hash
chain in both directions (the stored predecessor's digest against this batch's
``prev_digest``, and this digest against a successor that arrived first), and
records breaks and re-used sequence numbers in ``chain_events``. Gaps are not
recorded here: the gap report derives them from ``batches``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from predtrace.collector._errors import LineageConflictError
from predtrace.collector.lineage import Registration
from predtrace.collector.store._ops import (
    Exec,
    ExecMany,
    Fetch,
    Insert,
    Plan,
    Row,
    Serialize,
    in_list,
)
from predtrace.collector.store._rows import ServedKey, served_key
from predtrace.collector.store._schema import PREDICTION_COLUMNS
from predtrace.wire._limits import INT63_MAX


@dataclass(frozen=True, slots=True)
class IngestRecord:
    """A decoded, validated batch ready for the store."""

    producer_id: str
    seq: int
    digest: bytes
    prev_digest: bytes
    batch_id: bytes
    created_ns: int
    received_ns: int
    rows: Sequence[Row]
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What the store did with a batch; ``chain`` is ok/first/gap/unchained/mismatch."""

    duplicate: bool
    stored: int
    chain: str
    # Same (producer, seq) stored before with other bytes: nothing of this
    # batch was stored, and the sender must hear so (409), not "duplicate".
    conflict: bool = False


_CHAIN_EVENT = (
    "INSERT INTO chain_events (producer_id, seq, kind, expected, actual, received_ns)"
    " VALUES (?, ?, ?, ?, ?, ?)"
)


def _chain_event(rec: IngestRecord, seq: int, kind: str, expected: bytes, actual: bytes) -> Exec:
    return Exec(_CHAIN_EVENT, (rec.producer_id, seq, kind, expected, actual, rec.received_ns))


def _chain_status(rec: IngestRecord, before: bytes | None) -> str:
    if rec.seq == 1:
        return "first"
    if before is None:
        return "gap"
    if not rec.prev_digest:
        return "unchained"
    return "ok" if before == rec.prev_digest else "mismatch"


def ingest_plan(rec: IngestRecord) -> Plan[IngestOutcome]:
    """Store a batch once; return whether it was a duplicate and its chain status."""
    near = yield Fetch(
        "SELECT seq, digest, prev_digest, stored FROM batches"
        " WHERE producer_id = ? AND seq >= ? AND seq <= ?",
        # min(): the last valid seq (2**63-1) has no successor to bind.
        (rec.producer_id, rec.seq - 1, min(rec.seq + 1, INT63_MAX)),
    )
    by_seq = {row[0]: row for row in near}
    if rec.seq in by_seq:
        return (yield from _duplicate(rec, bytes(by_seq[rec.seq][1]), by_seq[rec.seq][3]))
    before = by_seq.get(rec.seq - 1)
    chain = _chain_status(rec, bytes(before[1]) if before else None)
    inserted = yield Fetch(
        "INSERT INTO batches (producer_id, seq, batch_id, digest, prev_digest, created_ns,"
        " received_ns, stored, rejected, chain) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (producer_id, seq) DO NOTHING RETURNING seq",
        (
            rec.producer_id,
            rec.seq,
            rec.batch_id or None,
            rec.digest,
            rec.prev_digest or None,
            rec.created_ns,
            rec.received_ns,
            len(rec.rows),
            rec.rejected,
            chain,
        ),
    )
    if not inserted:
        # A concurrent delivery of this (producer, seq) committed first: same
        # bytes are a duplicate, other bytes a conflict (never a silent ack).
        winner = yield Fetch(
            "SELECT digest, stored FROM batches WHERE producer_id = ? AND seq = ?",
            (rec.producer_id, rec.seq),
        )
        if winner:
            return (yield from _duplicate(rec, bytes(winner[0][0]), winner[0][1]))
        return IngestOutcome(duplicate=True, stored=len(rec.rows), chain="duplicate")
    breaks = 1 if chain == "mismatch" else 0
    if chain == "mismatch" and before is not None:
        yield _chain_event(rec, rec.seq, "mismatch", bytes(before[1]), rec.prev_digest)
    breaks += yield from _check_successor(rec, by_seq.get(rec.seq + 1))
    if rec.rows:
        yield Insert("predictions", PREDICTION_COLUMNS, rec.rows)
        yield from _upsert_runtime_lineage(rec)
    yield from _upsert_producer(rec, breaks)
    return IngestOutcome(duplicate=False, stored=len(rec.rows), chain=chain)


def _duplicate(rec: IngestRecord, digest: bytes, stored: int) -> Plan[IngestOutcome]:
    if digest != rec.digest:
        # Same (producer, seq), different bytes: the producer re-used a number.
        yield _chain_event(rec, rec.seq, "seq_reused", digest, rec.digest)
        return IngestOutcome(duplicate=True, stored=0, chain="seq_reused", conflict=True)
    return IngestOutcome(duplicate=True, stored=stored, chain="duplicate")


def _check_successor(rec: IngestRecord, after: Row | None) -> Plan[int]:
    if after is None or not after[2]:
        return 0
    if bytes(after[2]) == rec.digest:
        yield Exec(
            "UPDATE batches SET chain = 'ok' WHERE producer_id = ? AND seq = ? AND chain = 'gap'",
            (rec.producer_id, rec.seq + 1),
        )
        return 0
    yield _chain_event(rec, rec.seq + 1, "mismatch", rec.digest, bytes(after[2]))
    return 1


def _upsert_producer(rec: IngestRecord, breaks: int) -> Plan[None]:
    yield Exec(
        "INSERT INTO producers (producer_id, first_seq, last_seq, batches, events, chain_breaks,"
        " first_received_ns, last_received_ns) VALUES (?, ?, ?, 1, ?, ?, ?, ?)"
        " ON CONFLICT (producer_id) DO UPDATE SET"
        " first_seq = CASE WHEN excluded.first_seq < producers.first_seq"
        " THEN excluded.first_seq ELSE producers.first_seq END,"
        " last_seq = CASE WHEN excluded.last_seq > producers.last_seq"
        " THEN excluded.last_seq ELSE producers.last_seq END,"
        " batches = producers.batches + 1, events = producers.events + excluded.events,"
        " chain_breaks = producers.chain_breaks + excluded.chain_breaks,"
        " last_received_ns = excluded.last_received_ns",
        (
            rec.producer_id,
            rec.seq,
            rec.seq,
            len(rec.rows),
            breaks,
            rec.received_ns,
            rec.received_ns,
        ),
    )


_SERVED_UPSERT = (
    "INSERT INTO served (deployment_id, model_name, model_version, model_alias, image_digest,"
    " predictions, first_seen_ns, last_seen_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (deployment_id, model_name, model_version, model_alias, image_digest)"
    " DO UPDATE SET predictions = served.predictions + excluded.predictions,"
    " first_seen_ns = CASE WHEN served.first_seen_ns = 0"
    " OR (excluded.first_seen_ns > 0 AND excluded.first_seen_ns < served.first_seen_ns)"
    " THEN excluded.first_seen_ns ELSE served.first_seen_ns END,"
    " last_seen_ns = CASE WHEN excluded.last_seen_ns > served.last_seen_ns"
    " THEN excluded.last_seen_ns ELSE served.last_seen_ns END"
)


def _served_groups(rows: Sequence[Row]) -> dict[ServedKey, list[int]]:
    """[count, first, last] timestamps per served key.

    ``first`` is the earliest of the events that have a timestamp (0: none
    has). An event without one (0) may have been made at any time: taken as
    the earliest, it would date its group to 1970, and a group that names
    only an alias would then read as older than the alias's every move.
    """
    groups: dict[ServedKey, list[int]] = {}
    for row in rows:
        key, ts = served_key(row), row[3]
        group = groups.get(key)
        if group is None:
            groups[key] = [1, ts, ts]
        else:
            group[0] += 1
            if ts and (not group[1] or ts < group[1]):
                group[1] = ts
            group[2] = max(group[2], ts)
    return groups


def _upsert_runtime_lineage(rec: IngestRecord) -> Plan[None]:
    """Deployments, images and deployment SERVES model version, from the events."""
    groups = _served_groups(rec.rows)
    # Sorted, so concurrent PostgreSQL transactions lock rows in the same order.
    served = [key + tuple(groups[key]) for key in sorted(groups)]
    yield ExecMany(_SERVED_UPSERT, served)
    deployments: dict[str, tuple[str, str, int, int]] = {}
    images: dict[str, str] = {}
    for row in rec.rows:
        if row[14]:
            seen = deployments.get(row[14])
            first, last = (min(seen[2], row[3]), max(seen[3], row[3])) if seen else (row[3],) * 2
            deployments[row[14]] = (row[15], row[16], first, last)
        if row[19]:
            images[row[19]] = row[20] or images.get(row[19], "")
    yield from _upsert_deployments(deployments)
    if images:
        yield ExecMany(
            "INSERT INTO images (digest, name) VALUES (?, ?) ON CONFLICT (digest) DO UPDATE SET"
            " name = CASE WHEN excluded.name <> '' THEN excluded.name ELSE images.name END",
            sorted(images.items()),
        )


def _upsert_deployments(deployments: dict[str, tuple[str, str, int, int]]) -> Plan[None]:
    if not deployments:
        return
    yield ExecMany(
        "INSERT INTO deployments (id, service, namespace, started_ns, ended_ns, first_seen_ns,"
        " last_seen_ns, origin) VALUES (?, ?, ?, 0, 0, ?, ?, 'runtime')"
        " ON CONFLICT (id) DO UPDATE SET"
        " first_seen_ns = CASE WHEN deployments.first_seen_ns = 0"
        " OR excluded.first_seen_ns < deployments.first_seen_ns"
        " THEN excluded.first_seen_ns ELSE deployments.first_seen_ns END,"
        " last_seen_ns = CASE WHEN excluded.last_seen_ns > deployments.last_seen_ns"
        " THEN excluded.last_seen_ns ELSE deployments.last_seen_ns END",
        [(key, *value) for key, value in sorted(deployments.items())],
    )


def _merge(table: str, column: str) -> str:
    """Keep the stored value when the new one is empty."""
    return (
        f"{column} = CASE WHEN excluded.{column} <> '' THEN excluded.{column}"
        f" ELSE {table}.{column} END"
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


_MIN_SHORT_SHA: Final = 7


def same_commit(a: str, b: str) -> bool:
    """Whether two commit names agree: equal, or hex shas one a prefix of the other.

    Case does not matter; a prefix counts only from 7 hex digits (git's
    shortest default abbreviation), so "1" does not agree with every sha.
    """
    a, b = a.lower(), b.lower()
    if a == b:
        return True
    short, full = sorted((a, b), key=len)
    return len(short) >= _MIN_SHORT_SHA and _is_hex(a) and _is_hex(b) and full.startswith(short)


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _known_repo(sha: str) -> Plan[str]:
    """The repository stored for another form of the same commit ("" if none)."""
    if len(sha) < _MIN_SHORT_SHA:
        return ""
    rows = yield Fetch(
        "SELECT sha, repo FROM commits WHERE repo <> '' AND lower(substr(sha, 1, 7)) = ?",
        (sha[:_MIN_SHORT_SHA].lower(),),
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
    yield Exec(
        "INSERT INTO model_versions (name, version, registry, registry_id, artifact_digest,"  # noqa: S608 - fixed SQL fragments, values are bound
        " source, run_id, origin, registered_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (name, version) DO UPDATE SET "
        + ", ".join((_fill if c in keep else _merge)("model_versions", c) for c in columns)
        + ", origin = excluded.origin",
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

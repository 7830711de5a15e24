"""Read plans behind the query API: the pivot, model lineage, impact, completeness, gaps.

Counts and time ranges come from ``served`` (deployment SERVES model version),
which the ingest plan keeps exact in the same transaction as the predictions
and retention keeps exact when it deletes them; so impact and completeness
cost one row per (deployment, model version, image), not one per prediction.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from typing import Final

from predtrace.collector.store._chain import (
    ALIAS_HOLDS,
    ALIAS_JOIN,
    AliasState,
    ChainKey,
    Json,
    alias_plan,
    alias_state,
    chain_plan,
    deployment_plan,
    image_key,
    known_images_plan,
    model_plan,
    run_missing,
    run_plan,
)
from predtrace.collector.store._maintenance import PAGE_LIMIT
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
_HEX64: Final = re.compile(r"[0-9a-f]{64}")


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


def _deployments_of(
    name: str, version: str, image: Sequence[str] | None, *, imageless: bool = True
) -> Plan[list[Json]]:
    """Per deployment, the predictions of a model version (in ``image``, when given).

    ``image``: the spellings of one image. With it, predictions that name no
    image count too when ``imageless``.
    Predictions that name only an alias count when the alias points at the
    version and did since before the first of them (``ALIAS_HOLDS``, as
    ``trace`` and ``completeness`` say).
    """
    sql = (
        "SELECT deployment_id, sum(predictions), min(CASE WHEN first_seen_ns > 0"  # noqa: S608 - fixed SQL fragments, values are bound
        " THEN first_seen_ns END), max(last_seen_ns) FROM ("
        "SELECT deployment_id, predictions, first_seen_ns, last_seen_ns, image_digest"
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
    """A model version's run, commit, datasets, images and deployments, or None.

    ``missing`` names the hops not known; ``missing_reasons`` says why each
    is missing, as ``trace`` does (same shape as a chain's ``missing``).
    """
    model = yield from model_plan(name, version)
    if model is None:
        return None
    run = (yield from run_plan(str(model["run_id"]))) if model["run_id"] else None
    deployments = yield from _deployments_of(name, version, None)
    for item in deployments:
        if item["id"]:
            item["node"] = yield from deployment_plan(str(item["id"]))
    model["images"] = yield from _images_of(name, version, model)
    reasons = _lineage_missing(name, version, model, run, deployments)
    return {
        "model_version": model,
        "run": run,
        "deployments": deployments,
        "predictions": sum(int(d["predictions"]) for d in deployments),  # type: ignore[call-overload]
        "missing": [str(m["hop"]) for m in reasons],
        "missing_reasons": reasons,
        "complete": not reasons,
    }


def _lineage_missing(
    name: str, version: str, model: Json, run: Json | None, deps: list[Json]
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
    if not any(d["id"] for d in deps):
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
        (value[:_MIN_SHORT_SHA].lower(),),
    )
    runs = [r for r in candidates if same_commit(r[1], value)]
    shas = sorted({r[1] for r in runs})
    commits = _distinct_commits(shas)
    if len(commits) > 1:
        raise AmbiguousCommitError(value, commits)
    return sorted(r[0] for r in runs), ({"sha": shas} if shas else None)


class AmbiguousCommitError(LookupError):
    """A short sha that names several stored commits: which one is meant is not known.

    Refused as git refuses an ambiguous short object name, rather than
    summing the impact of unrelated commits.
    """

    def __init__(self, given: str, commits: list[str]) -> None:
        self.given, self.commits = given, commits
        super().__init__(
            f"commit {given} is ambiguous: it is a prefix of {len(commits)} commits"
            f" ({', '.join(commits)}); give more digits"
        )


def _distinct_commits(shas: Sequence[str]) -> list[str]:
    """The commits among stored forms of shas: a form that is a prefix of another is that one."""
    commits: dict[str, str] = {}  # lower case -> as stored
    for sha in sorted(shas, key=len, reverse=True):
        if not any(known.startswith(sha.lower()) for known in commits):
            commits[sha.lower()] = sha
    return sorted(commits.values())


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
            deployments = yield from _deployments_of(name, version, None)
            versions.append(_impact_entry(name, version, model, deployments))
            continue
        # A prediction that names no image was served from this one only if
        # it is the version's only known image; else it is reported apart.
        images = yield from _images_of(name, version, model)
        sole = {image_key(i) for i in images} == {image_key(value)}
        deployments = yield from _deployments_of(name, version, spellings, imageless=sole)
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

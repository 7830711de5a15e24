"""MLflow's JSON as a Registration: read strictly, cleaned where it can be.

Model name + version -> ``model-versions/get`` and ``runs/get`` (asked by
``_mlflow``) -> this module -> a ``Registration`` for the store. It holds the
readers that type-check every value of MLflow's answers (JSON of an
unexpected shape is a ``RegistryError`` naming what was wrong, never a
half-read registration) and the translation of a model version and its run
into lineage nodes.

Values are held to the shapes the registration API enforces (``_values``),
but MLflow is a registry we do not control: rather than lose the link for
one odd value, a dataset without a usable digest (or without any), a metric
no float holds, a commit or artifact digest
that is not one, or a param or tag holding control characters is left out, a
name or URL is cut to its bound with such characters shown as U+FFFD, and
one log line per lookup counts what was left out or changed. Only the ids
the link is made of (model name, version, aliases, run id) still fail it.
A list is read no further than ``_MAX_WALK`` entries: what lies past that
is counted, not read (an answer of millions of ``{}`` costs no walk).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

from predtrace.collector._errors import LineageError, RegistryError
from predtrace.collector.lineage._model import (
    CommitNode,
    DatasetNode,
    ModelVersionNode,
    Registration,
    RunNode,
)
from predtrace.collector.lineage._values import (
    MAX_ITEMS,
    MAX_NAME,
    MAX_TEXT,
    check_text,
    clean_text,
    is_token,
)

_COMMIT_TAG: Final = "mlflow.source.git.commit"
_REPO_TAGS: Final = ("mlflow.source.git.repoURL", "mlflow.gitRepoURL")

# Run tags MLflow writes for itself, kilobytes of JSON each: never shown, not kept.
_SKIPPED_TAGS: Final = ("mlflow.log-model",)

# Entries of one list read at most: the kept ones are bounded by MAX_ITEMS,
# with room for entries left out (MLflow's own tags, odd values).
_MAX_WALK: Final = 2 * MAX_ITEMS

log = logging.getLogger("predtrace.collector.mlflow")


def kind_of(value: object) -> str:
    """What a JSON value is, in words (for error messages)."""
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "text" if isinstance(value, str) else "null"


def as_object(value: object, where: str, *, required: bool = False) -> Mapping[str, Any]:
    """``value`` as a JSON object ({} for null unless ``required``).

    Raises:
        RegistryError: anything else, naming ``where``.
    """
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise RegistryError(f"MLflow sent {where} as {kind_of(value)}, not an object")
    return value


def as_array(value: object, where: str) -> list[Any]:
    """``value`` as a JSON list ([] for null); RegistryError naming ``where`` otherwise."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise RegistryError(f"MLflow sent {where} as {kind_of(value)}, not a list")
    return value


def as_text(value: object, where: str) -> str:
    """``value`` as text ("" for null; a number as its digits); RegistryError otherwise."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise RegistryError(f"MLflow sent {where} as {kind_of(value)}, not text")


class _Cleaned:
    """What one lookup left out or changed of MLflow's answer, by kind; logged once."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def note(self, what: str) -> None:
        """Count one value left out or changed."""
        self.counts[what] += 1

    def text(self, value: str, what: str, limit: int) -> str:
        """``value`` cut to ``limit``, control characters as U+FFFD (counted if changed)."""
        cleaned = clean_text(value, limit)
        if cleaned != value:
            self.note(what)
        return cleaned

    def token(self, value: str, what: str) -> str:
        """``value`` if it has a digest's or commit's shape, else "" (counted)."""
        if value and not is_token(value):
            self.note(what)
            return ""
        return value

    def log(self, name: str, version: str) -> None:
        """One line naming what was left out or changed, if anything."""
        if self.counts:
            kinds = ", ".join(f"{what} x{count}" for what, count in sorted(self.counts.items()))
            log.warning(
                "MLflow lineage of %s/%s: %d value(s) left out or changed: %s",
                name,
                version,
                self.counts.total(),
                kinds,
            )


def _walk(items: object, where: str, cleaned: _Cleaned) -> list[Any]:
    """``items`` as a list (see ``as_array``), cut to ``_MAX_WALK`` (the rest counted)."""
    array = as_array(items, where)
    if len(array) > _MAX_WALK:
        cleaned.counts[f"{where} entries past {_MAX_WALK}"] += len(array) - _MAX_WALK
    return array[:_MAX_WALK]


def _fits(text: str, limit: int, *, multiline: bool = False) -> bool:
    """Whether ``text`` passes ``check_text`` within ``limit``."""
    try:
        check_text(text, "", limit=limit, multiline=multiline)
    except LineageError:
        return False
    return True


def _kv(items: object, where: str, cleaned: _Cleaned, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """MLflow's ``[{key, value}]`` lists as a dict, but keys starting with ``skip``.

    An entry whose key or value holds control characters, or whose key is
    over ``MAX_NAME``, is left out; a value over ``MAX_TEXT`` is cut (counted).

    Raises:
        RegistryError: not a list of objects with text keys and values.
    """
    out: dict[str, str] = {}
    for item in _walk(items, where, cleaned):
        entry = as_object(item, f"an entry of {where}", required=True)
        key = as_text(entry.get("key"), f"a key of {where}")
        value = as_text(entry.get("value"), f"the value of {where} {key[:64]!r}")
        if not key or key.startswith(skip):
            continue
        kept = value[:MAX_TEXT]
        if len(out) >= MAX_ITEMS or not (
            _fits(key, MAX_NAME) and _fits(kept, MAX_TEXT, multiline=True)
        ):
            cleaned.note(f"{where} entry")
            continue
        if kept != value:
            cleaned.note(f"{where} value cut")
        out[key] = kept
    return out


def _metrics(items: object, cleaned: _Cleaned) -> dict[str, float]:
    """``run.data.metrics``: finite numbers by key (MLflow's "NaN" text is left out).

    Raises:
        RegistryError: not a list of objects with a text key each.
    """
    out: dict[str, float] = {}
    for item in _walk(items, "run.data.metrics", cleaned):
        entry = as_object(item, "an entry of run.data.metrics", required=True)
        key = as_text(entry.get("key"), "a key of run.data.metrics")
        if not key:
            raise RegistryError("MLflow sent a metric without a key")
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits: like NaN, no metric
            cleaned.note("run.data.metrics value past a float's range")
            continue
        if not math.isfinite(number):
            continue
        if len(out) < MAX_ITEMS and _fits(key, MAX_NAME):
            out[key] = number
        else:
            cleaned.note("run.data.metrics entry")
    return out


def _dataset_source(raw: str) -> str:
    """MLflow stores a dataset's source as JSON (``{"uri": ...}``); keep the location."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    if isinstance(parsed, dict):
        for key in ("uri", "url", "path", "table_name"):
            if isinstance(parsed.get(key), str):
                return str(parsed[key])
    return raw


def _datasets(inputs: object, cleaned: _Cleaned) -> tuple[DatasetNode, ...]:
    """``run.inputs.dataset_inputs`` with a digest each (one of another shape: left out).

    Raises:
        RegistryError: not the shape MLflow documents.
    """
    out = []
    where = "run.inputs.dataset_inputs"
    for item in _walk(as_object(inputs, "run.inputs").get("dataset_inputs"), where, cleaned):
        entry = as_object(item, f"an entry of {where}", required=True)
        dataset = as_object(entry.get("dataset"), f"{where}[].dataset")
        raw = as_text(dataset.get("digest"), f"{where}[].dataset.digest")
        if not raw:
            cleaned.note("dataset without a digest")
        digest = cleaned.token(raw, "dataset digest")
        if digest:
            context = _kv(entry.get("tags"), f"{where}[].tags", cleaned).get(
                "mlflow.data.context", ""
            )
            name = as_text(dataset.get("name"), f"{where}[].dataset.name")
            source = _dataset_source(as_text(dataset.get("source"), f"{where}[].dataset.source"))
            out.append(
                DatasetNode(
                    digest=digest,
                    name=cleaned.text(name, "dataset name", MAX_NAME),
                    source=cleaned.text(source, "dataset source", MAX_TEXT),
                    context=cleaned.text(context, "dataset context", MAX_NAME),
                )
            )
    if len(out) > MAX_ITEMS:
        cleaned.note(f"datasets past {MAX_ITEMS}")
    return tuple(out[:MAX_ITEMS])


def _aliases(value: object) -> tuple[str, ...]:
    """``model_version.aliases``: a list of alias names, each once."""
    out: dict[str, None] = {}
    for item in as_array(value, "model_version.aliases")[:_MAX_WALK]:
        if not isinstance(item, str):
            raise RegistryError(f"MLflow sent an alias as {kind_of(item)}, not text")
        out[check_text(item, "model_version.aliases[]", required=True, limit=MAX_NAME)] = None
    return tuple(out)[:MAX_ITEMS]


def registration_from_mlflow(
    model_version: Mapping[str, Any], run: Mapping[str, Any] | None, base_url: str
) -> Registration:
    """Build a ``Registration`` from MLflow's model-version and run JSON.

    Values of another shape than the API accepts are left out or cleaned,
    and one warning counts them (see the module's docstring).

    Raises:
        RegistryError: the JSON is not of the shape MLflow documents, or an
            id the link is made of is one no store keeps or no terminal
            should print; the message names MLflow and the field.
    """
    cleaned = _Cleaned()
    try:
        registration = _registration(
            as_object(model_version, "model_version", required=True), run, base_url, cleaned
        )
    except LineageError as exc:
        raise RegistryError(f"MLflow sent unusable lineage: {exc}") from None
    if registration.model is not None:
        cleaned.log(registration.model.name, registration.model.version)
    return registration


def _model(model_version: Mapping[str, Any], cleaned: _Cleaned) -> ModelVersionNode:
    name = as_text(model_version.get("name"), "model_version.name")
    version = as_text(model_version.get("version"), "model_version.version")
    tags = _kv(model_version.get("tags"), "model_version.tags", cleaned)
    registry_id = as_text(model_version.get("model_id"), "model_version.model_id")
    return ModelVersionNode(
        name=name,
        version=version,
        registry="mlflow",
        registry_id=cleaned.text(registry_id or f"{name}/{version}", "model id", MAX_NAME),
        source=cleaned.text(
            as_text(model_version.get("source"), "model_version.source"), "model source", MAX_TEXT
        ),
        aliases=_aliases(model_version.get("aliases")),
        artifact_digest=cleaned.token(tags.get("predtrace.artifact_digest", ""), "artifact digest"),
    )


def _registration(
    model_version: Mapping[str, Any],
    run: Mapping[str, Any] | None,
    base_url: str,
    cleaned: _Cleaned,
) -> Registration:
    model = _model(model_version, cleaned)
    if run is None:
        return Registration(model=model, source="mlflow")
    run = as_object(run, "run", required=True)
    info, data = as_object(run.get("info"), "run.info"), as_object(run.get("data"), "run.data")
    tags = _kv(data.get("tags"), "run.data.tags", cleaned, skip=_SKIPPED_TAGS)
    run_id = as_text(info.get("run_id"), "run.info.run_id") or as_text(
        model_version.get("run_id"), "model_version.run_id"
    )
    commit_sha = cleaned.token(tags.get(_COMMIT_TAG, ""), "commit")
    repo = next((tags[t] for t in _REPO_TAGS if tags.get(t)), "")
    experiment = as_text(info.get("experiment_id"), "run.info.experiment_id")
    url = f"{base_url.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    run_name = as_text(info.get("run_name"), "run.info.run_name")
    return Registration(
        model=model,
        run=RunNode(
            run_id=run_id,
            registry="mlflow",
            name=cleaned.text(run_name, "run name", MAX_NAME),
            url=cleaned.text(url, "run url", MAX_TEXT),
            params=_kv(data.get("params"), "run.data.params", cleaned),
            metrics=_metrics(data.get("metrics"), cleaned),
            tags=tags,
        ),
        datasets=_datasets(run.get("inputs"), cleaned),
        commit=CommitNode(sha=commit_sha, repo=cleaned.text(repo, "commit repo", MAX_TEXT))
        if commit_sha
        else None,
        source="mlflow",
    )

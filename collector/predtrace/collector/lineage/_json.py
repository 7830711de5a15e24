"""The registration API's JSON body (``POST /v1/lineage``) to a ``Registration``.

A CI/CD hook posts what it knows after a build or deploy::

    {"model": {"name": "churn", "version": "3", "aliases": ["prod"],
               "artifact_digest": "sha256:..."},
     "run": {"id": "r-42", "params": {"lr": "0.1"}, "metrics": {"auc": 0.91}},
     "datasets": [{"digest": "sha256:...", "source": "s3://b/train.csv"}],
     "commit": {"sha": "1f2e3d4", "repo": "https://git.example/churn"},
     "image": {"digest": "sha256:...", "name": "churn:3"},
     "deployment": {"id": "churn-prod", "started": "2026-01-01T00:00:00Z"}}

Each value is held to its shape (``_values``) and a body that breaks one is
refused whole with a reason naming the field (400): digests and the commit
are printable ASCII without spaces; names and ids hold no control, bidi or
invisible characters and no space at either end; nothing is longer than 512
characters but URLs, sources and param or tag values (2,048).

Every key is one of the above, at the top level and in each section: a key
the format does not have (a misspelt ``alias``, ``dataset``, ``run.commit``)
refuses the body (400) naming it and the key it most likely meant, instead
of being dropped while the registration is answered as stored. (The keys
of ``run.params``, ``run.metrics`` and ``run.tags`` are the caller's own.)
A deployment may name the version it serves (``"model": {"name", "version"}``):
the registration's model, which it gives when the body has no ``model``.
OpenLineage events (``_openlineage``) are not held to this: their facets
legitimately carry keys of their own.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final

from predtrace.collector._errors import LineageError
from predtrace.collector.lineage._model import (
    CommitNode,
    DatasetNode,
    DeploymentNode,
    ImageNode,
    ModelVersionNode,
    Registration,
    RunNode,
)
from predtrace.collector.lineage._values import (
    COMMIT,
    DIGEST,
    MAX_ITEMS,
    MAX_NAME,
    check_id,
    check_text,
    check_token,
    clean_text,
)

# The keys of the body and of each section: any other refuses the body.
_TOP: Final = ("model", "run", "datasets", "commit", "image", "deployment", "source")
_MODEL: Final = (
    "name",
    "version",
    "registry",
    "registry_id",
    "artifact_digest",
    "source",
    "aliases",
)
_RUN: Final = ("id", "registry", "name", "url", "params", "metrics", "tags")
_DATASET: Final = ("digest", "source", "name", "context")
_COMMIT: Final = ("sha", "repo")
_IMAGE: Final = ("digest", "name")
_DEPLOYMENT: Final = ("id", "service", "namespace", "started", "ended", "model")
_SERVED_MODEL: Final = ("name", "version")


def _likely(key: str, known: tuple[str, ...]) -> str | None:
    """The known key ``key`` most likely misspells (None: none is close)."""
    lower = key.lower()
    close = difflib.get_close_matches(lower, known, n=1, cutoff=0.6)
    if close:
        return close[0]
    # "digest" for "artifact_digest", "run_id" for "id": one word of the other;
    # "repository" for "repo": one begins the other.
    words = set(lower.replace("-", "_").split("_"))
    return next((k for k in known if words & set(k.split("_"))), None) or next(
        (k for k in known if len(lower) >= 3 and (lower.startswith(k) or k.startswith(lower))),
        None,
    )


def _only_known(section: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    """Refuse a key of ``section`` (named ``where``) that is not in ``known``."""
    for key in section:
        if key in known:
            continue
        shown = repr(clean_text(str(key), 64)) + ("..." if len(str(key)) > 64 else "")
        in_where = f"in {where}" if where else "at the top level of the lineage body"
        hint = _likely(str(key), known)
        if where and key in _TOP:  # "run": {"commit": ...}
            advice = f"did you mean the top-level {key!r}?"
        elif hint is not None:
            advice = f"did you mean {hint!r}?"
        else:
            advice = "known keys: " + ", ".join(known)
        raise LineageError(f"unknown key {shown} {in_where}; {advice}")


def _section(body: Mapping[str, Any], key: str, known: tuple[str, ...]) -> Mapping[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LineageError(f"{key} must be an object")
    _only_known(value, known, key)
    return value


def _str_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise LineageError(f"{where} must be an object of at most {MAX_ITEMS} entries")
    return {
        check_id(k, f"{where} key", required=True): check_text(
            v, f"{where}.{str(k)[:64]}", multiline=True
        )
        for k, v in value.items()
    }


def _num_map(value: object, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise LineageError(f"{where} must be an object of at most {MAX_ITEMS} entries")
    out: dict[str, float] = {}
    for key, number in value.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise LineageError(f"{where}.{key} must be a number")
        try:
            value = float(number)
        except OverflowError:  # an integer of hundreds of digits
            raise LineageError(f"{where}.{key} is out of range") from None
        if not math.isfinite(value):
            raise LineageError(f"{where}.{key} must be finite")
        out[check_id(key, f"{where} key", required=True)] = value
    return out


def parse_time_ns(value: object, where: str) -> int:
    """Read a time as unix nanoseconds (int) or an ISO 8601 string with a zone."""
    if value is None or value == "":
        return 0
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < 2**63:
            raise LineageError(f"{where} out of range")
        return value
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise LineageError(f"{where} must be ISO 8601 or unix nanoseconds") from None
        if when.tzinfo is None:
            raise LineageError(f"{where} needs a time zone (e.g. Z)")
        return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000
    raise LineageError(f"{where} must be ISO 8601 or unix nanoseconds")


def _model(section: Mapping[str, Any]) -> ModelVersionNode:
    aliases = section.get("aliases") or []
    if not isinstance(aliases, list) or len(aliases) > MAX_ITEMS:
        raise LineageError("model.aliases must be a list")
    return ModelVersionNode(
        name=check_id(section.get("name"), "model.name", required=True),
        version=check_id(section.get("version"), "model.version", required=True),
        registry=check_id(section.get("registry"), "model.registry"),
        registry_id=check_id(section.get("registry_id"), "model.registry_id"),
        artifact_digest=check_token(
            section.get("artifact_digest"), "model.artifact_digest", what=DIGEST
        ),
        source=check_text(section.get("source"), "model.source"),
        aliases=tuple(
            check_id(a, f"model.aliases[{i}]", required=True) for i, a in enumerate(aliases)
        ),
    )


def _run(section: Mapping[str, Any]) -> RunNode:
    return RunNode(
        run_id=check_id(section.get("id"), "run.id", required=True),
        registry=check_id(section.get("registry"), "run.registry"),
        name=check_text(section.get("name"), "run.name", limit=MAX_NAME),
        url=check_text(section.get("url"), "run.url"),
        params=_str_map(section.get("params"), "run.params"),
        metrics=_num_map(section.get("metrics"), "run.metrics"),
        tags=_str_map(section.get("tags"), "run.tags"),
    )


def _datasets(value: object) -> tuple[DatasetNode, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise LineageError(f"datasets must be a list of at most {MAX_ITEMS} objects")
    out = []
    for i, item in enumerate(value):
        where = f"datasets[{i}]"
        if not isinstance(item, dict):
            raise LineageError(f"{where} must be an object")
        _only_known(item, _DATASET, where)
        out.append(
            DatasetNode(
                digest=check_token(
                    item.get("digest"), f"{where}.digest", required=True, what=DIGEST
                ),
                source=check_text(item.get("source"), f"{where}.source"),
                name=check_text(item.get("name"), f"{where}.name", limit=MAX_NAME),
                context=check_id(item.get("context"), f"{where}.context"),
            )
        )
    return tuple(out)


def parse_registration(body: object, *, source: str = "api") -> Registration:
    """Validate a registration body and build the ``Registration``.

    Raises:
        LineageError: the body is not a valid registration (the reason names the field).
    """
    if not isinstance(body, dict):
        raise LineageError("the lineage body must be a JSON object")
    _only_known(body, _TOP, "")
    model, run = _section(body, "model", _MODEL), _section(body, "run", _RUN)
    commit, image = _section(body, "commit", _COMMIT), _section(body, "image", _IMAGE)
    deployment = _section(body, "deployment", _DEPLOYMENT)
    version = _model(model) if model is not None else None
    if deployment is not None:
        version = _served_model(deployment, version)
    return Registration(
        model=version,
        run=_run(run) if run is not None else None,
        datasets=_datasets(body.get("datasets")),
        commit=CommitNode(
            sha=check_token(commit.get("sha"), "commit.sha", required=True, what=COMMIT),
            repo=check_text(commit.get("repo"), "commit.repo"),
        )
        if commit is not None
        else None,
        image=ImageNode(
            digest=check_token(image.get("digest"), "image.digest", required=True, what=DIGEST),
            name=check_text(image.get("name"), "image.name", limit=MAX_NAME),
        )
        if image is not None
        else None,
        deployment=_deployment(deployment) if deployment is not None else None,
        source=check_text(body.get("source") or source, "source", limit=MAX_NAME),
    )


def _served_model(
    deployment: Mapping[str, Any], model: ModelVersionNode | None
) -> ModelVersionNode | None:
    """The registration's model, given or checked by ``deployment.model``."""
    served = deployment.get("model")
    if served is None:
        return model
    where = "deployment.model"
    if not isinstance(served, dict):
        raise LineageError(f"{where} must be an object")
    _only_known(served, _SERVED_MODEL, where)
    name = check_id(served.get("name"), f"{where}.name", required=True)
    version = check_id(served.get("version"), f"{where}.version", required=True)
    if model is None:
        return ModelVersionNode(name=name, version=version)
    if (name, version) != (model.name, model.version):
        raise LineageError(
            f"{where} ({name}/{version}) must be the registration's model"
            f" ({model.name}/{model.version}): one registration links one model version"
        )
    return model


def _deployment(section: Mapping[str, Any]) -> DeploymentNode:
    return DeploymentNode(
        id=check_id(section.get("id"), "deployment.id", required=True),
        service=check_id(section.get("service"), "deployment.service"),
        namespace=check_id(section.get("namespace"), "deployment.namespace"),
        started_ns=parse_time_ns(section.get("started"), "deployment.started"),
        ended_ns=parse_time_ns(section.get("ended"), "deployment.ended"),
    )

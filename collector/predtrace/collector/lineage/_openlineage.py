"""OpenLineage run events (``POST /v1/openlineage``) mapped onto the lineage graph.

A RunEvent's run becomes a Run (id ``runId``, name ``job.namespace/job.name``),
its input datasets become Datasets the run USED, and the job's
``sourceCodeLocation`` facet (``version`` = commit sha, ``repoUrl``/``url``)
becomes the Commit it was BUILT_FROM. The model version the run PRODUCED comes
from an output dataset named like an MLflow model URI (``models:/<name>/<version>``)
or from a custom run facet ``predtrace`` (``{"model": {"name", "version"}}``).
That link is provisional (``Registration.run_authority``): the runId is
OpenLineage's own, so a CI hook or MLflow naming the version's run later
replaces it instead of being refused as a conflict.

A dataset's digest is its ``version`` facet's ``datasetVersion`` when present,
otherwise its OpenLineage identity ``namespace/name``.

As for any other malformed event, a value that breaks its shape (``_values``)
refuses the event with a reason naming the field (400), so the producer's
OpenLineage client logs it: ids and names hold no control, bidi or invisible
characters; the commit (``sourceCodeLocation.version``) and an artifact
digest are printable ASCII without spaces. A ``datasetVersion`` is any
printable text up to 512 characters (a snapshot id, a timestamp).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from predtrace.collector._errors import LineageError
from predtrace.collector.lineage._model import (
    CommitNode,
    DatasetNode,
    ModelVersionNode,
    Registration,
    RunNode,
)
from predtrace.collector.lineage._values import (
    COMMIT,
    DIGEST,
    MAX_ITEMS,
    MAX_NAME,
    MAX_TEXT,
    check_id,
    check_text,
    check_token,
)

_MODEL_URI_PREFIX = "models:/"


def _obj(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise LineageError(f"{where} must be an object")
    return value


def _facets(node: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    return _obj(node.get("facets"), f"{where}.facets")


def _dataset_identity(item: Mapping[str, Any], where: str) -> tuple[str, str]:
    namespace = check_text(item.get("namespace"), f"{where}.namespace")
    name = check_text(item.get("name"), f"{where}.name", required=True)
    return namespace, name


def _input_dataset(index: int, item: object) -> DatasetNode:
    where = f"inputs[{index}]"
    data = _obj(item, where)
    namespace, name = _dataset_identity(data, where)
    identity = f"{namespace}/{name}" if namespace else name
    if len(identity) > MAX_TEXT:  # it names the dataset (its digest, with no version)
        raise LineageError(
            f"{where}: namespace and name must be at most {MAX_TEXT} characters together,"
            f" not {len(identity)}"
        )
    version = _obj(_facets(data, where).get("version"), f"{where}.facets.version")
    # A version is the producer's own (an Iceberg snapshot id, a timestamp):
    # printable text, not held to a digest's shape.
    digest = check_text(
        version.get("datasetVersion"), f"{where}.facets.version.datasetVersion", limit=MAX_NAME
    )
    return DatasetNode(digest=digest or identity, source=identity, name=name, context="input")


def _commit(job: Mapping[str, Any]) -> CommitNode | None:
    where = "job.facets.sourceCodeLocation"
    location = _obj(_facets(job, "job").get("sourceCodeLocation"), where)
    sha = check_token(location.get("version"), f"{where}.version", what=COMMIT)
    if not sha:
        return None
    repo = check_text(location.get("repoUrl") or location.get("url"), f"{where}.url")
    return CommitNode(sha=sha, repo=repo)


def _model(run: Mapping[str, Any], outputs: list[Any]) -> ModelVersionNode | None:
    facet = _obj(_facets(run, "run").get("predtrace"), "run.facets.predtrace")
    model = _obj(facet.get("model"), "run.facets.predtrace.model")
    if model:
        where = "run.facets.predtrace.model"
        return ModelVersionNode(
            name=check_id(model.get("name"), f"{where}.name", required=True),
            version=check_id(model.get("version"), f"{where}.version", required=True),
            artifact_digest=check_token(
                model.get("artifact_digest"), f"{where}.artifact_digest", what=DIGEST
            ),
            registry="openlineage",
        )
    for index, item in enumerate(outputs):
        where = f"outputs[{index}]"
        _, name = _dataset_identity(_obj(item, where), where)
        if name.startswith(_MODEL_URI_PREFIX):
            parts = name.removeprefix(_MODEL_URI_PREFIX).strip("/").split("/")
            if len(parts) == 2 and all(parts):
                return ModelVersionNode(
                    name=check_id(parts[0], f"{where}.name's model name"),
                    version=check_id(parts[1], f"{where}.name's model version"),
                    source=name,
                    registry="openlineage",
                )
    return None


def _list(value: object, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise LineageError(f"{where} must be a list of at most {MAX_ITEMS} items")
    return value


def parse_run_event(body: object) -> Registration:
    """Map one OpenLineage RunEvent onto a ``Registration``.

    Raises:
        LineageError: not a RunEvent (no ``run.runId`` or ``job.name``).
    """
    event = _obj(body, "the OpenLineage event")
    run, job = _obj(event.get("run"), "run"), _obj(event.get("job"), "job")
    run_id = check_id(run.get("runId"), "run.runId", required=True)
    job_name = check_id(job.get("name"), "job.name", required=True)
    job_namespace = check_id(job.get("namespace"), "job.namespace")
    inputs = _list(event.get("inputs"), "inputs")
    outputs = _list(event.get("outputs"), "outputs")
    tags = {"openlineage.eventType": check_id(event.get("eventType"), "eventType")}
    return Registration(
        model=_model(run, outputs),
        run=RunNode(
            run_id=run_id,
            registry="openlineage",
            name=f"{job_namespace}/{job_name}" if job_namespace else job_name,
            tags={k: v for k, v in tags.items() if v},
        ),
        datasets=tuple(_input_dataset(i, item) for i, item in enumerate(inputs)),
        commit=_commit(job),
        source="openlineage",
        run_authority=False,  # the runId is OpenLineage's own, not the registry's run
    )

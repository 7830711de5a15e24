"""The lineage graph's nodes, and the registration that carries them into the store.

Every way lineage arrives (the CI/CD registration API, OpenLineage run events, the
MLflow adapter) produces a ``Registration``; the store merges it into the graph
(DESIGN §3): run USED dataset, run BUILT_FROM commit, run PRODUCED model version,
model version PACKAGED_IN image, deployment SERVES model version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from predtrace.collector._errors import LineageError
from predtrace.collector.lineage._values import MAX_ITEMS, MAX_NAME, MAX_TEXT, check_text

# (attribute, its name in reasons, most characters)
_Fields = tuple[tuple[str, str, int], ...]


def _check_fields(node: object, fields: _Fields, *, required: int = 1) -> None:
    """The last check of any source's node: each text field bounded and printable.

    The parsers hold their input to stricter shapes (``_values``) and MLflow's
    is cleaned first; this keeps a value no terminal should print, or no store
    can keep, out of the graph whatever produced the node. The first
    ``required`` fields may not be empty.
    """
    for index, (attribute, where, limit) in enumerate(fields):
        check_text(getattr(node, attribute), where, required=index < required, limit=limit)


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetNode:
    """A dataset version, identified by its content digest."""

    digest: str
    source: str = ""
    name: str = ""
    context: str = ""

    def __post_init__(self) -> None:
        _check_fields(
            self,
            (
                ("digest", "dataset.digest", MAX_TEXT),  # an OpenLineage identity, a URI
                ("source", "dataset.source", MAX_TEXT),
                ("name", "dataset.name", MAX_NAME),
                ("context", "dataset.context", MAX_NAME),
            ),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitNode:
    """A source commit (sha) and the repository it belongs to."""

    sha: str
    repo: str = ""

    def __post_init__(self) -> None:
        _check_fields(self, (("sha", "commit.sha", MAX_NAME), ("repo", "commit.repo", MAX_TEXT)))


@dataclass(frozen=True, slots=True, kw_only=True)
class RunNode:
    """A training run with its parameters, metrics and tags."""

    run_id: str
    registry: str = ""
    name: str = ""
    url: str = ""
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_fields(
            self,
            (
                ("run_id", "run.id", MAX_NAME),
                ("registry", "run.registry", MAX_NAME),
                ("name", "run.name", MAX_NAME),
                ("url", "run.url", MAX_TEXT),
            ),
        )
        for where, values in (("run.params", self.params), ("run.tags", self.tags)):
            for key, value in values.items():
                check_text(key, f"{where} key", required=True, limit=MAX_NAME)
                check_text(value, f"{where}.{key}", multiline=True)
        for key in self.metrics:
            check_text(key, "run.metrics key", required=True, limit=MAX_NAME)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelVersionNode:
    """A registered model version; ``aliases`` point at it now."""

    name: str
    version: str
    registry: str = ""
    registry_id: str = ""
    artifact_digest: str = ""
    source: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_fields(
            self,
            (
                ("name", "model.name", MAX_NAME),
                ("version", "model.version", MAX_NAME),
                ("registry", "model.registry", MAX_NAME),
                ("registry_id", "model.registry_id", MAX_NAME),
                ("artifact_digest", "model.artifact_digest", MAX_NAME),
                ("source", "model.source", MAX_TEXT),
            ),
            required=2,
        )
        for alias in self.aliases:
            check_text(alias, "model.aliases[]", required=True, limit=MAX_NAME)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageNode:
    """A container image, identified by its digest."""

    digest: str
    name: str = ""

    def __post_init__(self) -> None:
        _check_fields(
            self, (("digest", "image.digest", MAX_NAME), ("name", "image.name", MAX_NAME))
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentNode:
    """A deployment of a model version (from CI/CD, or seen in runtime events)."""

    id: str
    service: str = ""
    namespace: str = ""
    started_ns: int = 0
    ended_ns: int = 0

    def __post_init__(self) -> None:
        _check_fields(
            self,
            (
                ("id", "deployment.id", MAX_NAME),
                ("service", "deployment.service", MAX_NAME),
                ("namespace", "deployment.namespace", MAX_NAME),
            ),
        )
        if not 0 <= self.started_ns < 2**63 or not 0 <= self.ended_ns < 2**63:
            raise LineageError("deployment times must be within the int64 nanosecond range")


@dataclass(frozen=True, slots=True, kw_only=True)
class Registration:
    """One unit of lineage: whatever subset of the chain its source knows.

    Example:
        >>> Registration(
        ...     model=ModelVersionNode(name="churn", version="3"),
        ...     run=RunNode(run_id="r1"),
        ...     datasets=(DatasetNode(digest="sha256:ab"),),
        ...     commit=CommitNode(sha="1f2e3d"),
        ...     source="ci",
        ... )
    """

    model: ModelVersionNode | None = None
    run: RunNode | None = None
    datasets: tuple[DatasetNode, ...] = ()
    commit: CommitNode | None = None
    image: ImageNode | None = None
    deployment: DeploymentNode | None = None
    source: str = "api"
    run_authority: bool = True
    """Whether ``run`` names the registry's run (the CI hook's, MLflow's), so the
    model version PRODUCED by it is evidence. False for OpenLineage, whose
    runId is its own: the link it makes holds until a registration that is
    the authority names the version's run, which then replaces it (no 409)."""

    def __post_init__(self) -> None:
        if not any((self.model, self.run, self.image, self.deployment)):
            raise LineageError("a registration needs at least a model, run, image or deployment")
        if self.datasets and self.run is None:
            raise LineageError("datasets are linked through a run: give run.id (--run-id)")
        if self.commit is not None and self.run is None:
            raise LineageError("a commit is linked through a run: give run.id (--run-id)")
        check_text(self.source, "source", limit=MAX_NAME)
        if len(self.datasets) > MAX_ITEMS:
            raise LineageError(f"at most {MAX_ITEMS} datasets per registration")

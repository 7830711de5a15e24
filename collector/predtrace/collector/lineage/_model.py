"""The lineage graph's nodes, and the registration that carries them into the store.

Every way lineage arrives (the CI/CD registration API, OpenLineage run events, the
MLflow adapter) produces a ``Registration``; the store merges it into the graph
(DESIGN §3): run USED dataset, run BUILT_FROM commit, run PRODUCED model version,
model version PACKAGED_IN image, deployment SERVES model version.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from predtrace.collector._errors import LineageError

MAX_TEXT: Final = 2048
MAX_ITEMS: Final = 256


def check_text(value: object, where: str, *, required: bool = False) -> str:
    """Return ``value`` as bounded text, or raise LineageError naming ``where``.

    An integer reads as its digits (a version written as a JSON number). A
    float does not name an id (``required``): its text is not what was sent
    (1.10 reads "1.1", 1e400 "inf"); elsewhere only a finite one is taken.
    """
    if value is None:
        value = ""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    elif isinstance(value, float):
        if required or not math.isfinite(value):
            raise LineageError(f"{where} must be a string, not the number {value!r}")
        value = str(value)
    if not isinstance(value, str):
        raise LineageError(f"{where} must be a string")
    if required and not value:
        raise LineageError(f"{where} is required")
    if len(value) > MAX_TEXT or "\x00" in value:
        raise LineageError(f"{where} must be at most {MAX_TEXT} characters without NUL")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no store can keep it
            raise LineageError(f"{where} must be valid Unicode text") from None
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetNode:
    """A dataset version, identified by its content digest."""

    digest: str
    source: str = ""
    name: str = ""
    context: str = ""

    def __post_init__(self) -> None:
        check_text(self.digest, "dataset.digest", required=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class CommitNode:
    """A source commit (sha) and the repository it belongs to."""

    sha: str
    repo: str = ""

    def __post_init__(self) -> None:
        check_text(self.sha, "commit.sha", required=True)


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
        check_text(self.run_id, "run.id", required=True)


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
        check_text(self.name, "model.name", required=True)
        check_text(self.version, "model.version", required=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageNode:
    """A container image, identified by its digest."""

    digest: str
    name: str = ""

    def __post_init__(self) -> None:
        check_text(self.digest, "image.digest", required=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentNode:
    """A deployment of a model version (from CI/CD, or seen in runtime events)."""

    id: str
    service: str = ""
    namespace: str = ""
    started_ns: int = 0
    ended_ns: int = 0

    def __post_init__(self) -> None:
        check_text(self.id, "deployment.id", required=True)
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

    def __post_init__(self) -> None:
        if not any((self.model, self.run, self.image, self.deployment)):
            raise LineageError("a registration needs at least a model, run, image or deployment")
        if self.datasets and self.run is None:
            raise LineageError("datasets are linked through a run: give run.id (--run-id)")
        if self.commit is not None and self.run is None:
            raise LineageError("a commit is linked through a run: give run.id (--run-id)")
        if len(self.datasets) > MAX_ITEMS:
            raise LineageError(f"at most {MAX_ITEMS} datasets per registration")

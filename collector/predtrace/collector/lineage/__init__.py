"""Lineage: the graph's nodes and the three ways they arrive (API, OpenLineage, MLflow)."""

from predtrace.collector.lineage._json import parse_registration, parse_time_ns
from predtrace.collector.lineage._mlflow import (
    MlflowConfig,
    MlflowRegistry,
    registration_from_mlflow,
)
from predtrace.collector.lineage._model import (
    CommitNode,
    DatasetNode,
    DeploymentNode,
    ImageNode,
    ModelVersionNode,
    Registration,
    RunNode,
)
from predtrace.collector.lineage._openlineage import parse_run_event

__all__ = [
    "CommitNode",
    "DatasetNode",
    "DeploymentNode",
    "ImageNode",
    "MlflowConfig",
    "MlflowRegistry",
    "ModelVersionNode",
    "Registration",
    "RunNode",
    "parse_registration",
    "parse_run_event",
    "parse_time_ns",
    "registration_from_mlflow",
]

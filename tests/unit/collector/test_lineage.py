"""Lineage inputs: the registration body, OpenLineage run events, MLflow JSON."""

from __future__ import annotations

import math

import pytest

from predtrace.collector import LineageError, RegistryError
from predtrace.collector.lineage import (
    parse_registration,
    parse_run_event,
    registration_from_mlflow,
)

SHA = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"


def test_a_registration_body_becomes_nodes_and_edges() -> None:
    reg = parse_registration(
        {
            "model": {"name": "churn", "version": 3, "aliases": ["prod"]},
            "run": {"id": "r1", "metrics": {"auc": 0.9}},
            "datasets": [{"digest": "sha256:d"}],
            "commit": {"sha": SHA},
            "deployment": {"id": "churn-prod", "started": "2026-01-02T03:04:05Z"},
        }
    )
    assert reg.model is not None and reg.model.version == "3"
    assert reg.run is not None and reg.run.metrics == {"auc": 0.9}
    assert reg.deployment is not None and reg.deployment.started_ns == 1767323045 * 10**9


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ([], "must be a JSON object"),
        ({}, "at least a model"),
        ({"model": {"name": "churn"}}, "model.version is required"),
        ({"model": {"name": "m", "version": "1"}, "datasets": [{"digest": "d"}]}, "give run.id"),
        ({"run": {"id": "r", "metrics": {"auc": "high"}}}, "run.metrics.auc must be a number"),
        ({"run": {"id": "r\x00"}}, "without NUL"),
        ({"deployment": {"id": "d", "started": "yesterday"}}, "ISO 8601"),
        ({"model": {"name": "m", "version": math.nan}}, "model.version must be a string"),
        ({"run": {"id": -math.inf}}, "run.id must be a string"),
        ({"model": {"name": "m", "version": 1.1}}, "model.version must be a string"),
        ({"run": {"id": "r", "name": math.inf}}, "run.name must be a string"),
    ],
)
def test_a_bad_registration_is_refused_with_a_reason(body: object, reason: str) -> None:
    with pytest.raises(LineageError, match=reason):
        parse_registration(body)


OPENLINEAGE_EVENT = {
    "eventType": "COMPLETE",
    "eventTime": "2026-01-01T00:00:00Z",
    "producer": "https://example/airflow",
    "run": {"runId": "0190a5b0-0000-7000-8000-000000000001"},
    "job": {
        "namespace": "ml",
        "name": "train_churn",
        "facets": {
            "sourceCodeLocation": {
                "type": "git",
                "url": "https://git.example/churn",
                "version": SHA,
            }
        },
    },
    "inputs": [
        {
            "namespace": "s3://bucket",
            "name": "train.csv",
            "facets": {"version": {"datasetVersion": "sha256:d1"}},
        },
        {"namespace": "s3://bucket", "name": "labels.csv"},
    ],
    "outputs": [{"namespace": "mlflow", "name": "models:/churn/3"}],
}


def test_an_openlineage_run_event_maps_to_run_datasets_commit_and_model() -> None:
    reg = parse_run_event(OPENLINEAGE_EVENT)
    assert reg.run is not None and reg.run.name == "ml/train_churn"
    assert [d.digest for d in reg.datasets] == ["sha256:d1", "s3://bucket/labels.csv"]
    assert reg.commit is not None and (reg.commit.sha, reg.commit.repo) == (
        SHA,
        "https://git.example/churn",
    )
    assert reg.model is not None and (reg.model.name, reg.model.version) == ("churn", "3")


def test_an_openlineage_event_without_run_id_is_refused() -> None:
    with pytest.raises(LineageError, match=r"run\.runId"):
        parse_run_event({"job": {"name": "x"}, "run": {}})


def test_mlflow_json_maps_tags_params_and_dataset_inputs() -> None:
    model_version = {
        "name": "churn",
        "version": "3",
        "run_id": "abc",
        "aliases": ["prod"],
        "source": "runs:/abc/model",
    }
    run = {
        "info": {"run_id": "abc", "run_name": "train", "experiment_id": "0"},
        "data": {
            "params": [{"key": "lr", "value": "0.1"}],
            "metrics": [{"key": "auc", "value": 0.9, "step": 0}],
            "tags": [
                {"key": "mlflow.source.git.commit", "value": SHA},
                {"key": "mlflow.source.git.repoURL", "value": "https://git.example/churn"},
                {"key": "mlflow.log-model.history", "value": "x" * 5000},
            ],
        },
        "inputs": {
            "dataset_inputs": [
                {
                    "tags": [{"key": "mlflow.data.context", "value": "training"}],
                    "dataset": {
                        "name": "train",
                        "digest": "d1",
                        "source": '{"uri": "s3://b/train.csv"}',
                    },
                }
            ]
        },
    }
    reg = registration_from_mlflow(model_version, run, "http://127.0.0.1:5000")
    assert reg.run is not None and reg.run.params == {"lr": "0.1"}
    assert "mlflow.log-model.history" not in reg.run.tags
    assert reg.commit is not None and reg.commit.sha == SHA
    assert [(d.digest, d.source, d.context) for d in reg.datasets] == [
        ("d1", "s3://b/train.csv", "training")
    ]
    assert reg.model is not None and reg.model.aliases == ("prod",)


MODEL_VERSION = {"name": "churn", "version": "3", "run_id": "abc"}
RUN = {"info": {"run_id": "abc"}, "data": {}, "inputs": {}}


@pytest.mark.parametrize(
    ("model_version", "run", "reason"),
    [
        ({**MODEL_VERSION, "aliases": "prod"}, None, "model_version.aliases as text, not a list"),
        ({**MODEL_VERSION, "aliases": [1]}, None, "an alias as a number"),
        ({**MODEL_VERSION, "aliases": ["pr\x00od"]}, None, "without NUL"),
        ({**MODEL_VERSION, "name": ["churn"]}, None, "model_version.name as a list"),
        ({**MODEL_VERSION, "name": "a\x00b"}, None, "model.name must be"),
        ({"name": "churn"}, None, "model.version is required"),
        ({**MODEL_VERSION, "tags": {"k": "v"}}, None, "model_version.tags as an object"),
        (MODEL_VERSION, [1], "run as a list"),
        (MODEL_VERSION, {**RUN, "info": [1]}, "run.info as a list"),
        (MODEL_VERSION, {**RUN, "data": {"params": [["lr", 1]]}}, "run.data.params as a list"),
        (MODEL_VERSION, {**RUN, "data": {"metrics": [{"value": 1}]}}, "metric without a key"),
        (MODEL_VERSION, {**RUN, "data": {"metrics": {"auc": 1}}}, "metrics as an object"),
        (MODEL_VERSION, {**RUN, "inputs": {"dataset_inputs": {"a": 1}}}, "dataset_inputs as an"),
        (MODEL_VERSION, {**RUN, "inputs": {"dataset_inputs": ["x"]}}, "as text, not an object"),
        (MODEL_VERSION, {**RUN, "inputs": [1]}, "run.inputs as a list"),
        ({"name": "churn", "version": "3"}, {"info": {}}, "run.id is required"),
    ],
)
def test_malformed_mlflow_json_is_a_registry_error_naming_mlflow_and_the_field(
    model_version: dict[str, object], run: object, reason: str
) -> None:
    with pytest.raises(RegistryError, match=r"^MLflow sent") as raised:
        registration_from_mlflow(model_version, run, "http://127.0.0.1:5000")  # type: ignore[arg-type]
    assert reason in str(raised.value)


def test_mlflow_tags_no_store_can_keep_are_left_out_not_fatal() -> None:
    run = {
        "info": {"run_id": "abc"},
        "data": {
            "tags": [
                {"key": "mlflow.source.git.commit", "value": "dd\x00d"},
                {"key": "big", "value": "y" * 5000},
                {"key": "bad\ud800", "value": "v"},
            ],
            "metrics": [{"key": "auc", "value": "NaN"}, {"key": "loss", "value": 0.5}],
        },
    }
    reg = registration_from_mlflow(MODEL_VERSION, run, "http://127.0.0.1:5000")
    assert reg.commit is None
    assert reg.run is not None and set(reg.run.tags) == {"big"}
    assert reg.run.metrics == {"loss": 0.5}

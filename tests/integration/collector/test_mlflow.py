"""The MLflow pivot against a real MLflow server: trace id -> run -> dataset digest -> commit."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from predtrace.collector.testing import ChainedProducer, make_events

from .conftest import Served
from .test_roundtrip import _send, cli

pytestmark = [pytest.mark.integration, pytest.mark.mlflow]
TRACE = "5bf92f3577b34da6a3ce929d0e0e4737"
SHA = "9a8b7c6d5e4f30211a2b3c4d5e6f708192a3b4c5"


def _mlflow(base: str, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]


def register_model(base: str, name: str) -> str:
    """Register a model version from a run that logged a dataset and a commit (REST only)."""
    run = _mlflow(base, "runs/create", {"experiment_id": "0", "run_name": "train", "start_time": 1})
    run_id = str(run["run"]["info"]["run_id"])  # type: ignore[index]
    _mlflow(base, "runs/log-parameter", {"run_id": run_id, "key": "lr", "value": "0.1"})
    _mlflow(
        base,
        "runs/log-metric",
        {"run_id": run_id, "key": "auc", "value": 0.91, "timestamp": 1, "step": 0},
    )
    dataset = {
        "name": "churn-train",
        "digest": "d1g3st42",
        "source_type": "local",
        "source": json.dumps({"uri": "s3://bucket/train.csv"}),
    }
    _mlflow(
        base,
        "runs/log-inputs",
        {
            "run_id": run_id,
            "datasets": [
                {"tags": [{"key": "mlflow.data.context", "value": "training"}], "dataset": dataset}
            ],
        },
    )
    _mlflow(
        base, "runs/set-tag", {"run_id": run_id, "key": "mlflow.source.git.commit", "value": SHA}
    )
    _mlflow(
        base,
        "runs/set-tag",
        {"run_id": run_id, "key": "mlflow.source.git.repoURL", "value": "https://git.example/m"},
    )
    _mlflow(base, "registered-models/create", {"name": name})
    version = _mlflow(
        base,
        "model-versions/create",
        {"name": name, "source": f"runs:/{run_id}/model", "run_id": run_id},
    )
    number = str(version["model_version"]["version"])  # type: ignore[index]
    _mlflow(base, "registered-models/alias", {"name": name, "alias": "champion", "version": number})
    return run_id


def test_trace_resolves_run_dataset_and_commit_from_mlflow(
    mlflow_server: str, serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    run_id = register_model(mlflow_server, "churn-mlflow")
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", mlflow_server)
    events = make_events(4, trace_id=bytes.fromhex(TRACE), model=("churn-mlflow", "1"))
    asyncio.run(_send(served.url, [ChainedProducer("p").body(events)]))

    code, out, err = cli(served.url, "trace", TRACE, "-o", "json")
    assert code == 0, err
    lineage = json.loads(out)["predictions"][0]["lineage"]
    assert lineage["model_version"]["registry"] == "mlflow"
    assert lineage["model_version"]["aliases"] == ["champion"]
    assert lineage["run"]["id"] == run_id
    assert lineage["run"]["params"] == {"lr": "0.1"}
    assert lineage["run"]["metrics"] == {"auc": 0.91}
    assert lineage["run"]["datasets"] == [
        {
            "digest": "d1g3st42",
            "source": "s3://bucket/train.csv",
            "name": "churn-train",
            "context": "training",
        }
    ]
    assert lineage["run"]["commit"] == {"sha": SHA, "repo": "https://git.example/m"}


def test_model_lineage_by_alias_asks_mlflow_when_the_store_does_not_know(
    mlflow_server: str, serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    run_id = register_model(mlflow_server, "fraud-mlflow")
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", mlflow_server)
    code, out, err = cli(served.url, "model", "lineage", "fraud-mlflow@champion", "-o", "json")
    answer = json.loads(out)
    assert answer["run"]["id"] == run_id
    assert answer["run"]["commit"]["sha"] == SHA
    assert code == 1 and "deployment" in err  # registered, but nothing serves it yet

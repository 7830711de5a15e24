"""The example model server under real uvicorn, events sent to the real collector.

Direct mode end to end: every prediction answered over HTTP carries its id,
and exactly those ids are stored by `predtrace collector serve`, with the
model and service the server was configured with.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from predtrace.middleware.testing import run_uvicorn

pytestmark = pytest.mark.integration

EXAMPLE = str(Path(__file__).resolve().parents[3] / "examples" / "fastapi_server")


def test_predictions_over_http_reach_the_collector_with_matching_ids(collector_url: str) -> None:
    env = {
        "PREDTRACE_COLLECTOR_URL": collector_url,
        "PREDTRACE_FINGERPRINT_KEY": "integration-test-key",
        "PREDTRACE_EXPORT_DELAY": "0.05",
        "PREDTRACE_SERVICE_NAME": "iris-api",
        "PREDTRACE_MODEL_VERSION": "3",
    }
    with run_uvicorn("app:app", app_dir=EXAMPLE, env=env, ready_path="/v2/health/ready") as srv:
        ids = []
        with httpx.Client(base_url=srv.url) as client:
            for i in range(20):
                tensor = {"name": "petal_length", "shape": [1], "datatype": "FP32", "data": [i]}
                response = client.post("/v2/models/iris/infer", json={"inputs": [tensor]})
                assert response.status_code == 200
                assert json.loads(response.content)["id"] == response.headers["x-prediction-id"]
                ids.append(response.headers["x-prediction-id"])
            assert client.get("/v2/health/ready").headers.get("x-prediction-id") is None
        code, err = srv.terminate()
    assert code in (0, -15), err
    assert len(set(ids)) == 20

    # The lifespan shutdown flushed: every id is stored, once, as the server described it.
    with httpx.Client(base_url=collector_url) as collector:
        for prediction_id in ids:
            stored = collector.get(f"/v1/predictions/{prediction_id}")
            assert stored.status_code == 200, prediction_id
            (row,) = stored.json()["predictions"]
            assert row["model"]["name"] == "iris"
            assert row["model"]["version"] == "3"

"""The example model server under real uvicorn, events sent to a real HTTP collector.

Direct mode end to end: every prediction answered over HTTP carries its id,
and exactly those ids arrive at the collector, gzip'd msgpack batches that
the wire codec decodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from predtrace.middleware.testing import run_uvicorn, serve_collector

pytestmark = pytest.mark.integration

EXAMPLE = str(Path(__file__).resolve().parents[3] / "examples" / "fastapi_server")


def test_predictions_over_http_reach_the_collector_with_matching_ids() -> None:
    with serve_collector() as collector:
        env = {
            "PREDTRACE_COLLECTOR_URL": collector.url,
            "PREDTRACE_FINGERPRINT_KEY": "integration-test-key",
            "PREDTRACE_EXPORT_DELAY": "0.05",
            "PREDTRACE_SERVICE_NAME": "iris-api",
        }
        with run_uvicorn("app:app", app_dir=EXAMPLE, env=env, ready_path="/v2/health/ready") as srv:
            ids = []
            with httpx.Client(base_url=srv.url) as client:
                for i in range(20):
                    body = {
                        "inputs": [
                            {
                                "name": "petal_length",
                                "shape": [1],
                                "datatype": "FP32",
                                "data": [float(i)],
                            }
                        ]
                    }
                    response = client.post("/v2/models/iris/infer", json=body)
                    assert response.status_code == 200
                    assert json.loads(response.content)["id"] == response.headers["x-prediction-id"]
                    ids.append(response.headers["x-prediction-id"])
                assert client.get("/v2/health/ready").headers.get("x-prediction-id") is None
            code, err = srv.terminate()
        assert code in (0, -15), err
        assert sorted(collector.snapshot_ids()) == sorted(ids)
        assert len(set(ids)) == 20

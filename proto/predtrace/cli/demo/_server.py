"""The demo's model server: FastAPI + the predtrace middleware, served by real uvicorn.

Serves the trained model on the Open Inference Protocol v2 REST route
``POST /v2/models/churn/infer`` on 127.0.0.1 (a free port), in a thread of the
demo process, exactly as a user's server would add the middleware.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from predtrace.cli.demo._model import FEATURES, TrainedModel
from predtrace.middleware import MiddlewareConfig, current_prediction, instrument_app

MODEL_NAME = "churn"


def build_app(model: TrainedModel, version: str, config: MiddlewareConfig) -> FastAPI:
    """The model server app, with predtrace added in one line."""
    app = FastAPI(title="churn model server (predtrace demo)")

    @app.post("/v2/models/churn/infer")
    async def infer(body: dict[str, Any]) -> dict[str, Any]:
        row = [float(v) for v in body["inputs"][0]["data"]]
        probability = model.predict(row)
        prediction = current_prediction()
        prediction.record_features(dict(zip(FEATURES, row, strict=True)))
        prediction.record_output(
            label="churn" if probability > 0.5 else "stay", score=round(probability, 4)
        )
        return {
            "model_name": MODEL_NAME,
            "model_version": version,
            "id": body.get("id", ""),
            "outputs": [
                {
                    "name": "churn_probability",
                    "shape": [1],
                    "datatype": "FP64",
                    "data": [probability],
                }
            ],
        }

    instrument_app(app, config)
    return app


class ModelServer:
    """uvicorn in a background thread, bound to 127.0.0.1 on a free port."""

    def __init__(self, app: FastAPI) -> None:
        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="demo-uvicorn", daemon=True)

    def start(self, timeout: float = 15.0) -> int:
        """Start serving; return the port once uvicorn accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the demo model server did not start")
            time.sleep(0.02)
        sockets = self._server.servers[0].sockets
        return int(sockets[0].getsockname()[1])

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop: the lifespan shutdown flushes predtrace's pipeline."""
        self._server.should_exit = True
        self._thread.join(timeout)


def tracer_provider(service: str) -> TracerProvider:
    """An SDK provider, so spans carry real trace ids (no exporter: the demo has no backend)."""
    return TracerProvider(resource=Resource.create({"service.name": service}))

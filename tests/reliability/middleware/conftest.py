"""A small OIP v2 model server for the middleware's reliability tests."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from predtrace.middleware import current_prediction

TELEMETRY_OFF: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}


def model_app(telemetry: dict[str, Any] | None = None) -> FastAPI:
    """An OIP v2 server whose handler echoes the request id and records an output.

    FastAPI's built-in telemetry is off unless ``telemetry`` is given.
    """
    app = FastAPI(telemetry=telemetry if telemetry is not None else TELEMETRY_OFF)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, body: dict[str, Any]) -> dict[str, Any]:
        current_prediction().record_output(label="ok", score=0.5)
        data = (body.get("inputs") or [{}])[0].get("data") or [0]
        answer: dict[str, Any] = {
            "model_name": name,
            "model_version": "2",
            "outputs": [{"name": "score", "shape": [1], "datatype": "FP64", "data": [sum(data)]}],
        }
        if "id" in body:
            answer["id"] = body["id"]
        return answer

    return app

"""predtrace's ASGI middleware: a span, an id and an event for every prediction.

The source stage of the pipeline inside a Python model server (FastAPI or
Starlette). One line adopts it::

    from predtrace.middleware import MiddlewareConfig, instrument_app

    instrument_app(app, MiddlewareConfig.from_env(os.environ))

Handlers name the model and record outputs through ``current_prediction()``.
Events go to the collector (``collector_url``), to the local sidecar over gRPC
(``sidecar_target``) or to any exporter object.
"""

from predtrace.middleware._config import MiddlewareConfig
from predtrace.middleware._context import PredictionContext, current_prediction
from predtrace.middleware._errors import ConfigError
from predtrace.middleware._instrument import instrument_app
from predtrace.middleware._middleware import PredictionTracingMiddleware
from predtrace.middleware._mlflow import MlflowResolver
from predtrace.middleware._registry import ModelResolver, ResolvedModel, StaticResolver
from predtrace.middleware._routes import (
    PROTOCOL_HTTP,
    PROTOCOL_KSERVE_V1,
    PROTOCOL_OIP_V2_REST,
    RoutePattern,
)
from predtrace.middleware._runtime import PredictionRuntime
from predtrace.middleware._sidecar_exporter import SidecarGrpcExporter

__all__ = [
    "PROTOCOL_HTTP",
    "PROTOCOL_KSERVE_V1",
    "PROTOCOL_OIP_V2_REST",
    "ConfigError",
    "MiddlewareConfig",
    "MlflowResolver",
    "ModelResolver",
    "PredictionContext",
    "PredictionRuntime",
    "PredictionTracingMiddleware",
    "ResolvedModel",
    "RoutePattern",
    "SidecarGrpcExporter",
    "StaticResolver",
    "current_prediction",
    "instrument_app",
]

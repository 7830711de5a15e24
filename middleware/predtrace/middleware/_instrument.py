"""``instrument_app``: one line to trace every prediction of a Starlette or FastAPI app.

Adds ``PredictionTracingMiddleware`` as the outermost user middleware. The
middleware also sees the app's lifespan: the pipeline starts with the app and
is flushed (with the app's SDK TracerProvider) when the app shuts down.
"""

from __future__ import annotations

import os

from predtrace.middleware._config import MiddlewareConfig
from predtrace.middleware._errors import ConfigError
from predtrace.middleware._middleware import PredictionTracingMiddleware
from predtrace.middleware._runtime import PredictionRuntime

_MARK = "_predtrace_runtime"


def instrument_app(app: object, config: MiddlewareConfig | None = None) -> PredictionRuntime:
    """Trace every prediction of ``app`` (Starlette or FastAPI); return the runtime.

    Without ``config`` the settings come from ``MiddlewareConfig.from_env(os.environ)``.
    Wrap other ASGI apps with ``PredictionTracingMiddleware(app, config=...)``.

    Example:
        >>> app = FastAPI()
        >>> runtime = instrument_app(app, MiddlewareConfig(collector_url="http://127.0.0.1:4318"))

    Raises:
        ConfigError: an invalid config, an app without ``add_middleware``, or an
            app that was already instrumented.
    """
    add_middleware = getattr(app, "add_middleware", None)
    if not callable(add_middleware):
        raise ConfigError(
            "instrument_app needs a Starlette or FastAPI app; wrap other ASGI apps with "
            "PredictionTracingMiddleware(app, config=...)"
        )
    if getattr(app, _MARK, None) is not None:
        raise ConfigError("this app is already instrumented by predtrace")
    runtime = PredictionRuntime(config or MiddlewareConfig.from_env(os.environ))
    add_middleware(PredictionTracingMiddleware, runtime=runtime)
    setattr(app, _MARK, runtime)
    return runtime

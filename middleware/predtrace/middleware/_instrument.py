"""``instrument_app``: one line to trace every prediction of a Starlette or FastAPI app.

Adds ``PredictionTracingMiddleware`` as the outermost user middleware. The
middleware also sees the app's lifespan: the pipeline starts with the app and
is flushed (with the app's SDK TracerProvider) when the app shuts down.

When a handler raises, the 500 is sent by Starlette's ``ServerErrorMiddleware``,
which sits outside every user middleware. Rather than move the middleware
there (where OpenTelemetry's FastAPIInstrumentor, which rebuilds that
middleware, would lose it or be disabled), ``instrument_app`` wraps the
error handler that ``ServerErrorMiddleware`` calls, so its 500 carries the
prediction id header too. (Not in ``debug`` mode: the traceback page bypasses
the handler.)
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from predtrace.middleware._config import MiddlewareConfig
from predtrace.middleware._errors import ConfigError
from predtrace.middleware._middleware import PredictionTracingMiddleware
from predtrace.middleware._prediction import ERROR_ID_SCOPE_KEY
from predtrace.middleware._runtime import PredictionRuntime

_MARK = "_predtrace_runtime"
_HOOKED = "_predtrace_error_hook"
_MAX_DEPTH = 8  # telemetry middlewares wrapped around ServerErrorMiddleware


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
    _hook_server_errors(app, runtime.config.id_header)
    setattr(app, _MARK, runtime)
    return runtime


def _hook_server_errors(app: object, header: str) -> None:
    """Make the app's ServerErrorMiddleware put the prediction id on its 500."""
    build = getattr(app, "build_middleware_stack", None)
    if not callable(build):
        return

    def build_middleware_stack() -> Any:
        stack = build()
        for error_middleware in _server_error_middlewares(stack):
            if not getattr(error_middleware.handler, _HOOKED, False):
                error_middleware.handler = _error_handler_with_id(error_middleware, header)
        return stack

    setattr(app, "build_middleware_stack", build_middleware_stack)  # noqa: B010 - an instance override, as Starlette's own lookup expects


def _server_error_middlewares(stack: object) -> list[Any]:
    """Starlette's ServerErrorMiddlewares at the top of the stack.

    FastAPIInstrumentor nests the app's own one under its middleware and
    wraps all in a second one; both are found.
    """
    try:
        from starlette.middleware.errors import ServerErrorMiddleware  # noqa: PLC0415 - only Starlette apps get here
    except ImportError:
        return []
    found = []
    node = stack
    for _ in range(_MAX_DEPTH):
        if isinstance(node, ServerErrorMiddleware):
            found.append(node)
        node = getattr(node, "app", None)
    return found


def _error_handler_with_id(
    error_middleware: Any, header: str
) -> Callable[[Any, Exception], Awaitable[Any]]:
    """The app's 500 handler (or Starlette's default), adding the prediction id header."""
    from starlette._utils import is_async_callable  # noqa: PLC0415 - only Starlette apps get here
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415

    original = error_middleware.handler

    async def handler(request: Any, exc: Exception) -> Any:
        if original is None:
            response = error_middleware.error_response(request, exc)
        elif is_async_callable(original):
            response = await original(request, exc)
        else:
            response = await run_in_threadpool(original, request, exc)
        pid = request.scope.get(ERROR_ID_SCOPE_KEY)
        headers = getattr(response, "headers", None)
        if isinstance(pid, str) and headers is not None and header not in headers:
            headers[header] = pid
        return response

    setattr(handler, _HOOKED, True)  # a marker: never wrapped twice
    return handler

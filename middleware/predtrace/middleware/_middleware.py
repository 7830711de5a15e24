"""PredictionTracingMiddleware: the pure ASGI entry point of predtrace in a model server.

Source stage of the pipeline. A request that matches a prediction route is
handed to a ``Prediction`` responder (``_prediction``), which reads the body
once (bounded, replayed to the app), settles the prediction id, joins or
starts the span and, before the last body message leaves, ends the span and
emits one PredictionEvent to the queued exporter. Everything else (other
routes, websockets) passes through untouched. The app's lifespan starts the
pipeline and, at shutdown, flushes it and the app's SDK TracerProvider. Any
failure of its own is counted and swallowed: the app's response is the same
with telemetry off.
"""

from __future__ import annotations

import os
from typing import Final

from predtrace.middleware._asgi import ASGIApp, Message, Receive, Scope, Send
from predtrace.middleware._config import MiddlewareConfig
from predtrace.middleware._prediction import Prediction
from predtrace.middleware._runtime import PredictionRuntime

_LIFESPAN_DONE: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


class PredictionTracingMiddleware:
    """Pure ASGI middleware: a span, an id and an event for every prediction.

    Example:
        >>> app.add_middleware(PredictionTracingMiddleware, config=MiddlewareConfig(...))
        >>> # or wrap any ASGI app:
        >>> app = PredictionTracingMiddleware(app, config=MiddlewareConfig.from_env(os.environ))
    """

    def __init__(
        self,
        app: ASGIApp,
        config: MiddlewareConfig | None = None,
        *,
        runtime: PredictionRuntime | None = None,
    ) -> None:
        self.app = app
        if runtime is None:
            runtime = PredictionRuntime(config or MiddlewareConfig.from_env(os.environ))
        self.runtime = runtime
        self._match = runtime.routes.match
        self._enabled = runtime.config.enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        kind = scope["type"]
        if kind == "http" and self._enabled:
            match = self._match(scope["method"], scope["path"])
            if match is not None:
                await Prediction(self.runtime, match).run(self.app, scope, receive, send)
                return
        elif kind == "lifespan" and self._enabled:
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        runtime = self.runtime

        async def lifespan_receive() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await runtime.astart()
            return message

        async def lifespan_send(message: Message) -> None:
            # After the app's own shutdown handlers, before the server may exit.
            if message["type"] in _LIFESPAN_DONE:
                await runtime.ashutdown()
            await send(message)

        await self.app(scope, lifespan_receive, lifespan_send)

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

import asyncio
import logging
import os
from typing import Final

from predtrace.middleware._asgi import ASGIApp, Message, Receive, Scope, Send
from predtrace.middleware._config import MiddlewareConfig
from predtrace.middleware._errors import ConfigError
from predtrace.middleware._prediction import Prediction
from predtrace.middleware._runtime import PredictionRuntime

_log = logging.getLogger("predtrace.middleware")
_LIFESPAN_DONE: Final = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})


def _in_running_loop() -> bool:
    """Whether we are built inside a running server (Starlette builds its stack lazily)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def route_path(scope: Scope) -> str:
    """The path the app routes on: ``path`` without the ``root_path`` prefix.

    Under ``uvicorn --root-path`` or a Starlette ``Mount`` the full path
    includes the prefix; the prediction routes are written without it. The
    same rule as Starlette's ``get_route_path``.
    """
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        if path == root_path:
            return ""
        if path[len(root_path)] == "/":
            return path[len(root_path) :]
    return path


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
        self.config_error: str | None = None
        self.runtime: PredictionRuntime | None = None
        if runtime is None:
            try:
                runtime = PredictionRuntime(config or MiddlewareConfig.from_env(os.environ))
            except ConfigError as exc:
                if config is not None or not _in_running_loop():
                    raise  # built by the user's code at startup: fail right there
                # Read from the environment by ``app.add_middleware(...)``, i.e.
                # when the server first calls the app: raising here would give
                # a server that answers 500 to everything. The lifespan startup
                # fails instead, with this message (see __call__).
                self.config_error = f"predtrace: invalid PREDTRACE_* settings: {exc}"
                _log.error("%s", self.config_error)
                return
        self.runtime = runtime
        self._match = runtime.routes.match
        self._enabled = runtime.config.enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        kind = scope["type"]
        runtime = self.runtime
        if runtime is None:  # invalid settings (see __init__): no telemetry, no startup
            if kind == "lifespan":
                await self._refuse_startup(receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if kind == "http" and self._enabled:
            match = self._match(scope["method"], route_path(scope))
            if match is not None:
                if not runtime.started:
                    runtime.note_unstarted()
                runtime.inflight += 1
                try:
                    await Prediction(runtime, match).run(self.app, scope, receive, send)
                finally:
                    runtime.inflight -= 1
                return
        elif kind == "lifespan" and self._enabled:
            await self._lifespan(runtime, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _refuse_startup(self, receive: Receive, send: Send) -> None:
        """Answer the server's lifespan startup with the configuration error."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.failed", "message": self.config_error})
                return
            if message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _lifespan(
        self, runtime: PredictionRuntime, scope: Scope, receive: Receive, send: Send
    ) -> None:
        started = answered = False

        async def lifespan_receive() -> Message:
            nonlocal started
            message = await receive()
            if message["type"] == "lifespan.startup":
                started = True
                await runtime.astart()
            return message

        async def lifespan_send(message: Message) -> None:
            nonlocal answered
            answered = True
            # After the app's own shutdown handlers, before the server may exit.
            if message["type"] in _LIFESPAN_DONE:
                await runtime.ashutdown()
            await send(message)

        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        except Exception:
            if answered or started:
                # The app speaks lifespan (it read the startup message) and
                # failed: the server reports the failed startup, not us.
                raise
            unsupported = True
        else:
            unsupported = not answered  # returned without a word: ignores the scope
        if unsupported:
            # An app that does not speak lifespan (a plain ASGI app raising on
            # the scope, or returning): answer it here, so the pipeline still
            # starts with the server and is flushed before a SIGTERM ends it.
            _log.info("predtrace: the app does not handle lifespan; the middleware does")
            await self._own_lifespan(runtime, receive, send, started=started)

    @staticmethod
    async def _own_lifespan(
        runtime: PredictionRuntime, receive: Receive, send: Send, *, started: bool
    ) -> None:
        """The lifespan protocol for an app without one: start and flush the pipeline."""
        if started:  # the startup message was read (and the runtime started) already
            await send({"type": "lifespan.startup.complete"})
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await runtime.astart()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await runtime.ashutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

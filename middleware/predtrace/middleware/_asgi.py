"""ASGI types used by the middleware (the spec's shapes, without a framework import).

The middleware is pure ASGI: it needs no Starlette or FastAPI at run time, so
it can wrap any ASGI 3 application.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# ASGI messages and scopes are dicts of heterogeneous values by specification.
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

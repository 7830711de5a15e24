"""FastAPI's built-in telemetry (``FastAPI(telemetry={...})``, FastAPI >= 0.165).

When it is on, FastAPI makes the SERVER span itself and keeps the request body
it parsed in ``fastapi.telemetry.get_telemetry_data()``; the middleware then
annotates that span and fingerprints that body instead of reading it again.
FastAPI is imported only when a request shows this telemetry is active, so
plain Starlette apps never load it.
"""

from __future__ import annotations

from collections.abc import Callable

from predtrace.middleware._asgi import Scope

_getter: Callable[[], object | None] | None = None


def telemetry_data(scope: Scope) -> object | None:
    """FastAPI's ``TelemetryData`` for this request, or None when its telemetry is off."""
    if scope.get("fastapi.telemetry") is None:
        return None
    global _getter  # noqa: PLW0603 - resolved once, on the first FastAPI-telemetry request
    if _getter is None:
        try:
            from fastapi.telemetry import get_telemetry_data  # noqa: PLC0415 - optional, lazy
        except ImportError:  # an older FastAPI wrote this scope key? then ignore it
            return None
        _getter = get_telemetry_data
    return _getter()

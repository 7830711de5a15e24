"""Errors the middleware raises to its users (at startup only; never per request)."""

from __future__ import annotations

from predtrace.wire import PredtraceError


class ConfigError(PredtraceError, ValueError):
    """An invalid middleware setting; the message names the setting and the reason."""

"""Errors of the sidecar process: what its users (and its own servers) catch.

Every error the sidecar raises to a caller is a ``PredtraceError``; the gRPC
and HTTP front ends translate them into status codes at the boundary.
"""

from __future__ import annotations

from predtrace.wire import PredtraceError


class SidecarError(PredtraceError):
    """Base of the sidecar's own errors."""


class ConfigError(SidecarError, ValueError):
    """A setting that cannot work; raised at startup, never after."""


class SpoolError(SidecarError):
    """The durable spool could not do what was asked."""


class SpoolUnusableError(SpoolError):
    """The spool directory cannot be used at all (startup fails, naming path and reason)."""


class SpoolFullError(SpoolError):
    """The disk under the spool is full: the write was refused whole, retry later."""


class SpoolBusyError(SpoolError):
    """Too many bytes are waiting for the spool writer: back off and retry."""


class SpoolClosedError(SpoolError):
    """The spool is closed (the sidecar is shutting down)."""


class EventTooLargeError(SpoolError):
    """One event is larger than the spool's record limit."""

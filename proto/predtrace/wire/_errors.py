"""Errors of the wire package: the only exceptions its decoders raise."""

from __future__ import annotations


class PredtraceError(Exception):
    """Base of every exception predtrace raises to its users."""


class WireError(PredtraceError, ValueError):
    """Bytes or text that are not a valid predtrace wire value.

    The message is a short reason fit to return to a client (it never quotes
    the offending payload).
    """


class WireTooLargeError(WireError):
    """A payload over one of the decoder's size limits (answer 413, not 400)."""


class InvalidIdError(WireError):
    """Text that is not a valid trace id, span id or prediction id."""

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


class UnreadableEvent:
    """An event of a batch that could not be built within its bounds, and why.

    ``read_batch_events`` yields it in the event's place, so the consumer
    rejects that event alone (``event_from_map`` raises its reason) and reads on.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"UnreadableEvent({self.reason!r})"

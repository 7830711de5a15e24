"""Export errors: what an exporter raises to tell the queue whether to retry."""

from __future__ import annotations

from predtrace.wire import PredtraceError


class ExportError(PredtraceError):
    """Base of the errors an exporter raises."""


class PermanentExportError(ExportError):
    """The batch can never be delivered as is (400, 409, 413, INVALID_ARGUMENT).

    It is dead-lettered and counted, never retried.
    """


class RetryableExportError(ExportError):
    """A failure retrying can cure: 429, 502-504, 401/403, 404/405 and 3xx (the endpoint or the
    credentials, not the batch), an answer that is not an ack, UNAVAILABLE, connection error.

    Args:
        message: short reason, safe to log (no credentials, no payload).
        retry_after: seconds the receiver asked us to wait, if it said.
        status: the receiver's HTTP status, when it answered at all (None for a
            connection error); lets a caller tell a struggling receiver from a
            batch it keeps failing on.
    """

    def __init__(
        self, message: str, *, retry_after: float | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status

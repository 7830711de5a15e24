"""The prediction id of a ModelInfer call through the OIP proxy (DESIGN §3).

Client -> OipProxy (**PredictionIds**) -> model server. The id is the
caller's, the first usable one of the OIP ``id``, ``x-request-id`` and
``ce-id``, else a new UUIDv7. A request without an OIP id gets the
prediction id added as its ``id`` field (the model server echoes it) when
the message limit leaves room; a caller's id is never replaced.
"""

from __future__ import annotations

from typing import Final, TypeGuard

from predtrace.sidecar._oip_fields import id_field
from predtrace.sidecar._oip_metadata import Metadata
from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.wire import CALLER_ID_RE, new_prediction_id

# Where a caller's id may come from after the OIP ``id``, in order (DESIGN §3).
_CALLER_ID_KEYS: Final = ("x-request-id", "ce-id")


# A caller id outside the wire's rule (CALLER_ID_RE, as in the middleware) is
# refused by the intake (a NUL) or cannot be looked up in the collector (a
# space, non-ASCII, over 256 characters).
def usable(caller_id: object) -> TypeGuard[str]:
    """Whether ``caller_id`` may be a prediction id (``CALLER_ID_RE``)."""
    return isinstance(caller_id, str) and CALLER_ID_RE.fullmatch(caller_id) is not None


class PredictionIds:
    """Picks each call's prediction id and the id field added to its request.

    Counts, and logs (never their values), the caller ids it could not use
    and the ids it had no room to add.
    """

    def __init__(self, max_message_bytes: int, log: RateLimitedLog) -> None:
        self._max_message_bytes = max_message_bytes
        self._log = log
        self.invalid_caller_ids = 0
        self.ids_not_added = 0  # no room under the message limit for the id the proxy adds

    def pick(self, oip_id: str | None, metadata: Metadata) -> str:
        """The call's prediction id: the first usable caller id, else a new one."""
        return self._caller_id(oip_id, metadata) or new_prediction_id()

    def _caller_id(self, oip_id: str | None, metadata: Metadata) -> str | None:
        """The first usable caller id: the OIP id, then ``x-request-id``, then ``ce-id``.

        An unusable one is skipped, counted and logged (never its value).
        """
        candidates: list[tuple[str, str | bytes | None]] = [] if oip_id == "" else [("id", oip_id)]
        for name in _CALLER_ID_KEYS:
            candidates += [(key, value) for key, value in metadata if key == name][:1]
        for source, value in candidates:
            if usable(value):
                return value
            self.invalid_caller_ids += 1
            self._log.warning(
                f"caller-id-{source}",
                "OIP proxy: a caller's %s is not 1-256 printable ASCII characters; not used",
                source,
            )
        return None

    def field(self, request: bytes, prediction_id: str) -> bytes:
        """The id field to add to the request; none if that takes it over the message limit.

        A request the model server would take without the id must not be
        refused because of it (telemetry never changes a prediction): it
        goes untouched, and its event keeps the id (the answer lacks it).
        """
        field = id_field(prediction_id)
        if len(request) + len(field) <= self._max_message_bytes:
            return field
        self.ids_not_added += 1
        self._log.warning(
            "id-not-added",
            "OIP proxy: a request without an id is too close to the %d-byte message limit"
            " for the proxy to add one; forwarded without it (its event keeps the id)",
            self._max_message_bytes,
        )
        return b""

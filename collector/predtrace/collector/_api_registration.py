"""Lineage registration (``POST /v1/lineage``, ``POST /v1/openlineage``): body -> JSON -> store.

Part of ``QueryApi`` (``_api``), which checks the scope first. The body is
read as batches are (``_ingest``: a deadline, a cap, the in-flight byte
budget that batches share), decoded as strict JSON (no NaN, no number beyond
a double or past ``_MAX_INT_DIGITS`` digits), parsed by the endpoint's parser
and registered; lineage that contradicts what is stored is refused (409),
kept as stored, or replaced with ``?replace=true``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from aiohttp import web

from predtrace.collector._api_logs import DisconnectLog
from predtrace.collector._api_responses import error_response, json_response
from predtrace.collector._body import read_body
from predtrace.collector._budget import _Refused, _Reservation
from predtrace.collector._errors import LineageConflictError, LineageError
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import Registration
from predtrace.collector.store import OnConflict

if TYPE_CHECKING:
    from predtrace.collector._app import CollectorParts

# ``?replace=`` of the lineage endpoints: overwrite links that disagree.
_FLAGS: Final = {"true": True, "1": True, "false": False, "0": False}


class RegistrationHandler:
    """Reads, parses and stores one lineage registration a request."""

    def __init__(
        self, service: LineageService, retry_after: str, disconnects: DisconnectLog
    ) -> None:
        self.service, self.retry_after, self.disconnects = service, retry_after, disconnects

    async def handle(
        self,
        request: web.Request,
        parse: Callable[[object], Registration],
        on_conflict: OnConflict,
    ) -> web.Response:
        """Register the body ``parse`` reads: 201, or 400/408/409/413/503 with the reason."""
        replace = request.query.get("replace", "false").lower()
        if replace not in _FLAGS:
            return error_response(400, "replace must be true or false")
        try:
            registration = parse(await _read_json(request))
        except LineageError as exc:
            return error_response(400, str(exc))
        except _Refused as refused:
            headers = {"Retry-After": self.retry_after} if refused.status == 503 else None
            return error_response(refused.status, refused.reason, headers)
        except ConnectionResetError:
            # Nobody reads this answer; left to aiohttp, each dropped upload
            # would be an ERROR with a traceback.
            self.disconnects.record(request.path)
            return error_response(400, "client disconnected before the body ended")
        try:
            conflicts = await self.service.register(
                registration, on_conflict="replace" if _FLAGS[replace] else on_conflict
            )
        except LineageConflictError as exc:
            return error_response(409, str(exc))
        answer: dict[str, object] = {"registered": True, "source": registration.source}
        if conflicts:
            answer["conflicts_kept_as_stored"] = conflicts
        return json_response(answer, 201)


def _parts(request: web.Request) -> CollectorParts:
    # The app module builds this API (it imports this module): read per request.
    from predtrace.collector._app import PARTS  # noqa: PLC0415 - see above

    return request.app[PARTS]


async def _read_json(request: web.Request) -> object:
    """The JSON body, read under the same rules as a batch's.

    Within the body deadline (408) and the lineage body cap (413), each
    byte held in the in-flight budget that batches share (503 when full).

    Raises:
        LineageError: the body is not JSON (400).
        _Refused: 408, 413 or 503 with the reason.
        ConnectionResetError: the client hung up mid-body.
    """
    parts = _parts(request)
    reservation = _Reservation(parts.budget)
    try:
        reservation.grow_to(1)  # a full budget answers 503 before any read
        body = await _read_body(
            request, parts.config.max_json_bytes, parts.config.body_timeout_s, reservation
        )
        return _decode_json(body)
    finally:
        reservation.release()


async def _read_body(
    request: web.Request, cap: int, timeout_s: float, reservation: _Reservation
) -> bytes:
    if request.content_length is not None and request.content_length > cap:
        raise _Refused(413, f"lineage body exceeds {cap} bytes", "too_large")
    return await read_body(
        request,
        reservation,
        cap=cap,
        timeout_s=timeout_s,
        name="lineage body",
        unsaved="not registered",
    )


def _decode_json(body: bytes) -> object:
    try:
        # UTF-8 whatever charset the header claims (RFC 8259 §8.1). NaN,
        # Infinity and numbers beyond a double are not JSON numbers: json
        # would read them, and an id would be stored as the text "nan".
        return json.loads(
            body.decode("utf-8"),
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except LineageError:
        raise
    except (ValueError, UnicodeDecodeError):
        raise LineageError("the body is not valid JSON") from None
    except RecursionError:
        raise LineageError("the body is nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """An object of the body; a key written twice is refused (``json`` keeps the last,
    silently dropping what the sender may have meant)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise LineageError(f"the key {key[:64]!r} is written twice in one object")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> object:
    raise LineageError(f"the body holds {name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: json reads it as infinity
        raise LineageError(f"the number {text[:32]} in the body is out of range")
    return value


_MAX_INT_DIGITS: Final = 4000


def _bounded_int(text: str) -> int:
    # Python refuses to read integers past 4,300 digits with a ValueError that
    # would say "not valid JSON"; name the real reason.
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise LineageError(f"a number has more than {_MAX_INT_DIGITS} digits")
    return int(text)

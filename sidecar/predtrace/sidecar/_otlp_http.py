"""The OTLP receiver's HTTP side: ``POST /v1/traces`` in front of ``OtlpReceiver``.

HTTP client -> **OtlpHttpListener** -> ``OtlpReceiver.export`` (``_otlp``).
The listener refuses what is not an export (another content type or
encoding: 415) and a request this sidecar forwarded itself (508: an
``--otlp-export`` pointing back at the sidecar would loop); it reads the body
under the receiver's in-flight budget and within a deadline, inflates it
(``_otlp_body``), and answers in the request's encoding: the Export answer,
or a ``google.rpc.Status`` saying why not (503 + Retry-After when busy).
"""

from __future__ import annotations

import json
import ssl
from typing import TYPE_CHECKING, Final

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.message import DecodeError

from predtrace.cli._serving import (
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    cap_connections,
    listen_error,
    quiet_client_errors,
)
from predtrace.sidecar._config import join_hostport, parse_hostport
from predtrace.sidecar._errors import SpoolError
from predtrace.sidecar._otlp_body import (
    CODINGS,
    JSON,
    PROTOBUF,
    BodyRefusedError,
    BodyReservation,
    BudgetSpentError,
    OtlpJsonError,
    TooManySpansError,
    UndecodableBodyError,
    decode_reason,
    decompress,
    read_body,
    refusal_response,
)
from predtrace.sidecar._otlp_export import FORWARDED_BY, OtlpForwarder
from predtrace.sidecar._otlp_grpc import RETRY_AFTER_S
from predtrace.sidecar._otlp_spans import ExportResponse, SpanIdLengthError
from predtrace.sidecar.pipeline import RateLimitedLog
from predtrace.wire import (
    WireTooLargeError,
)

if TYPE_CHECKING:
    from predtrace.sidecar._otlp import OtlpReceiver

# Hops a forwarded request may name (``FORWARDED_BY``): a chain of sidecars
# is never this long; a longer header is someone else's.
_MAX_HOPS: Final = 16


def http_listen_what(given: bool | None = None) -> str:
    """The OTLP/HTTP listener's setting as an error names it: given, derived, or either."""
    if given:
        return "--otlp-http-listen"
    if given is None:
        return "OTLP/HTTP: --otlp-http-listen, or --otlp-listen's port + 1 without it"
    return (
        "OTLP/HTTP: --otlp-listen's port + 1, as --otlp-http-listen is not given; "
        "give --otlp-http-listen HOST:PORT to choose another"
    )


class OtlpHttpListener:
    """Serves ``POST /v1/traces`` for a receiver; made and owned by ``OtlpReceiver.start_http``.

    Args:
        receiver: takes the exports, and holds the in-flight budget.
        forwarder: the receiver's; its token names this sidecar in ``FORWARDED_BY``.
        log: the receiver's rate-limited log.
        max_body: the largest body taken, compressed or not (413 past it).
        body_timeout: seconds a body may take to arrive (408 past it).
    """

    def __init__(
        self,
        receiver: OtlpReceiver,
        forwarder: OtlpForwarder | None,
        log: RateLimitedLog,
        *,
        max_body: int,
        body_timeout: float,
    ) -> None:
        self._receiver = receiver
        self._forwarder = forwarder
        self._log = log
        self._max_body = max_body
        self._body_timeout = body_timeout
        self._runner: web.AppRunner | None = None
        self.connections_refused = 0
        """Connections closed as soon as accepted, ``MAX_CONNECTIONS`` being open."""

    def _refuse_connection(self) -> None:
        self.connections_refused += 1

    async def start(
        self, listen: str, *, ssl_context: ssl.SSLContext | None, what: str | None
    ) -> str:
        """Listen on ``listen`` (as ``OtlpReceiver.start_http`` says); return ``host:port``."""
        app = web.Application(client_max_size=self._max_body)
        app.router.add_post("/v1/traces", self._http_export)
        quiet_client_errors()
        # auto_decompress off: ``_inflate`` decodes the body, checking its end.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=1.0,
            auto_decompress=False,
            keepalive_timeout=IDLE_TIMEOUT_S,
            max_headers=MAX_HEADERS,
            max_field_size=MAX_FIELD_SIZE,
        )
        await self._runner.setup()
        if self._runner.server is not None:
            cap_connections(self._runner.server, MAX_CONNECTIONS, self._refuse_connection)
        host, port = parse_hostport(listen, what or "--otlp-http-listen")
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError as exc:
            # aiohttp's own words name an address only ("error while attempting
            # to bind on address (...)"): not which listener, nor which setting.
            await self._runner.cleanup()
            self._runner = None
            what = what or http_listen_what()
            raise listen_error(listen, what, exc) from None
        bound = self._runner.addresses[0][1]
        return join_hostport(host, bound)

    async def _http_export(self, request: web.Request) -> web.Response:
        reservation = self._receiver.reservation()
        try:
            via = self._hops(request)
            body = await self._read_http(request, reservation)
            answer = await self._export_http(body, request.content_type == JSON, via, reservation)
        except BodyRefusedError as refused:
            if isinstance(refused, BudgetSpentError):
                self._receiver.budget_refusals["http"] += 1
            return refusal_response(refused, request.content_type)
        finally:
            reservation.release()  # the body and its parsed request are gone
        if request.content_type == JSON:  # answer in the encoding asked in (OTLP/HTTP spec)
            text = json.dumps(json_format.MessageToDict(answer))
            return web.Response(text=text, content_type=JSON)
        return web.Response(body=answer.SerializeToString(), content_type=PROTOBUF)

    def _hops(self, request: web.Request) -> tuple[str, ...]:
        """The sidecars the request was forwarded through.

        Raises:
            BodyRefusedError: 508, this sidecar is one of them (a forwarding loop).
        """
        header = request.headers.get(FORWARDED_BY, "")
        hops = tuple(hop.strip() for hop in header.split(",") if hop.strip())[-_MAX_HOPS:]
        if self._forwarder is not None and self._forwarder.token in hops:
            self._log.warning(
                "loop",
                "refused (508) an OTLP export this sidecar forwarded itself: "
                "--otlp-export leads back to this sidecar's own OTLP listener",
            )
            raise BodyRefusedError(
                508, "loop detected: this request was forwarded by this sidecar itself"
            )
        return hops

    async def _export_http(
        self, body: bytes, as_json: bool, via: tuple[str, ...], reservation: BodyReservation
    ) -> ExportResponse:
        """``export`` of a read body, its failures as the HTTP refusals they are."""
        try:
            parse = self._receiver.parser(as_json)
            return await self._receiver.export(body, parse, via, reservation=reservation)
        except (DecodeError, RecursionError) as exc:
            reason = f"malformed OTLP protobuf body: {decode_reason(exc)}"
            raise BodyRefusedError(400, reason) from None
        except TooManySpansError as exc:
            raise BodyRefusedError(413, str(exc)) from None
        except OtlpJsonError as exc:
            raise BodyRefusedError(400, f"malformed OTLP JSON body: {exc}") from None
        except SpanIdLengthError as exc:
            raise BodyRefusedError(400, f"malformed OTLP request: {exc}") from None
        except SpoolError as exc:
            raise BodyRefusedError(503, str(exc), retry_after=RETRY_AFTER_S) from None

    async def _read_http(self, request: web.Request, reservation: BodyReservation) -> bytes:
        """The request's body, decompressed, its bytes held in the in-flight budget.

        Raises:
            BodyRefusedError: why there is no body to parse (4xx, or 503 when busy).
        """
        if request.content_type not in (PROTOBUF, JSON):
            raise BodyRefusedError(415, f"send {PROTOBUF} or {JSON}")
        coding = request.headers.get("Content-Encoding", "").strip().lower()
        if coding not in CODINGS:  # the parser would get it still encoded
            raise BodyRefusedError(415, "Content-Encoding must be gzip or deflate")
        raw = await read_body(
            request, reservation, limit=self._max_body, body_timeout=self._body_timeout
        )
        try:
            body = decompress(raw, coding, self._max_body)
        except WireTooLargeError:
            raise BodyRefusedError(413, "decompressed body too large") from None
        except UndecodableBodyError as exc:
            reason = f"cannot decompress the body (Content-Encoding: {coding or 'none'}): {exc}"
            raise BodyRefusedError(400, reason) from None
        del raw  # only the inflated body is held from here on
        reservation.grow_to(len(body))
        return body

    async def stop(self) -> None:
        """Stop listening. Safe twice."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

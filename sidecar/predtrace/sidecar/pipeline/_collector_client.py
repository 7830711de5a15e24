"""The collector HTTP client: msgpack batches POSTed to ``/v1/batches``, answers classified.

The async ``CollectorClient`` is the one place that speaks HTTP to the
collector (the sidecar's shipper uses it directly; ``CollectorHttpExporter``
in ``_collector_http`` wraps it for the queued pipeline's worker thread).
Answers are classified per the delivery contract: 2xx delivered (partial
success read from the ack), 408/425/429/500/502/503/504 and connection errors
retryable (Retry-After honoured). Answers that say nothing about the batch
are retryable too, and name the cause: 401/403 (a token problem is fixed by
an operator, not by throwing the batch away), 404/405 and every 3xx (the URL
does not reach an ingest endpoint: a wrong path prefix, a proxy or captive
portal; redirects are not followed, so a token never goes where it was not
configured to), and a 2xx whose body is not an acknowledgement (a captive
portal's page). Only what refuses the batch itself is permanent: 400, 413
and the other 4xx/5xx statuses, raised as ``RefusedBatchError`` with the
status and the collector's reason, so the sidecar's shipper can tell a batch
too large for an ingress (413: it splits the batch) and a seq the collector
holds with other bytes (409: it renumbers) from a batch that is bad.
``ready`` asks the collector's ``/readyz``: the shipper holds a 500 against a
batch only while the collector says it is ready.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

import aiohttp

from predtrace.sidecar.pipeline._collector_config import CollectorClientConfig
from predtrace.sidecar.pipeline._errors import PermanentExportError, RetryableExportError
from predtrace.wire import IngestAck, WireError, decode_ack

BATCH_CONTENT_TYPE = "application/vnd.predtrace.batch+msgpack"
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# The collector refused the credentials, not the batch: keep it and retry.
CREDENTIAL_STATUSES = frozenset({401, 403})
# The URL reaches no ingest endpoint (with every 3xx): keep the batch and retry.
ENDPOINT_STATUSES = frozenset({404, 405})
_MAX_ACK_BYTES = 1024 * 1024
# The refusal text kept for the caller: the collector's 409 names the producer
# id (up to 200 characters, 800 bytes) before it says that a seq was reused.
_MAX_REASON_BYTES = 2048
# A readiness probe is one small GET: it never waits as long as a batch may.
_READY_TIMEOUT_S = 5.0
_READY_BODY = b"ready"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Read a Retry-After header: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class RefusedBatchError(PermanentExportError):
    """The collector (or a proxy) refused this batch for good: 400, 409, 413 and the like.

    Args:
        message: short reason, safe to log.
        status: the HTTP status.
        detail: the start of the answer's body (the collector's reason), for
            callers that act on it; ``message`` holds its first 200 bytes.
    """

    def __init__(self, message: str, *, status: int, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


class CollectorClient:
    """Async client of the collector's ingest API (one per event loop)."""

    def __init__(self, config: CollectorClientConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    def _headers(self, compressed: bool) -> dict[str, str]:
        headers = {"Content-Type": BATCH_CONTENT_TYPE, "Accept": BATCH_CONTENT_TYPE}
        if compressed:
            headers["Content-Encoding"] = "gzip"
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        return headers

    async def send(self, body: bytes, *, compressed: bool) -> IngestAck:
        """POST one encoded batch and return the collector's acknowledgement.

        Raises:
            RetryableExportError: transient failure; retry after ``retry_after``.
            PermanentExportError: the collector will never accept this body.
        """
        if self._closed:
            # A send racing shutdown must not open a session nobody closes.
            raise RetryableExportError("collector client is closed")
        session = self._open_session()
        try:
            async with session.post(
                self.config.batches_url,
                data=body,
                headers=self._headers(compressed),
                allow_redirects=False,  # a 3xx is an endpoint error (see _classify)
            ) as resp:
                content = await resp.content.read(_MAX_ACK_BYTES)
                return self._classify(resp.status, resp.headers, content)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RetryableExportError(self._unreachable(exc)) from None

    async def ready(self) -> bool | None:
        """What the collector's ``GET /readyz`` says: True ready, False not, None unknown.

        The shipper asks after an ingest attempt failed with a 500: a collector
        that is ready otherwise failed on that batch; one that is not ready, or
        a proxy answering 5xx to everything, is having an outage, which must
        never cost the batch. False: a 5xx, or no answer within a few seconds.
        None when ``/readyz`` cannot tell (an ingress that routes only
        ``/v1/batches`` answers 404; a page that is not the collector's): the
        500 then counts, as it must, or a poison batch would hold the queue for
        ever. Never raises.
        """
        if self._closed:
            return None
        session = self._open_session()
        timeout = aiohttp.ClientTimeout(total=min(self.config.timeout, _READY_TIMEOUT_S))
        headers = {}
        if self.config.token:  # a gateway in front may want it; the collector ignores it
            headers["Authorization"] = f"Bearer {self.config.token}"
        try:
            async with session.get(
                self.config.ready_url, headers=headers, allow_redirects=False, timeout=timeout
            ) as resp:
                body = await resp.content.read(len(_READY_BODY) + 64)
                if resp.status >= 500:
                    return False
                return True if resp.status == 200 and body.strip() == _READY_BODY else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    def _open_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.config.timeout)
            connector = None
            if self.config.ca_file is not None:
                trust = ssl.create_default_context(cafile=self.config.ca_file)
                connector = aiohttp.TCPConnector(ssl=trust)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        return self._session

    def _unreachable(self, exc: BaseException) -> str:
        """Why the collector was not reached: its URL, the cause, a hint for a certificate."""
        cause = str(exc).strip()[:200] or type(exc).__name__
        hint = ""
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            hint = (
                " (a private CA? the sidecar takes --collector-ca; the middleware and the "
                "CLI read SSL_CERT_FILE)"
            )
        return f"collector unreachable at {self.config.batches_url}: {cause}{hint}"

    def _classify(self, status: int, headers: Mapping[str, str], content: bytes) -> IngestAck:
        if 200 <= status < 300:
            try:
                return decode_ack(content)
            except WireError as exc:
                # Not the collector's answer (a captive portal's page, a proxy):
                # nothing is known about the batch, so it is kept and retried.
                raise RetryableExportError(
                    f"unreadable ack from collector ({status}: {exc}); "
                    f"is {self.config.batches_url} the collector?",
                    status=status,
                ) from None
        reason = content[:200].decode("utf-8", "replace").strip()
        if status in RETRYABLE_STATUSES:
            raise RetryableExportError(
                f"collector answered {status}",
                retry_after=parse_retry_after(headers.get("Retry-After")),
                status=status,
            )
        if status in CREDENTIAL_STATUSES:
            raise RetryableExportError(
                f"collector refused the token ({status}: {reason}); check the token (the "
                "sidecar's --token or PREDTRACE_TOKEN, the middleware's "
                "PREDTRACE_COLLECTOR_TOKEN) and the producer ids it is bound to",
                status=status,
            )
        if 300 <= status < 400 or status in ENDPOINT_STATUSES:
            where = headers.get("Location", "")
            moved = f" to {where[:200]}" if 300 <= status < 400 and where else ""
            raise RetryableExportError(
                f"the collector URL answered {status}{moved}: {self.config.batches_url} is "
                "not an ingest endpoint; give the collector's base URL (the sidecar's "
                "--collector, the middleware's PREDTRACE_COLLECTOR_URL)",
                status=status,
            )
        detail = content[:_MAX_REASON_BYTES].decode("utf-8", "replace").strip()
        raise RefusedBatchError(
            f"collector answered {status}: {reason}", status=status, detail=detail
        )

    async def close(self) -> None:
        """Close the HTTP session; later sends fail as retryable. Safe twice."""
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

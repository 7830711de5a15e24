"""The collector HTTP exporter: msgpack batches POSTed to ``/v1/batches``.

The async ``CollectorClient`` is the one place that speaks HTTP to the
collector (the sidecar's shipper uses it directly); ``CollectorHttpExporter``
wraps it for the queued pipeline's worker thread. Answers are classified per
the delivery contract: 2xx delivered (partial success read from the ack),
408/425/429/500/502/503/504 and connection errors retryable (Retry-After
honoured). Answers that say nothing about the batch are retryable too, and
name the cause: 401/403 (a token problem is fixed by an operator, not by
throwing the batch away), 404/405 and every 3xx (the URL does not reach an
ingest endpoint: a wrong path prefix, a proxy or captive portal; redirects
are not followed, so a token never goes where it was not configured to),
and a 2xx whose body is not an acknowledgement (a captive portal's page).
Only what refuses the batch itself is permanent: 400, 413 and the other
4xx/5xx statuses, raised as ``RefusedBatchError`` with the status and the
collector's reason, so the sidecar's shipper can tell a batch too large for
an ingress (413: it splits the batch) and a seq the collector holds with
other bytes (409: it renumbers) from a batch that is bad. ``ready`` asks the
collector's ``/readyz``: the shipper holds a 500 against a batch only while
the collector says it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import secrets
import ssl
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp

from predtrace.sidecar.pipeline._errors import PermanentExportError, RetryableExportError
from predtrace.sidecar.pipeline._stages import ExportResult, OutgoingBatch
from predtrace.wire import (
    EventBatch,
    IngestAck,
    WireError,
    batch_digest,
    decode_ack,
    encode_events_payload,
    gzip_bytes,
)

BATCH_CONTENT_TYPE = "application/vnd.predtrace.batch+msgpack"
RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# The collector refused the credentials, not the batch: keep it and retry.
CREDENTIAL_STATUSES = frozenset({401, 403})
# The URL reaches no ingest endpoint (with every 3xx): keep the batch and retry.
ENDPOINT_STATUSES = frozenset({404, 405})
_MAX_PORT = 65535
_MAX_TIMEOUT_S = 3600.0
_MAX_ACK_BYTES = 1024 * 1024
# The refusal text kept for the caller: the collector's 409 names the producer
# id (up to 200 characters, 800 bytes) before it says that a seq was reused.
_MAX_REASON_BYTES = 2048
# A readiness probe is one small GET: it never waits as long as a batch may.
_READY_TIMEOUT_S = 5.0
_READY_BODY = b"ready"


def without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` removed: what may be shown or logged of it."""
    try:
        parts = urlsplit(url)
    except ValueError:  # an unbalanced IPv6 bracket: cut what could be userinfo by hand
        scheme, sep, rest = url.rpartition("://")
        return scheme + sep + rest.rpartition("@")[2]
    if "@" not in parts.netloc:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine (localhost or a loopback address)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectorClientConfig:
    """Where and how to reach the collector.

    A bearer token is never sent over plaintext HTTP to a host other than the
    loopback: such a config fails at startup. So does a URL with a user name or
    password (``http://user:pw@host``): it would go out as Basic auth and show
    wherever the URL is shown; the token is the credential.

    Example:
        >>> CollectorClientConfig(url="https://collector:8443", token="...")
    """

    url: str
    token: str | None = None
    timeout: float = 10.0
    compress: bool = True
    ca_file: str | None = None
    """PEM bundle that signs an https collector's certificate (else the system's trust)."""

    def __post_init__(self) -> None:
        shown = without_userinfo(self.url)
        if shown != self.url:
            raise ValueError(
                "the collector URL must not carry a user name or password "
                "(user:password@host): they would be sent as Basic auth and shown by status; "
                "give the collector's bearer token instead (the sidecar's --token or "
                "PREDTRACE_TOKEN, the middleware's collector_token or PREDTRACE_COLLECTOR_TOKEN)"
            )
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"collector URL must be http(s)://host[:port], got {self.url!r}")
        try:
            port = parts.port  # raises for a port out of range or not a number
        except ValueError:
            port = -1
        if port is not None and not 0 < port <= _MAX_PORT:
            raise ValueError(f"collector URL has an invalid port (1-{_MAX_PORT}), got {self.url!r}")
        if self.token and parts.scheme == "http" and not is_loopback_host(parts.hostname):
            raise ValueError(
                f"refusing to send a bearer token over plaintext HTTP to {parts.hostname}; "
                "use an https:// collector URL"
            )
        # NaN fails too (it compares false); inf would make every attempt unbounded.
        if not 0 < self.timeout <= _MAX_TIMEOUT_S:
            raise ValueError(
                f"collector timeout must be > 0 and at most {_MAX_TIMEOUT_S:g} seconds, "
                f"not {self.timeout}"
            )
        if self.ca_file is not None and not os.path.isfile(self.ca_file):
            raise ValueError(f"collector CA file {self.ca_file!r} does not exist")

    @property
    def batches_url(self) -> str:
        """The ingest endpoint."""
        return self.url.rstrip("/") + "/v1/batches"

    @property
    def ready_url(self) -> str:
        """The collector's readiness endpoint (200 ``ready`` while its store answers)."""
        return self.url.rstrip("/") + "/readyz"

    def __repr__(self) -> str:
        # Never show the token, not even in a traceback.
        token = "<set>" if self.token else None
        url = without_userinfo(self.url)
        return f"CollectorClientConfig(url={url!r}, token={token}, timeout={self.timeout})"


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


def new_producer_id(prefix: str) -> str:
    """A producer id unique to this process start: ``<prefix>-<random>``."""
    return f"{prefix or 'predtrace'}-{secrets.token_hex(6)}"


class CollectorHttpExporter:
    """Exporter of the queued pipeline that POSTs batches to the collector.

    Runs its own event loop in the pipeline's worker thread, so it works the
    same under sync and asyncio model servers. Numbers each batch and chains
    its digest on the first attempt; retries resend identical bytes.

    In-process batches are not durable, so the producer id is unique per
    process start (``<prefix>-<random>``, renewed in a forked child) and seq
    starts at 1 for each: the collector never confuses two processes.
    """

    def __init__(self, config: CollectorClientConfig, *, producer_prefix: str = "") -> None:
        self.config = config
        self._prefix = producer_prefix
        self._reset()
        _INSTANCES.add(self)

    def _reset(self) -> None:
        self.producer_id = new_producer_id(self._prefix)
        self._client = CollectorClient(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_seq = 1
        self._prev_digest = b""
        # set_deadline comes from another thread (the pipeline's shutdown):
        # the deadline (time.monotonic) and the running attempt's timeout
        # scope are shared under this lock.
        self._lock = threading.Lock()
        self._deadline: float | None = None
        self._scope: asyncio.Timeout | None = None

    def export(self, batch: OutgoingBatch) -> ExportResult:
        """Deliver one batch (see the module docstring for the classification).

        An attempt ends at the collector timeout or at the deadline given to
        ``set_deadline``, whichever comes first (retryable either way).
        """
        if batch.payload is None:
            self._seal(batch)
        assert batch.payload is not None  # noqa: S101 - set by _seal
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        try:
            ack = self._loop.run_until_complete(self._send_bounded(batch.payload))
        except TimeoutError:
            # Only the deadline's scope raises this: the client turns its own
            # timeouts into RetryableExportError.
            raise RetryableExportError("collector attempt cut at the shutdown deadline") from None
        return ExportResult(ack.accepted, ack.rejected, ack.duplicate)

    async def _send_bounded(self, payload: bytes) -> IngestAck:
        async with asyncio.timeout(None) as scope:
            with self._lock:
                self._scope = scope
                deadline = self._deadline
            try:
                if deadline is not None:
                    self._reschedule(scope, deadline)
                return await self._client.send(payload, compressed=self.config.compress)
            finally:
                with self._lock:
                    self._scope = None

    def set_deadline(self, timeout: float) -> None:
        """End the attempt in flight, and every later one, within ``timeout`` seconds.

        Thread-safe: the queued pipeline calls it from its shutdown, with the
        time left before its deadline, and with 0 when it gives up waiting.
        ``shutdown`` clears it.
        """
        with self._lock:
            self._deadline = time.monotonic() + max(0.0, timeout)
            loop = self._loop if self._scope is not None else None
        if loop is None:
            return  # no attempt running: the next one reads the deadline
        # A RuntimeError: the loop was closed meanwhile, nothing left to bound.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._apply_deadline)

    def _apply_deadline(self) -> None:
        # In the loop's thread, so the scope is not exiting under us.
        with self._lock:
            scope, deadline = self._scope, self._deadline
        if scope is not None and deadline is not None:
            self._reschedule(scope, deadline)

    @staticmethod
    def _reschedule(scope: asyncio.Timeout, deadline: float) -> None:
        when = asyncio.get_running_loop().time() + max(0.0, deadline - time.monotonic())
        current = scope.when()
        if current is None or when < current:
            scope.reschedule(when)

    def _seal(self, batch: OutgoingBatch) -> None:
        payload = encode_events_payload(
            EventBatch(
                producer_id=self.producer_id,
                seq=self._next_seq,
                events=batch.events,
                batch_id=secrets.token_bytes(16),
                created_at_unix_nano=time.time_ns(),
                prev_digest=self._prev_digest,
            )
        )
        batch.seq = self._next_seq
        self._next_seq += 1
        self._prev_digest = batch_digest(payload)
        batch.payload = gzip_bytes(payload) if self.config.compress else payload

    def shutdown(self, timeout: float) -> None:
        """Close the session and the private loop; clear the deadline. Safe twice."""
        with self._lock:
            self._deadline = None  # an export after this is bounded by the timeout alone
        if self._loop is None:
            return
        self._loop.run_until_complete(self._client.close())
        self._loop.close()
        self._loop = None
        self._client = CollectorClient(self.config)  # an export after this opens afresh


_INSTANCES: weakref.WeakSet[CollectorHttpExporter] = weakref.WeakSet()


def _reset_after_fork() -> None:
    # The parent's event loop and sockets are unusable in the child, and the
    # child must not reuse the parent's (producer, seq) numbering.
    for exporter in list(_INSTANCES):
        exporter._reset()


os.register_at_fork(after_in_child=_reset_after_fork)

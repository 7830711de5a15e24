"""A small synchronous client of the collector's query API, for the CLI.

Standard library only (``urllib``), so ``predtrace trace`` starts fast. The
token is sent as a bearer header and never printed. An answer that asks the
client to come back (429, 502, 503, 504: overload, a restart) is retried with
jittered backoff, honouring Retry-After, for up to ``retry_for`` seconds.
"""

from __future__ import annotations

import http.client
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

from predtrace.collector._errors import CollectorError, ConfigError

PREDTRACE_COLLECTOR_URL: Final = "PREDTRACE_COLLECTOR_URL"
PREDTRACE_TOKEN: Final = "PREDTRACE_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_URL: Final = "http://127.0.0.1:8700"
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
_MAX_BACKOFF_S: Final = 8.0


class CollectorUnreachableError(CollectorError):
    """The collector could not be reached, or answered with a server error."""


class UnreadableAnswerError(CollectorError):
    """The collector's answer was larger than the client reads, or not JSON."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A decoded answer: HTTP status and the JSON body (or ``{"error": text}``)."""

    status: int
    body: Mapping[str, Any]  # parsed JSON
    json: bool = True  # False: the body was not a JSON object (``{"error": text}`` stands in)

    @property
    def error(self) -> str:
        """The error message of a non-2xx answer."""
        return str(self.body.get("error", f"HTTP {self.status}"))


def without_userinfo(url: str) -> str:
    """``url`` cut after its last ``@``: what may be shown of one that carries credentials.

    By hand, not ``urlsplit``: a password holding "/", "?" or "#" unencoded
    would end urlsplit's host part before its "@" and stay in the URL.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    return scheme + sep + rest.rpartition("@")[2] if "@" in rest else url


def path_part(text: str) -> str:
    """Quote one path segment (model names may hold slashes or spaces)."""
    return quote(text, safe="")


class QueryClient:
    """Talks to one collector: ``get`` and ``post`` JSON."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
        retry_for: float = 0.0,
        on_retry: Callable[[str, float], None] | None = None,
    ) -> None:
        shown = without_userinfo(url)
        if shown != url:
            # urllib would take "user:password@host" for a host name (a DNS
            # error quoting the password); the token is the credential.
            raise ConfigError(
                "the collector URL must not carry a user name or password"
                f" (user:password@host; without them: {shown!r}):"
                f" give a bearer token with --token or {PREDTRACE_TOKEN} instead"
            )
        try:
            parts = urlsplit(url)
            port_ok = parts.port is None or parts.port > 0  # reading .port validates it
        except ValueError:
            port_ok = False
        if (
            not port_ok
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or any(c.isspace() for c in url)
            or parts.query
            or parts.fragment
        ):
            raise ConfigError(f"collector URL must be http(s)://host[:port], got {url!r}")
        if not 0 <= retry_for <= 86400:  # also refuses NaN
            raise ConfigError(f"retry time must be 0 to 86400 seconds, got {retry_for}")
        # A token read from a mounted secret often ends in a newline; anything
        # else that cannot go in a header is refused without quoting the token.
        token = token.strip() if token else None
        if token and not all(" " < c < "\x7f" for c in token):
            raise ConfigError("the token holds spaces, control or non-ASCII characters")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.max_answer_bytes = max_answer_bytes
        self.retry_for, self.on_retry = retry_for, on_retry

    def __repr__(self) -> str:
        return f"QueryClient(url={self.url!r}, token={'<set>' if self.token else None})"

    def _request(self, method: str, path: str, body: object = None) -> Answer:
        """One call; a come-back-later answer is retried until ``retry_for`` runs out."""
        deadline = time.monotonic() + self.retry_for
        for attempt in range(1_000_000):
            try:
                return self._once(method, path, body)
            except _ComeBackError as exc:
                left = deadline - time.monotonic()
                ceiling = min(_MAX_BACKOFF_S, 0.25 * 2 ** min(attempt, 16))
                wait = max(exc.retry_after or 0.0, random.uniform(0.0, ceiling))  # noqa: S311 - jitter
                if wait > left:
                    raise CollectorUnreachableError(exc.message) from None
                if self.on_retry is not None:
                    self.on_retry(exc.message, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, method: str, path: str, body: object) -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - scheme checked in __init__
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with _OPENER.open(request, timeout=self.timeout) as response:
                return _answer(response.status, self._read(response))
        except urllib.error.HTTPError as exc:
            with exc:  # an error's text: what fits is enough
                answer = _answer(exc.code, exc.read(self.max_answer_bytes))
                retry_after = _retry_after(exc.headers.get("Retry-After"))
                location = exc.headers.get("Location")
            if 300 <= exc.code < 400:
                raise CollectorUnreachableError(
                    f"the collector answered {exc.code}, a redirect to {location or '?'}"
                    f" (not followed): is {self.url} the collector's base URL?"
                ) from None
            message = f"collector answered {exc.code}: {answer.error}"
            if exc.code in RETRY_STATUSES:
                raise _ComeBackError(message, retry_after) from None
            if exc.code >= 500:
                raise CollectorUnreachableError(message) from None
            return answer
        except (urllib.error.URLError, OSError, http.client.InvalidURL) as exc:
            reason = getattr(exc, "reason", exc)
            hint = ""
            if "WRONG_VERSION_NUMBER" in str(reason):  # TLS spoken to a plain HTTP server
                hint = " (is the collector serving plain HTTP? then use http://)"
            raise CollectorUnreachableError(
                f"cannot reach the collector at {self.url}: {reason}{hint}"
            ) from None
        except http.client.HTTPException as exc:  # e.g. IncompleteRead: the answer was cut short
            raise UnreadableAnswerError(
                f"the collector's answer could not be read: {type(exc).__name__}"
            ) from None

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        # One byte past the cap tells a cut answer from one that fits exactly.
        raw = response.read(self.max_answer_bytes + 1)
        if len(raw) > self.max_answer_bytes:
            raise UnreadableAnswerError(
                f"the collector's answer is larger than {self.max_answer_bytes} bytes"
            )
        return raw

    def get(self, path: str, query: Mapping[str, str] | None = None) -> Answer:
        """GET a JSON resource."""
        return self._request("GET", path + (f"?{urlencode(query)}" if query else ""))

    def post(self, path: str, body: object) -> Answer:
        """POST a JSON body."""
        return self._request("POST", path, body)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed, as the sidecar follows none.

    urllib would turn a POST into a GET to the new place (a command then
    reported success for nothing done) and send the bearer token along.
    Returning no request makes urllib raise the 3xx as an ``HTTPError``.
    """

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER: Final = urllib.request.build_opener(_NoRedirects)


class _ComeBackError(Exception):
    """An answer that asks for a later retry (429, 502, 503, 504)."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.message, self.retry_after = message, retry_after


def _retry_after(value: str | None) -> float | None:
    """A Retry-After header in seconds; None if absent or unreadable."""
    if not value:
        return None
    # Loaded only when a retry is due: the pipeline's parser brings aiohttp.
    from predtrace.sidecar.pipeline import parse_retry_after  # noqa: PLC0415

    return parse_retry_after(value)


def _answer(status: int, raw: bytes) -> Answer:
    ok = 200 <= status < 300
    try:
        body = json.loads(raw) if raw or ok else {}
    except (ValueError, RecursionError):
        if ok:  # an answer cut short or garbled: nothing to show
            raise UnreadableAnswerError(
                f"the collector answered {status} with a body that is not JSON"
            ) from None
        return Answer(status, {"error": raw[:300].decode("utf-8", "replace").strip()}, False)
    if not isinstance(body, dict):
        return Answer(status, {"value": body}, False)
    return Answer(status, body)

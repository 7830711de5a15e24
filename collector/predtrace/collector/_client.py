"""A small synchronous client of the collector's query API, for the CLI.

Standard library only (``urllib``), so ``predtrace trace`` starts fast. The
token is sent as a bearer header and never printed.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, urlencode, urlsplit

from predtrace.collector._errors import CollectorError, ConfigError

PREDTRACE_COLLECTOR_URL: Final = "PREDTRACE_COLLECTOR_URL"
PREDTRACE_TOKEN: Final = "PREDTRACE_TOKEN"  # noqa: S105 - the variable's name, not a secret
DEFAULT_URL: Final = "http://127.0.0.1:8700"
MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024


class CollectorUnreachableError(CollectorError):
    """The collector could not be reached, or answered with a server error."""


class UnreadableAnswerError(CollectorError):
    """The collector's answer was larger than the client reads, or not JSON."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A decoded answer: HTTP status and the JSON body (or ``{"error": text}``)."""

    status: int
    body: Mapping[str, Any]  # parsed JSON

    @property
    def error(self) -> str:
        """The error message of a non-2xx answer."""
        return str(self.body.get("error", f"HTTP {self.status}"))


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
    ) -> None:
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
        ):
            raise ConfigError(f"collector URL must be http(s)://host[:port], got {url!r}")
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.max_answer_bytes = max_answer_bytes

    def __repr__(self) -> str:
        return f"QueryClient(url={self.url!r}, token={'<set>' if self.token else None})"

    def _request(self, method: str, path: str, body: object = None) -> Answer:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)  # noqa: S310 - scheme checked in __init__
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 - see above
                return _answer(response.status, self._read(response))
        except urllib.error.HTTPError as exc:
            with exc:  # an error's text: what fits is enough
                answer = _answer(exc.code, exc.read(self.max_answer_bytes))
            if exc.code >= 500:
                raise CollectorUnreachableError(
                    f"collector answered {exc.code}: {answer.error}"
                ) from None
            return answer
        except (urllib.error.URLError, OSError, http.client.InvalidURL) as exc:
            reason = getattr(exc, "reason", exc)
            raise CollectorUnreachableError(
                f"cannot reach the collector at {self.url}: {reason}"
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


def _answer(status: int, raw: bytes) -> Answer:
    ok = 200 <= status < 300
    try:
        body = json.loads(raw) if raw or ok else {}
    except (ValueError, RecursionError):
        if ok:  # an answer cut short or garbled: nothing to show
            raise UnreadableAnswerError(
                f"the collector answered {status} with a body that is not JSON"
            ) from None
        body = {"error": raw[:300].decode("utf-8", "replace").strip()}
    if not isinstance(body, dict):
        body = {"value": body}
    return Answer(status, body)

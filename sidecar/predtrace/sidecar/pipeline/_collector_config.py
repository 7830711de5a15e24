"""Where the collector is and how to reach it: ``CollectorClientConfig``, checked at startup.

Read by the collector client (``_collector_client``) and the exporter in
front of it (``_collector_http``); the sidecar's configuration and status
show a collector URL through ``without_userinfo``. Every check that keeps a
credential safe (no token over plaintext HTTP to another host, no
``user:password@`` in the URL) fails here, at startup, not at the first send.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

_MAX_PORT = 65535
_MAX_TIMEOUT_S = 3600.0


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


def _check_ca_file(path: str) -> None:
    """Raise ValueError unless ``path`` is a PEM bundle TLS can trust.

    Loaded lazily, at the first delivery, a bad one failed every delivery
    for ever, reported as the spool's I/O failing.
    """
    if not os.path.isfile(path):
        raise ValueError(f"collector CA file {path!r} does not exist")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ValueError(
            f"collector CA file {path!r} is not a PEM certificate bundle ({reason})"
        ) from None


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
        if self.token is not None:
            # A token read from a mounted secret often ends in a newline: it
            # would fail every delivery (a header cannot hold one). Anything
            # else a header cannot hold is refused, without quoting the token.
            token = self.token.strip()
            if not all(" " < c < "\x7f" for c in token):
                raise ValueError("the token holds spaces, control or non-ASCII characters")
            object.__setattr__(self, "token", token or None)
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
        if self.ca_file is not None:
            _check_ca_file(self.ca_file)

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

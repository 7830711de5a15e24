"""The values a sidecar setting is written in, read and checked one at a time.

Used by the configs (``_config``, ``_config_stages``) and by the CLI at
startup: sizes (``512MiB``), addresses (``HOST:PORT``), gRPC targets,
producer ids, HTTP headers, OTLP/HTTP URLs and ``PREDTRACE_EDGE``'s boolean.
Each parser raises a ``ConfigError`` naming the flag; each ``*_problem``
says why a value cannot be used (None when it can), for its caller to name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Final
from urllib.parse import urlsplit

from predtrace.sidecar import environment_variables as ev
from predtrace.sidecar._errors import ConfigError

# A number, then nothing, ``b``, or a unit letter with ``b``, ``ib`` or nothing
# (``512k``, ``512KB``, ``512KiB``): every unit is binary, 1024-based.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
MAX_SIZE = 2**63 - 1  # no file or byte count the sidecar keeps is larger
MAX_PRODUCER_ID_LEN = 200  # room for a restart suffix under the collector's 256


def producer_id_problem(producer_id: str) -> str | None:
    """Why ``producer_id`` cannot name a producer (None when it can).

    One rule for ``--producer-id`` and for the id kept in the spool
    directory: 1 to 200 printable characters, no surrounding whitespace.
    """
    if not producer_id:
        return "it is empty"
    if len(producer_id) > MAX_PRODUCER_ID_LEN:
        return f"it is longer than {MAX_PRODUCER_ID_LEN} characters"
    if not producer_id.isprintable():
        return "it holds characters that are not printable"
    if producer_id != producer_id.strip():
        return "it starts or ends with whitespace"
    return None


def parse_size(text: str, what: str = "") -> int:
    """Parse ``512MiB``, ``2G``, ``1048576`` into bytes (``what``: the flag, for errors).

    Raises:
        ConfigError: not a size, or one past 2**63 - 1 bytes.
    """
    label = f"{what}: " if what else ""
    shown = repr(text) if len(text) <= 60 else f"{text[:40]!r}... ({len(text)} characters)"
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"{label}not a size: {shown} (examples: 512MiB, 2GiB, 1048576)")
    # Decimal, not float: exact for any digit string, never infinite.
    size = int(Decimal(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size > MAX_SIZE:
        raise ConfigError(f"{label}a size must be at most {MAX_SIZE} bytes, not {shown}")
    return size


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:port`` for IPv6); port 0 means any free port.

    Raises:
        ConfigError: not host:port (a URL included).
    """
    host, sep, port = text.rpartition(":")
    if "/" in text:
        raise ConfigError(f"{what} must be HOST:PORT, not a URL, got {text!r}")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


# gRPC's own name-resolver schemes (dns:///model:8001 balances over a headless
# Kubernetes service): a target written so is gRPC's to read.
_GRPC_SCHEMES: Final = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


def check_grpc_target(text: str, what: str) -> None:
    """A gRPC target to connect to: HOST:PORT with a port, or a gRPC resolver target.

    Raises:
        ConfigError: an http(s) URL (gRPC takes none), or not a target.
    """
    if text.startswith(_GRPC_SCHEMES):
        return
    if text.startswith(("http://", "https://")):
        raise ConfigError(
            f"{what} must be HOST:PORT (or a gRPC target such as dns:///HOST:PORT), "
            f"not an http URL, got {text!r}"
        )
    if parse_hostport(text, what)[1] == 0:
        raise ConfigError(f"{what} must name the port to connect to, got {text!r}")


def join_hostport(host: str, port: int) -> str:
    """``host:port``, ``[host]:port`` for an IPv6 address (what ``parse_hostport`` reads)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# RFC 9110 5.6.2: a field name is a token of these characters.
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL_RE: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # HTAB is allowed in a value


def header_problem(name: str, value: str) -> str | None:
    """Why ``name: value`` cannot be sent as an HTTP header (None when it can)."""
    if _TOKEN_RE.fullmatch(name) is None:
        return "a header name is a token: letters, digits and !#$%&'*+-.^_`|~, no spaces"
    if _CONTROL_RE.search(value):
        return "a header value must not hold control characters (CR, LF, NUL...)"
    return None


def otlp_export_problem(url: str) -> str | None:
    """Why ``url`` cannot be an OTLP/HTTP receiver's URL (None when it can)."""
    if not url.lower().startswith(("http://", "https://")):
        return "it must be an http(s):// URL of an OTLP/HTTP receiver"
    if any(c.isspace() or not c.isprintable() for c in url):
        return "a URL holds no spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # an unbalanced IPv6 bracket, a port past 65535 or not a number
        return f"it is not a usable URL ({exc})"
    if not parts.hostname:
        return "it names no host"
    if port == 0:
        return "it must name a port from 1 to 65535 (or none: 80, 443)"
    return None


# The words the middleware's boolean settings take (``PREDTRACE_ENABLED`` and the like).
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def edge_from_env(environ: Mapping[str, str]) -> bool:
    """Whether ``PREDTRACE_EDGE`` asks for edge mode (1/true/yes/on; 0/false/no/off or unset: not).

    Raises:
        ConfigError: any other value (a typo must not silently mean "not edge").
    """
    value = environ.get(ev.EDGE, "").strip().lower()
    if not value:
        return False
    if value in _TRUE or value in _FALSE:
        return value in _TRUE
    raise ConfigError(
        f"{ev.EDGE} must be true or false (1/true/yes/on, 0/false/no/off), "
        f"got {environ[ev.EDGE][:60]!r}"
    )

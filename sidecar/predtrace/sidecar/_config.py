"""What a user sets for the sidecar: flags, environment, and their validation.

Every setting is checked here at startup ("verify configuration at startup
and fail fast"); nothing after startup raises a config error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from predtrace.sidecar import environment_variables as ev
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar.pipeline import (
    DEPLOYMENT_FIELDS,
    CollectorClientConfig,
    DeploymentEnvError,
    RetryPolicy,
    deployment_from_env,
    identity_problem,
)
from predtrace.sidecar.pipeline._collector_http import without_userinfo
from predtrace.sidecar.spool import SpoolConfig

# A number, then nothing, ``b``, or a unit letter with ``b``, ``ib`` or nothing
# (``512k``, ``512KB``, ``512KiB``): every unit is binary, 1024-based.
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
MAX_SIZE = 2**63 - 1  # no file or byte count the sidecar keeps is larger
MAX_BATCH_EVENTS = 10_000  # the collector's decoder bound (proto/FORMAT.md)
MAX_PRODUCER_ID_LEN = 200  # room for a restart suffix under the collector's 256
MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC takes its message size limits as a C int


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


@dataclass(frozen=True, slots=True, kw_only=True)
class ShipperConfig:
    """How the shipper batches and retries.

    Example:
        >>> ShipperConfig(max_batch_events=5000, linger=0.2)
        >>> ShipperConfig.edge()   # long outages: capped backoff of 5 minutes
    """

    max_batch_events: int = 5000
    max_batch_bytes: int = 4 * 1024 * 1024
    linger: float = 0.2
    compress: bool = True
    compress_level: int = 1  # level 6 saves ~2 % of bytes for twice the CPU
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(initial_backoff=0.5, max_backoff=30.0)
    )
    poison_attempts: int = 5
    quarantine_max_bytes: int | None = None
    """Byte cap of ``quarantine/`` (oldest files removed past it); None: a tenth of the spool's."""

    def __post_init__(self) -> None:
        # Named by the flags of ``sidecar serve``, which set them.
        if not 1 <= self.max_batch_events <= MAX_BATCH_EVENTS:
            raise ConfigError(
                f"--batch-max-events must be between 1 and {MAX_BATCH_EVENTS}, "
                f"not {self.max_batch_events}"
            )
        if self.max_batch_bytes < 1024:
            raise ConfigError("max_batch_bytes must be at least 1 KiB")
        if not 0 <= self.linger <= 60:  # NaN fails too: it compares false
            raise ConfigError(f"--batch-linger must be between 0 and 60 seconds, not {self.linger}")
        if not 1 <= self.compress_level <= 9:
            raise ConfigError("compress_level must be in [1, 9]")
        if self.retry.max_attempts is not None:
            raise ConfigError("the shipper never gives up for elapsed time: max_attempts=None")
        if self.poison_attempts < 1:
            raise ConfigError(f"--poison-attempts must be at least 1, not {self.poison_attempts}")
        if self.quarantine_max_bytes is not None and self.quarantine_max_bytes < 0:
            raise ConfigError("--quarantine-max-bytes must be >= 0")

    @classmethod
    def edge(cls, **overrides: Any) -> ShipperConfig:
        """Settings for devices offline for days: bigger batches, backoff capped at 5 min."""
        values: dict[str, Any] = {
            "max_batch_events": MAX_BATCH_EVENTS,
            "linger": 1.0,
            "retry": RetryPolicy(initial_backoff=1.0, max_backoff=300.0),
        }
        values.update(overrides)
        return cls(**values)


def _globs(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _check_patterns(patterns: tuple[str, ...], what: str) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{what}: bad redaction pattern {pattern!r}: {exc}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class RedactionConfig:
    """What may leave the model server's machine; runs before the spool.

    Privacy by default: with the empty allow-lists no feature and no
    attribute is kept. Names are shell-style globs (``*`` keeps all);
    ``patterns`` are regular expressions whose matches in the kept
    attribute values and output labels are replaced by ``[redacted]``.
    """

    allow_features: tuple[str, ...] = ()
    allow_attributes: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_patterns(self.patterns, "--redact")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RedactionConfig:
        """Read ``PREDTRACE_ALLOW_FEATURES``/``_ATTRIBUTES`` (comma globs), ``PREDTRACE_REDACT``.

        Raises:
            ConfigError: a pattern of ``PREDTRACE_REDACT`` is no regular expression (named).
        """
        patterns = tuple(p for p in environ.get(ev.REDACT, "").split("\n") if p)
        _check_patterns(patterns, f"--redact ({ev.REDACT})")
        return cls(
            allow_features=_globs(environ.get(ev.ALLOW_FEATURES, "")),
            allow_attributes=_globs(environ.get(ev.ALLOW_ATTRIBUTES, "")),
            patterns=patterns,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentConfig:
    """Who serves: stamped on events (empty fields only) and on forwarded spans' resources."""

    id: str = ""
    service: str = ""
    namespace: str = ""
    pod: str = ""
    node: str = ""
    image_digest: str = ""
    image_name: str = ""

    def __post_init__(self) -> None:
        for name in DEPLOYMENT_FIELDS:
            problem = identity_problem(getattr(self, name))
            if problem is not None:
                raise ConfigError(f"the deployment's {name} cannot be stamped on events: {problem}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DeploymentConfig:
        """Read the Kubernetes downward-API variables, ``OTEL_*`` and ``PREDTRACE_*``.

        The chain the middleware reads too (``predtrace.sidecar.pipeline.deployment_from_env``).

        Raises:
            ConfigError: a value no event could carry (over 64 KiB, a NUL), named
                by its variable: at startup, not on every event after it.
        """
        try:
            return cls(**deployment_from_env(environ))
        except DeploymentEnvError as exc:
            raise ConfigError(str(exc)) from None


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


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarConfig:
    """Everything ``predtrace sidecar serve`` runs with.

    Example:
        >>> SidecarConfig.from_env(os.environ, collector_url="http://127.0.0.1:8080",
        ...                        spool=SpoolConfig(directory="/var/lib/predtrace"))
    """

    collector: CollectorClientConfig
    spool: SpoolConfig
    listen: str = "127.0.0.1:4555"
    producer_id: str = ""
    edge: bool = False
    shipper: ShipperConfig = field(default_factory=ShipperConfig)
    ready_file: str | None = None
    otlp_listen: str | None = None
    otlp_http_listen: str | None = None
    otlp_export: str | None = None
    otlp_export_headers: tuple[tuple[str, str], ...] = ()
    oip_proxies: tuple[tuple[str, str], ...] = ()
    metrics_listen: str | None = None
    max_message_bytes: int = 4 * 1024 * 1024
    max_events_per_request: int = 10_000
    drain_timeout: float = 10.0
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    redaction: RedactionConfig = field(default_factory=RedactionConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    from_environment: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    """(field, variable) of the settings read from the environment: errors name both."""

    def _what(self, name: str, flag: str) -> str:
        """``flag``, with the variable it came from when the environment set it."""
        for field_name, variable in self.from_environment:
            if field_name == name:
                return f"{flag} ({variable})"
        return flag

    def __post_init__(self) -> None:
        what = self._what
        parse_hostport(self.listen, what("listen", "--listen"))
        cert, key = what("tls_cert", "--tls-cert"), what("tls_key", "--tls-key")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(f"TLS needs both {cert} and {key}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                f"{what('tls_client_ca', '--tls-client-ca')} (mTLS) needs {cert} and {key}"
            )
        for value, name, flag in (
            (self.otlp_listen, "otlp_listen", "--otlp-listen"),
            (self.otlp_http_listen, "otlp_http_listen", "--otlp-http-listen"),
            (self.metrics_listen, "metrics_listen", "--metrics-listen"),
        ):
            if value is not None:
                parse_hostport(value, what(name, flag))
        for listen, upstream in self.oip_proxies:
            parse_hostport(listen, "--oip-proxy LISTEN")
            check_grpc_target(upstream, "--oip-proxy UPSTREAM")
        self._check_otlp()
        if not 64 * 1024 <= self.max_message_bytes <= MAX_MESSAGE_BYTES:
            raise ConfigError(
                f"--max-message-bytes must be between 64 KiB and {MAX_MESSAGE_BYTES} bytes "
                f"(2 GiB - 1), not {self.max_message_bytes}"
            )
        if self.max_events_per_request < 1:
            raise ConfigError("max_events_per_request must be >= 1")
        if not 0 <= self.drain_timeout <= 86_400:  # NaN fails too: it compares false
            raise ConfigError(
                f"--drain-timeout must be between 0 and 86400 seconds, not {self.drain_timeout}"
            )
        for seconds, flag in (
            (self.keepalive_time, "--keepalive-time"),
            (self.keepalive_timeout, "--keepalive-timeout"),
        ):
            # A finite, sane range: gRPC takes milliseconds as a C int.
            if not 0.1 <= seconds <= 86_400:
                raise ConfigError(f"{flag} must be between 0.1 and 86400 seconds, not {seconds}")
        problem = producer_id_problem(self.producer_id) if self.producer_id else None
        if problem is not None:
            raise ConfigError(
                f"{what('producer_id', '--producer-id')} {self.producer_id[:60]!r} "
                f"is not usable: {problem}"
            )

    def _check_otlp(self) -> None:
        """The OTLP settings: a usable export URL and headers, and what each needs.

        Raises:
            ConfigError: at startup, rather than every span dropped after it.
        """
        what = self._what
        export = what("otlp_export", "--otlp-export")
        if self.otlp_export is not None:
            problem = otlp_export_problem(self.otlp_export)
            if problem is not None:
                shown = without_userinfo(self.otlp_export)[:200]
                raise ConfigError(f"{export} {shown!r} cannot be used: {problem}")
        for name, value in self.otlp_export_headers:
            problem = header_problem(name, value)
            if problem is not None:  # the value is never shown: it may be a credential
                raise ConfigError(f"--otlp-export-header {name[:60]!r} cannot be sent: {problem}")
        if self.otlp_export_headers and self.otlp_export is None:
            raise ConfigError(
                f"--otlp-export-header needs --otlp-export (or {ev.OTLP_EXPORT}): "
                "the headers go with the forwarded spans"
            )
        listen = f"--otlp-listen (or {ev.OTLP_LISTEN})"
        if self.otlp_listen is None:
            if self.otlp_http_listen is not None:
                raise ConfigError(
                    f"--otlp-http-listen needs {listen}: the OTLP/HTTP receiver runs "
                    "next to the OTLP/gRPC one"
                )
            if self.otlp_export is not None:
                raise ConfigError(
                    f"{export} needs {listen}: it forwards the spans the OTLP receiver takes"
                )
            return
        if self.otlp_http_listen is None:
            otlp = what("otlp_listen", "--otlp-listen")
            if parse_hostport(self.otlp_listen, otlp)[1] == 65535:
                raise ConfigError(
                    f"{otlp} {self.otlp_listen!r}: OTLP/HTTP listens on the next port "
                    "unless --otlp-http-listen is given, and 65536 is no port: give "
                    "--otlp-http-listen HOST:PORT (port 0 for --otlp-listen picks free "
                    "ports for both)"
                )

    def tls_files(self) -> tuple[bytes, bytes, bytes | None] | None:
        """(certificate chain, key, client CA or None) read from disk, or None for plaintext.

        Raises:
            ConfigError: a file cannot be read (named).
        """
        if self.tls_cert is None or self.tls_key is None:
            return None

        def read(path: str, what: str) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None

        client_ca = read(self.tls_client_ca, "client CA") if self.tls_client_ca else None
        return read(self.tls_cert, "certificate"), read(self.tls_key, "key"), client_ca

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> SidecarConfig:
        """Settings from ``PREDTRACE_*`` variables; ``overrides`` (flags) win.

        ``collector_url``, ``token``, ``spool_dir`` and ``spool_max_bytes`` may
        be given as overrides; they build ``collector`` and ``spool``. An error
        about a value from the environment names its flag and its variable.

        Raises:
            ConfigError: a missing or invalid setting, named.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        collector = _collector_config(environ, given)
        spool_dir = given.pop("spool_dir", None) or environ.get(ev.SPOOL_DIR)
        if not spool_dir:
            raise ConfigError(f"the spool directory is required: --spool or {ev.SPOOL_DIR}")
        max_bytes = given.pop("spool_max_bytes", None)
        max_bytes_what = "--spool-max-bytes"
        if not max_bytes and environ.get(ev.SPOOL_MAX_BYTES):
            max_bytes = environ[ev.SPOOL_MAX_BYTES]
            max_bytes_what = f"--spool-max-bytes ({ev.SPOOL_MAX_BYTES})"
        segment_bytes = given.pop("spool_segment_bytes", None)
        spool = _spool_config(spool_dir, (max_bytes, max_bytes_what), segment_bytes)
        flag = given.pop("edge", None)  # --edge/--no-edge win over PREDTRACE_EDGE
        edge = bool(flag) if flag is not None else edge_from_env(environ)
        values: dict[str, Any] = {
            "edge": edge,
            "shipper": ShipperConfig.edge() if edge else ShipperConfig(),
        }
        read: list[tuple[str, str]] = []
        for name, variable, default in (
            ("listen", ev.LISTEN, "127.0.0.1:4555"),
            ("producer_id", ev.PRODUCER_ID, ""),
            ("otlp_listen", ev.OTLP_LISTEN, None),
            ("otlp_export", ev.OTLP_EXPORT, None),
            ("metrics_listen", ev.METRICS_LISTEN, None),
            ("tls_cert", ev.TLS_CERT, None),
            ("tls_key", ev.TLS_KEY, None),
            ("tls_client_ca", ev.TLS_CLIENT_CA, None),
        ):
            if name in given:
                continue
            if environ.get(variable):
                values[name] = environ[variable]
                read.append((name, variable))
            elif default is not None:
                values[name] = default
        # Read only when no flag replaces them: a flag wins over a bad variable.
        if "redaction" not in given:
            values["redaction"] = RedactionConfig.from_env(environ)
        if "deployment" not in given:
            values["deployment"] = DeploymentConfig.from_env(environ)
        values.update(given)
        return cls(collector=collector, spool=spool, from_environment=tuple(read), **values)


def _collector_config(environ: Mapping[str, str], given: dict[str, Any]) -> CollectorClientConfig:
    """The collector client's config from flags (popped from ``given``) over the environment.

    Raises:
        ConfigError: no URL, or a setting the client refuses, named by flag (and variable).
    """
    url, from_env = given.pop("collector_url", None), set()
    if not url and environ.get(ev.COLLECTOR_URL):
        url = environ[ev.COLLECTOR_URL]
        from_env.add("--collector")
    if not url:
        raise ConfigError(f"the collector URL is required: --collector or {ev.COLLECTOR_URL}")
    token = given.pop("token", None) or environ.get(ev.TOKEN) or None
    seconds = given.pop("collector_timeout", None)
    timeout = 10.0 if seconds is None else float(seconds)
    collector_ca = given.pop("collector_ca", None)
    if not collector_ca and environ.get(ev.COLLECTOR_CA):
        collector_ca = environ[ev.COLLECTOR_CA]
        from_env.add("--collector-ca")
    try:
        return CollectorClientConfig(url=url, token=token, timeout=timeout, ca_file=collector_ca)
    except ValueError as exc:
        flag = _collector_flag(str(exc))
        variable = {"--collector": ev.COLLECTOR_URL, "--collector-ca": ev.COLLECTOR_CA}.get(flag)
        if flag in from_env:
            flag = f"{flag} ({variable})"
        raise ConfigError(f"{flag}: {exc}") from None


def _spool_config(
    directory: str, max_bytes: tuple[object, str], segment_bytes: object
) -> SpoolConfig:
    """The spool's config, a size that cannot work named by its flag.

    ``max_bytes``: the cap as given (None: the default) and what to call it.

    Raises:
        ConfigError: not a size, or a cap below two segments.
    """
    defaults = SpoolConfig(directory=directory)
    cap_text, cap_what = max_bytes
    segment = (
        parse_size(str(segment_bytes), "--spool-segment-bytes")
        if segment_bytes
        else defaults.segment_bytes
    )
    cap = parse_size(str(cap_text), cap_what) if cap_text else defaults.max_bytes
    if segment < 4096:
        raise ConfigError(f"--spool-segment-bytes must be at least 4 KiB, not {segment}")
    if cap < 2 * segment:
        raise ConfigError(
            f"--spool-max-bytes ({ev.SPOOL_MAX_BYTES}) must be at least two spool segments "
            f"({2 * segment} bytes with --spool-segment-bytes {segment}), not {cap}"
        )
    return SpoolConfig(directory=directory, max_bytes=cap, segment_bytes=segment)


def _collector_flag(problem: str) -> str:
    """The flag a ``CollectorClientConfig`` complaint is about."""
    if problem.startswith("collector timeout"):
        return "--collector-timeout"
    if "CA file" in problem:
        return "--collector-ca"
    return "--collector"


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

"""What a user sets for the sidecar: flags, environment, and their validation.

Every setting is checked here at startup ("verify configuration at startup
and fail fast"); nothing after startup raises a config error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from predtrace.sidecar import environment_variables as ev
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar.pipeline import CollectorClientConfig, RetryPolicy
from predtrace.sidecar.spool import SpoolConfig

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
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


def parse_size(text: str) -> int:
    """Parse ``512MiB``, ``2G``, ``1048576`` into bytes.

    Raises:
        ConfigError: not a size.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"not a size: {text!r} (examples: 512MiB, 2GiB, 1048576)")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


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
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"bad redaction pattern {pattern!r}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> RedactionConfig:
        """Read ``PREDTRACE_ALLOW_FEATURES``/``_ATTRIBUTES`` (comma globs), ``PREDTRACE_REDACT``."""
        return cls(
            allow_features=_globs(environ.get(ev.ALLOW_FEATURES, "")),
            allow_attributes=_globs(environ.get(ev.ALLOW_ATTRIBUTES, "")),
            patterns=tuple(p for p in environ.get(ev.REDACT, "").split("\n") if p),
        )


def _first(environ: Mapping[str, str], *names: str) -> str:
    for name in names:
        if environ.get(name):
            return environ[name]
    return ""


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

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DeploymentConfig:
        """Read the Kubernetes downward-API variables, ``OTEL_*`` and ``PREDTRACE_*``."""
        resource = _resource_attributes(environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
        return cls(
            id=_first(environ, ev.DEPLOYMENT_ID),
            service=_first(environ, ev.SERVICE_NAME, "OTEL_SERVICE_NAME")
            or resource.get("service.name", ""),
            namespace=_first(environ, *ev.K8S_NAMESPACE) or resource.get("k8s.namespace.name", ""),
            pod=_first(environ, *ev.K8S_POD) or resource.get("k8s.pod.name", ""),
            node=_first(environ, *ev.K8S_NODE) or resource.get("k8s.node.name", ""),
            image_digest=_first(environ, ev.IMAGE_DIGEST),
            image_name=_first(environ, ev.IMAGE_NAME) or resource.get("container.image.name", ""),
        )


def _resource_attributes(text: str) -> dict[str, str]:
    """``OTEL_RESOURCE_ATTRIBUTES`` as the OTel SDK reads it: values are percent-decoded."""
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[key.strip()] = unquote(value.strip())
    return out


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

    def __post_init__(self) -> None:
        parse_hostport(self.listen, "--listen")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for value, what in (
            (self.otlp_listen, "--otlp-listen"),
            (self.otlp_http_listen, "--otlp-http-listen"),
            (self.metrics_listen, "--metrics-listen"),
        ):
            if value is not None:
                parse_hostport(value, what)
        for listen, upstream in self.oip_proxies:
            parse_hostport(listen, "--oip-proxy LISTEN")
            check_grpc_target(upstream, "--oip-proxy UPSTREAM")
        if self.otlp_export is not None and not self.otlp_export.startswith(
            ("http://", "https://")
        ):
            raise ConfigError("--otlp-export must be an http(s):// URL of an OTLP/HTTP receiver")
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
        for seconds, what in (
            (self.keepalive_time, "--keepalive-time"),
            (self.keepalive_timeout, "--keepalive-timeout"),
        ):
            # A finite, sane range: gRPC takes milliseconds as a C int.
            if not 0.1 <= seconds <= 86_400:
                raise ConfigError(f"{what} must be between 0.1 and 86400 seconds, not {seconds}")
        problem = producer_id_problem(self.producer_id) if self.producer_id else None
        if problem is not None:
            raise ConfigError(f"--producer-id {self.producer_id[:60]!r} is not usable: {problem}")

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
        be given as overrides; they build ``collector`` and ``spool``.

        Raises:
            ConfigError: a missing or invalid setting, named.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        url = given.pop("collector_url", None) or environ.get(ev.COLLECTOR_URL)
        spool_dir = given.pop("spool_dir", None) or environ.get(ev.SPOOL_DIR)
        if not url:
            raise ConfigError(f"the collector URL is required: --collector or {ev.COLLECTOR_URL}")
        if not spool_dir:
            raise ConfigError(f"the spool directory is required: --spool or {ev.SPOOL_DIR}")
        token = given.pop("token", None) or environ.get(ev.TOKEN) or None
        seconds = given.pop("collector_timeout", None)
        timeout = 10.0 if seconds is None else float(seconds)
        collector_ca = given.pop("collector_ca", None) or environ.get(ev.COLLECTOR_CA) or None
        max_bytes = given.pop("spool_max_bytes", None) or environ.get(ev.SPOOL_MAX_BYTES)
        try:
            collector = CollectorClientConfig(
                url=url, token=token, timeout=timeout, ca_file=collector_ca
            )
        except ValueError as exc:
            raise ConfigError(f"{_collector_flag(str(exc))}: {exc}") from None
        spool = _spool_config(spool_dir, max_bytes, given.pop("spool_segment_bytes", None))
        flag = given.pop("edge", None)  # --edge/--no-edge win over PREDTRACE_EDGE
        edge = bool(flag) if flag is not None else edge_from_env(environ)
        values: dict[str, Any] = {
            "listen": environ.get(ev.LISTEN, "127.0.0.1:4555"),
            "producer_id": environ.get(ev.PRODUCER_ID, ""),
            "otlp_listen": environ.get(ev.OTLP_LISTEN) or None,
            "otlp_export": environ.get(ev.OTLP_EXPORT) or None,
            "metrics_listen": environ.get(ev.METRICS_LISTEN) or None,
            "tls_cert": environ.get(ev.TLS_CERT) or None,
            "tls_key": environ.get(ev.TLS_KEY) or None,
            "tls_client_ca": environ.get(ev.TLS_CLIENT_CA) or None,
            "edge": edge,
            "shipper": ShipperConfig.edge() if edge else ShipperConfig(),
            "redaction": RedactionConfig.from_env(environ),
            "deployment": DeploymentConfig.from_env(environ),
        }
        values.update(given)
        return cls(collector=collector, spool=spool, **values)


def _spool_config(directory: str, max_bytes: object, segment_bytes: object) -> SpoolConfig:
    """The spool's config, a size that cannot work named by its flag.

    Raises:
        ConfigError: not a size, or a cap below two segments.
    """
    defaults = SpoolConfig(directory=directory)
    segment = parse_size(str(segment_bytes)) if segment_bytes else defaults.segment_bytes
    cap = parse_size(str(max_bytes)) if max_bytes else defaults.max_bytes
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


def edge_from_env(environ: Mapping[str, str]) -> bool:
    """Whether ``PREDTRACE_EDGE`` asks for edge mode (1, true or yes)."""
    return environ.get(ev.EDGE, "").strip().lower() in ("1", "true", "yes")

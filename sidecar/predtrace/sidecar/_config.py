"""What a user sets for the sidecar: flags, environment, and their validation.

Every setting is checked at startup ("verify configuration at startup and
fail fast"); nothing after startup raises a config error. This module holds
``SidecarConfig``, all that ``sidecar serve`` runs with, and its reading of
flags over ``PREDTRACE_*`` variables; the configs of single stages are in
``_config_stages``, the parsers of single values in ``_config_values``, and
every public name of theirs is imported from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from predtrace.sidecar import environment_variables as ev
from predtrace.sidecar._config_stages import (
    MAX_BATCH_EVENTS,
    DeploymentConfig,
    RedactionConfig,
    ShipperConfig,
)
from predtrace.sidecar._config_values import (
    MAX_PRODUCER_ID_LEN,
    MAX_SIZE,
    check_grpc_target,
    edge_from_env,
    header_problem,
    join_hostport,
    otlp_export_problem,
    parse_hostport,
    parse_size,
    producer_id_problem,
)
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar.pipeline import CollectorClientConfig
from predtrace.sidecar.pipeline._collector_http import without_userinfo
from predtrace.sidecar.spool import SpoolConfig

# Imported from here, wherever they are defined.
__all__ = [
    "MAX_BATCH_EVENTS",
    "MAX_MESSAGE_BYTES",
    "MAX_PRODUCER_ID_LEN",
    "MAX_SIZE",
    "DeploymentConfig",
    "RedactionConfig",
    "ShipperConfig",
    "SidecarConfig",
    "check_grpc_target",
    "edge_from_env",
    "header_problem",
    "join_hostport",
    "otlp_export_problem",
    "parse_hostport",
    "parse_size",
    "producer_id_problem",
]

MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC takes its message size limits as a C int


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
    token = given.pop("token", None)
    if not token and environ.get(ev.TOKEN):
        token = environ[ev.TOKEN]
        from_env.add("--token")
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
        variable = {
            "--collector": ev.COLLECTOR_URL,
            "--collector-ca": ev.COLLECTOR_CA,
            "--token": ev.TOKEN,
        }.get(flag)
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
    if problem.startswith("the token"):
        return "--token"
    return "--collector"

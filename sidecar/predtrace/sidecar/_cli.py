"""``predtrace sidecar serve`` and ``predtrace sidecar status``.

``serve`` runs the sidecar process until SIGTERM/SIGINT, then drains within
``--drain-timeout`` (and exits 1 at once if the shipper stops on an error,
so that a supervisor restarts it); ``status`` asks a running sidecar for its spool depth,
oldest unsent event, last success and lag. Exit codes: 0 ok, 1 the sidecar
could not start (or could not be reached), 2 usage error.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click
import grpc

from predtrace.sidecar import environment_variables as ev
from predtrace.sidecar._config import (
    RedactionConfig,
    ShipperConfig,
    SidecarConfig,
    edge_from_env,
    join_hostport,
    parse_hostport,
    parse_size,
)
from predtrace.sidecar._errors import ConfigError, SidecarError
from predtrace.sidecar.spool import FaultPoints

_log = logging.getLogger("predtrace.sidecar")
DEFAULT_TARGET = "127.0.0.1:4555"
TARGET_ENV = "PREDTRACE_SIDECAR_TARGET"


@click.group(name="sidecar")
def sidecar() -> None:
    """Run the sidecar next to a model server, or ask a running one for its status."""


def _pairs(
    values: tuple[str, ...], sep: str, what: str, *, secret: bool = False
) -> tuple[tuple[str, str], ...]:
    """``LEFT<sep>RIGHT`` values split; ``secret``: never echo a value (a header's credential)."""
    out = []
    for value in values:
        left, found, right = value.partition(sep)
        if not found or not left.strip() or not right.strip():
            got = "a value not shown (it may hold a credential)" if secret else repr(value)
            raise click.BadParameter(f"expected {what}, got {got}")
        out.append((left.strip(), right.strip()))
    return tuple(out)


def _size_or_none(text: str | None, what: str) -> int | None:
    return None if text is None else parse_size(text, what)


def build_config(options: dict[str, Any], environ: dict[str, str]) -> SidecarConfig:
    """The sidecar config from ``serve``'s options over the environment.

    Raises:
        ConfigError: a missing or invalid setting.
        click.BadParameter: a malformed option value.
    """
    edge = options.pop("edge")
    shipper_overrides: dict[str, Any] = {
        key: value
        for key, value in (
            ("poison_attempts", options.pop("poison_attempts")),
            ("max_batch_events", options.pop("batch_max_events")),
            ("linger", options.pop("batch_linger")),
            (
                "quarantine_max_bytes",
                _size_or_none(options.pop("quarantine_max_bytes", None), "--quarantine-max-bytes"),
            ),
        )
        if value is not None
    }
    redaction = None
    allow_f, allow_a, redact = (
        options.pop(k) for k in ("allow_feature", "allow_attribute", "redact")
    )
    if allow_f or allow_a or redact:
        # The variables the flags leave in force (a --redact flag replaces PREDTRACE_REDACT).
        base = RedactionConfig.from_env(
            {k: v for k, v in environ.items() if not (redact and k == ev.REDACT)}
        )
        redaction = RedactionConfig(
            allow_features=allow_f or base.allow_features,
            allow_attributes=allow_a or base.allow_attributes,
            patterns=redact or base.patterns,
        )
    size = options.pop("max_message_bytes")
    overrides = dict(options)
    overrides.update(
        edge=edge,
        redaction=redaction,
        max_message_bytes=parse_size(size, "--max-message-bytes") if size else None,
        otlp_export_headers=_pairs(
            options["otlp_export_headers"], "=", "--otlp-export-header NAME=VALUE", secret=True
        )
        or None,
        oip_proxies=_pairs(options["oip_proxies"], "=", "--oip-proxy LISTEN=UPSTREAM") or None,
    )
    if shipper_overrides or edge is not None:
        on_edge = edge if edge is not None else edge_from_env(environ)
        make = ShipperConfig.edge if on_edge else ShipperConfig
        overrides["shipper"] = make(**shipper_overrides)
    return SidecarConfig.from_env(environ, **overrides)


@sidecar.command()
@click.option(
    "--listen",
    help="HOST:PORT of the gRPC API [PREDTRACE_SIDECAR_LISTEN, else 127.0.0.1:4555]; "
    "port 0 picks one.",
)
@click.option("--collector", "collector_url", help="Collector URL [PREDTRACE_COLLECTOR_URL].")
@click.option("--spool", "spool_dir", help="Spool directory [PREDTRACE_SPOOL_DIR].")
@click.option(
    "--ready-file",
    help="Written once ready: 'host:port' ('[host]:port' for IPv6), then 'name host:port' lines.",
)
@click.option("--token", help="Collector bearer token [PREDTRACE_TOKEN]; never logged.")
@click.option("--collector-timeout", type=float, help="Seconds per delivery attempt [10].")
@click.option(
    "--producer-id",
    help="Stable producer id [PREDTRACE_PRODUCER_ID, else one kept in the spool directory].",
)
@click.option(
    "--edge/--no-edge",
    default=None,
    help="Edge mode: long outages, bigger batches, backoff capped at 5 min "
    "[PREDTRACE_EDGE: 1/true/yes/on or 0/false/no/off].",
)
@click.option(
    "--spool-max-bytes",
    help="Spool byte cap, e.g. 2GiB; oldest dropped past it "
    "[PREDTRACE_SPOOL_MAX_BYTES, else 1GiB].",
)
@click.option("--spool-segment-bytes", help="Spool segment size [8MiB]; small flash: 1MiB.")
@click.option("--otlp-listen", help="HOST:PORT of the OTLP/gRPC receiver [PREDTRACE_OTLP_LISTEN].")
@click.option(
    "--otlp-http-listen",
    help="HOST:PORT of OTLP/HTTP; needs --otlp-listen [--otlp-listen's port + 1; 0 with port 0].",
)
@click.option(
    "--otlp-export",
    help="OTLP/HTTP traces URL every span the OTLP receiver takes is forwarded to; "
    "needs --otlp-listen [PREDTRACE_OTLP_EXPORT].",
)
@click.option(
    "--otlp-export-header",
    "otlp_export_headers",
    multiple=True,
    help="NAME=VALUE header sent to --otlp-export (repeatable; NAME an HTTP token).",
)
@click.option(
    "--oip-proxy",
    "oip_proxies",
    multiple=True,
    help="LISTEN=UPSTREAM: proxy OIP v2 gRPC to a model server (repeatable).",
)
@click.option(
    "--metrics-listen", help="HOST:PORT for Prometheus /metrics [PREDTRACE_METRICS_LISTEN]."
)
@click.option(
    "--max-message-bytes",
    help="Largest gRPC message (API, OTLP/gRPC, OIP proxy) and OTLP/HTTP body accepted [4MiB].",
)
@click.option("--drain-timeout", type=float, help="Seconds to ship after SIGTERM [10].")
@click.option(
    "--keepalive-time",
    type=float,
    help="Seconds between the server's pings on a connection with calls in flight [60].",
)
@click.option(
    "--keepalive-timeout",
    type=float,
    help="Seconds a client has to answer a ping before its connection is closed [20].",
)
@click.option("--poison-attempts", type=int, help="Failures before a batch is quarantined [5].")
@click.option(
    "--quarantine-max-bytes",
    help="Byte cap of the spool's quarantine/ directory; oldest batches removed past it "
    "[a tenth of --spool-max-bytes].",
)
@click.option(
    "--batch-max-events",
    type=int,
    help="Events per batch to the collector [5000; 10000 with --edge].",
)
@click.option(
    "--batch-linger",
    type=float,
    help="Seconds to wait for a fuller batch [0.2; 1 with --edge].",
)
@click.option(
    "--allow-feature",
    multiple=True,
    help="Feature name glob that may leave (repeatable) [PREDTRACE_ALLOW_FEATURES, "
    "comma-separated; else none: a feature the middleware sends is removed here "
    "unless allowed].",
)
@click.option(
    "--allow-attribute",
    multiple=True,
    help="Attribute key glob that may leave (repeatable) [PREDTRACE_ALLOW_ATTRIBUTES, "
    "comma-separated; else none].",
)
@click.option(
    "--redact",
    multiple=True,
    help="Regex masked in kept attribute values and output labels (repeatable) "
    "[PREDTRACE_REDACT, one per line].",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM certificate chain: TLS on the gRPC, OTLP and OIP proxy listeners "
    "[PREDTRACE_SIDECAR_TLS_CERT].",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM private key of --tls-cert [PREDTRACE_SIDECAR_TLS_KEY].",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM CA that signs client certificates: mTLS [PREDTRACE_SIDECAR_TLS_CLIENT_CA].",
)
@click.option(
    "--collector-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM CA of an https collector's certificate [PREDTRACE_COLLECTOR_CA; else system].",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning"]),
    help="Least severe log records written to stderr.",
)
def serve(log_level: str, **options: Any) -> None:
    """Run the sidecar: gRPC API, durable spool, shipper, optional OTLP and OIP proxy.

    Runs until SIGTERM or SIGINT, then ships for up to --drain-timeout and
    exits; what is left stays spooled for the next start. Exit codes: 0
    stopped cleanly, 1 could not start (the reason on stderr), 2 usage error.
    """
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = build_config(options, dict(os.environ))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        asyncio.run(_serve(config, FaultPoints.from_env(os.environ)))
    except (SidecarError, OSError) as exc:
        click.echo(f"predtrace sidecar: {exc}", err=True)
        sys.exit(1)


async def _serve(config: SidecarConfig, faults: FaultPoints) -> None:
    from predtrace.cli._serving import (  # noqa: PLC0415
        AcceptErrorLog,
        raise_fd_limit,
        tune_gc,
    )
    from predtrace.sidecar._app import SidecarApp  # noqa: PLC0415 - servers load only when serving

    app = SidecarApp(config, faults=faults)
    stop = asyncio.Event()
    raise_fd_limit()  # each OTLP/HTTP, metrics or gRPC connection holds a descriptor
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(AcceptErrorLog(loop.get_exception_handler()))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await app.start()
        tune_gc()
        _log.info("sidecar %s ready: %s", app.producer_id, app.addresses)
        await _until_stopped_or_failed(stop, app.failed)
        if app.failure is None:
            _log.info("stopping: draining for up to %.1f s", config.drain_timeout)
    finally:
        await app.stop()
    if app.failure is not None:
        # Never keep acknowledging events nobody delivers: exit, to be restarted.
        raise SidecarError(
            f"the shipper stopped on an error ({type(app.failure).__name__}: {app.failure}); "
            "exiting so that the sidecar is restarted (spooled events ship on the next start)"
        )


async def _until_stopped_or_failed(stop: asyncio.Event, failed: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(failed.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


@sidecar.command()
@click.option(
    "--target",
    help=f"HOST:PORT of the sidecar [{TARGET_ENV}, else {DEFAULT_TARGET}]; not with --ready-file.",
)
@click.option(
    "--ready-file", help="Read the target from the sidecar's ready file; not with --target."
)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option(
    "--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the answer."
)
@click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM CA of a TLS sidecar's certificate (enables TLS).",
)
@click.option(
    "--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM client cert (mTLS)."
)
@click.option(
    "--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM key of --tls-cert."
)
def status(
    *,
    target: str | None,
    ready_file: str | None,
    output: str,
    timeout: float,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Show spool depth, oldest unsent event, last success and lag of a running sidecar."""
    from predtrace.sidecar._status import status_to_dict  # noqa: PLC0415 - lazy CLI
    from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc  # noqa: PLC0415 - lazy CLI

    if not 0 < timeout <= 3600:  # NaN fails too: it compares false
        raise click.UsageError(
            f"--timeout must be more than 0 and at most 3600 seconds, not {timeout:g}"
        )
    target = _status_target(target, ready_file)
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    if tls_ca or tls_cert:
        pem = _status_pem(tls_ca, tls_cert, tls_key)
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(*pem))
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)  # type: ignore[no-untyped-call]  # generated stub
        try:
            answer = stub.Status(sidecar_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
            if code == "UNIMPLEMENTED":
                click.echo(f"{target} answers gRPC but is not a predtrace sidecar", err=True)
            else:
                tls = "" if tls_ca else "; a sidecar serving TLS needs --tls-ca"
                click.echo(
                    f"cannot reach the sidecar at {target}: {code} (is it running there? give "
                    f"--target HOST:PORT, --ready-file or {TARGET_ENV}{tls})",
                    err=True,
                )
            sys.exit(1)
    view = status_to_dict(answer)
    if output == "json":
        click.echo(json.dumps(view, indent=2))
    else:
        _print_table(view)


def _status_target(target: str | None, ready_file: str | None) -> str:
    """The address ``status`` asks: --ready-file's first line or --target, the env, the default.

    A sidecar removes its ready file when it stops: missing or empty means
    not running (or not ready yet), exit 1 as for one that does not answer.
    """
    if target is not None and not target.strip():
        raise click.UsageError("--target is empty: give HOST:PORT")
    if target is not None and ready_file is not None:
        raise click.UsageError("give --target or --ready-file, not both")
    if ready_file:
        try:
            with open(ready_file, encoding="utf-8") as fh:
                target = fh.readline().strip()
        except OSError as exc:
            click.echo(
                f"cannot read {ready_file}: {exc.strerror} (is the sidecar running?)", err=True
            )
            sys.exit(1)
        if not target:
            click.echo(f"{ready_file} is empty (is the sidecar ready?)", err=True)
            sys.exit(1)
    what = "--target"
    if not target and os.environ.get(TARGET_ENV):
        target, what = os.environ[TARGET_ENV], f"--target ({TARGET_ENV})"
    target = target or DEFAULT_TARGET
    if "://" in target:
        raise click.UsageError(f"{what} is the sidecar's HOST:PORT, not a URL: {target!r}")
    try:
        host, port = parse_hostport(target, what)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if port == 0:
        raise click.UsageError(f"{what} needs the sidecar's port, got {target!r}")
    # An IPv6 host is bracketed for gRPC (a ready file of an older sidecar has it bare).
    return join_hostport(host, port)


def _status_pem(
    ca: str | None, cert: str | None, key: str | None
) -> tuple[bytes | None, bytes | None, bytes | None]:
    """``status``'s TLS files in gRPC's order (CA, key, cert); --tls-ca checked first.

    gRPC only logs a CA it cannot read and then fails the call as UNAVAILABLE.

    Raises:
        click.UsageError: --tls-ca cannot be read or holds no PEM certificate.
    """
    import ssl  # noqa: PLC0415 - lazy CLI

    if ca is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise click.UsageError(
                f"--tls-ca is not a PEM certificate: {ca} ({exc.reason})"
            ) from None
        except OSError as exc:
            raise click.UsageError(f"cannot read --tls-ca {ca}: {exc.strerror}") from None
    ca_pem, key_pem, cert_pem = (Path(p).read_bytes() if p else None for p in (ca, key, cert))
    return ca_pem, key_pem, cert_pem


def _when(ns: object) -> str:
    if not isinstance(ns, int) or not ns:
        return "-"
    moment = dt.datetime.fromtimestamp(ns / 1e9, tz=dt.UTC)
    ago = max(0.0, dt.datetime.now(tz=dt.UTC).timestamp() - ns / 1e9)
    return f"{moment:%Y-%m-%d %H:%M:%S}Z ({ago:.1f} s ago)"


def _print_table(view: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415 - lazy CLI
    from rich.table import Table  # noqa: PLC0415 - lazy CLI

    table = Table(title=f"sidecar {view['producer_id']}", show_header=False)
    cap = view["spool_byte_cap"] or 1
    dropped = ", ".join(f"{k}={v}" for k, v in view["dropped"].items()) or "none"
    rows = [
        ("collector", view["collector_url"]),
        ("spool depth", f"{view['spool_records']} events"),
        (
            "spool bytes",
            f"{view['spool_bytes']} of {view['spool_byte_cap']} "
            f"({100 * view['spool_bytes'] / cap:.1f} %)",
        ),
        ("oldest unsent", _when(view["oldest_unsent_unix_nano"])),
        ("lag", f"{view['lag_seconds']} s"),
        ("last success", _when(view["last_success_unix_nano"])),
        ("next seq", str(view["next_seq"])),
        ("exported", f"{view['exported_events']} events"),
        ("retried", f"{view['retried_batches']} attempts"),
        ("quarantined", f"{view['quarantined_batches']} batches"),
        ("dropped", dropped),
        ("last error", view["last_error"] or "-"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)

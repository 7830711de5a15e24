"""``predtrace collector serve`` and ``predtrace collector token``: run the collector, make tokens.

``serve`` loads the server stack (aiohttp, the store) only when it runs; a bad
flag, ``--db`` scheme or tokens file exits 2 as a usage error, a collector
that cannot start exits 1. ``token`` prints a new token once, and its hashed
entry for the tokens file.
"""

from __future__ import annotations

import json
import os

import click

from predtrace.collector._cli_calls import fail
from predtrace.collector._errors import CollectorError, ConfigError


@click.group("collector")
def collector_group() -> None:
    """The lineage collector: ingest, lineage store and query API."""


@collector_group.command("serve")
@click.option(
    "--db",
    default=None,
    help="sqlite:////abs/path.db, a file path, or postgresql://... [PREDTRACE_COLLECTOR_DB; "
    "default: predtrace-collector.db in the current folder]",
)
@click.option(
    "--listen",
    default=None,
    help="HOST:PORT (port 0: a free one) [PREDTRACE_COLLECTOR_LISTEN; default: 127.0.0.1:8700]",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="written with host:port once serving",
)
@click.option(
    "--tokens",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="tokens file (TOML, hashed tokens) [PREDTRACE_COLLECTOR_TOKENS]; "
    "none: loopback clients only",
)
@click.option("--mlflow", default=None, help="MLflow tracking URL [MLFLOW_TRACKING_URI]")
@click.option(
    "--retention-days",
    type=float,
    default=None,
    help="keep predictions this many days [PREDTRACE_RETENTION_PREDICTIONS_DAYS; "
    "default: for ever]",
)
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM certificate chain: serve HTTPS (with --tls-key) [PREDTRACE_COLLECTOR_TLS_CERT]",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="PEM private key of --tls-cert [PREDTRACE_COLLECTOR_TLS_KEY]",
)
def serve_command(
    *,
    db: str | None,
    listen: str | None,
    ready_file: str | None,
    tokens: str | None,
    mlflow: str | None,
    retention_days: float | None,
    tls_cert: str | None,
    tls_key: str | None,
) -> None:
    """Run the collector until SIGTERM or SIGINT.

    A flag wins over its environment variable. Read from the environment
    only (no flag):

    \b
      PREDTRACE_COLLECTOR_MAX_BODY_BYTES      largest batch body (16 MiB)
      PREDTRACE_COLLECTOR_MAX_INFLIGHT_BYTES  batch bodies held at once (128 MiB)
      PREDTRACE_COLLECTOR_MAX_ANSWER_BYTES    query answers held at once (64 MiB)
      PREDTRACE_COLLECTOR_MAX_CONNECTIONS     connections served at once (1024)
      PREDTRACE_RETENTION_BATCHES_DAYS        keep batch records this many days
    """
    import asyncio  # noqa: PLC0415 - the server stack loads only here
    import logging  # noqa: PLC0415

    from predtrace.collector._config import CollectorConfig  # noqa: PLC0415
    from predtrace.collector._server import serve  # noqa: PLC0415

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = CollectorConfig.from_env(
            os.environ,
            db=db,
            listen=listen,
            tokens_file=tokens,
            mlflow_url=mlflow,
            tls_cert=tls_cert,
            tls_key=tls_key,
            retention_days=retention_days,
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None  # exit 2, as for any bad flag
    try:
        asyncio.run(serve(config, ready_file=ready_file))
    except ConfigError as exc:  # found on opening: the --db scheme, the tokens file
        raise click.UsageError(str(exc)) from None
    except CollectorError as exc:
        fail(f"cannot start the collector: {exc}", 1)
    except OSError as exc:
        if exc.filename:  # the store's or the ready file's path, not the socket
            fail(f"cannot start the collector: {exc.filename}: {exc.strerror}", 1)
        fail(f"cannot listen on {config.listen}: {exc.strerror}", 1)


def _toml(value: str | list[str]) -> str:
    """A TOML string or array of strings.

    JSON's escapes are TOML's, but ``json.dumps`` writes a character past
    U+FFFF as a surrogate pair, which TOML refuses, and leaves DEL bare.
    """
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


@collector_group.command("token")
@click.option("--name", required=True, help="a label for the token")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(["ingest", "read", "admin"]),
    help="what the token may do (repeatable): ingest batches and lineage, read, admin",
)
@click.option(
    "--producer",
    "producers",
    multiple=True,
    help="allowed producer id glob (repeatable); an exact id also allows <id>-r??????, "
    "the id its sidecar continues under after losing its spool state; a token bound to "
    "producers sends their batches only (lineage takes an ingest token without --producer)",
)
def token_command(name: str, scopes: tuple[str, ...], producers: tuple[str, ...]) -> None:
    """Make a new token: prints it once, and the entry for the tokens file."""
    from predtrace.collector._auth import hash_token, new_token  # noqa: PLC0415

    if any(not producer.strip() for producer in producers):
        # An empty glob matches no producer id: the token could send nothing.
        raise click.BadParameter("a producer id glob must not be empty", param_hint="--producer")
    token = new_token()
    click.echo(f"token (give it to the client, it is not stored): {token}", err=True)
    click.echo("[[token]]")
    click.echo(f"name = {_toml(name)}")
    click.echo(f'sha256 = "{hash_token(token)}"')
    click.echo(f"scopes = {json.dumps(list(scopes))}")
    if producers:
        allowed = list(producers)
        for producer in producers:
            if not any(c in producer for c in "*?[") and f"{producer}-r??????" not in allowed:
                allowed.append(f"{producer}-r??????")  # the same sidecar after state loss
        click.echo(f"producers = {_toml(allowed)}")

"""The collector's commands: ``collector serve``, ``trace``, ``model lineage``,
``impact``, ``completeness`` and ``lineage register``.

Exit codes (DESIGN §7): 0 ok; 1 not found, chain broken (each missing hop named
on stderr) or collector unreachable; 2 usage error. Query commands print rich
tables, or JSON with ``-o json``. Heavy modules (aiohttp, the store) load only
for ``collector serve``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

import click

from predtrace.collector._client import (
    DEFAULT_URL,
    PREDTRACE_COLLECTOR_URL,
    PREDTRACE_TOKEN,
    Answer,
    CollectorUnreachableError,
    QueryClient,
    UnreadableAnswerError,
    path_part,
)
from predtrace.collector._errors import CollectorError, ConfigError
from predtrace.collector._terminal import printable

_OUTPUT = click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)


def _connection(func: Callable[..., None]) -> Callable[..., None]:
    func = click.option(
        "--retry-for",
        type=click.FloatRange(0, 86400),
        default=30.0,
        show_default=True,
        metavar="SECONDS",
        help="keep retrying this long while the collector answers 429/502/503/504 "
        "(busy, or restarting behind a proxy), honouring its Retry-After; 0: fail at once "
        "(a refused connection always fails at once)",
    )(func)
    func = click.option(
        "--token",
        envvar=PREDTRACE_TOKEN,
        default=None,
        help=f"bearer token [env {PREDTRACE_TOKEN}]",
    )(func)
    return click.option(
        "--collector",
        envvar=PREDTRACE_COLLECTOR_URL,
        default=DEFAULT_URL,
        show_default=True,
        help=f"collector URL [env {PREDTRACE_COLLECTOR_URL}]",
    )(func)


def _client(collector: str, token: str | None, retry_for: float) -> QueryClient:
    try:
        return QueryClient(collector, token, retry_for=retry_for, on_retry=_say_retry)
    except CollectorError as exc:
        raise click.UsageError(str(exc)) from None


def _say_retry(reason: str, wait: float) -> None:
    click.echo(f"predtrace: {printable(reason)}; retrying in {wait:.1f} s", err=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"predtrace: {printable(message)}", err=True)
    sys.exit(code)


def _call(request: Callable[[], Answer]) -> Answer:
    try:
        answer = request()
    except (CollectorUnreachableError, UnreadableAnswerError) as exc:
        _fail(str(exc))
    if answer.status == 404 and not answer.json:
        # The collector says "not found" in JSON; a text or HTML 404 is another
        # server, or a path in --collector: not an answer about the id asked.
        _fail(
            f"HTTP 404 without a collector's answer ({answer.error[:80]}): is --collector "
            "the collector's base URL (http://host:port, no path)?"
        )
    if answer.status in (401, 403):
        _fail(f"not allowed: {answer.error} (set --token or {PREDTRACE_TOKEN})")
    if answer.status == 400:
        raise click.UsageError(answer.error)
    return answer


def _call_ok(request: Callable[[], Answer], what: str) -> Answer:
    """``_call`` for writes: any answer but 2xx is a failure, said as such."""
    answer = _call(request)
    if not 200 <= answer.status < 300:
        _fail(f"{what} failed: the collector answered {answer.status}: {answer.error}")
    return answer


def _show(
    output: str,
    answer: Mapping[str, Any],
    render: Callable[[Any, Any], None],
    required: tuple[str, ...],
) -> None:
    """Print ``answer``; an answer without the ``required`` keys is an error (exit 1).

    ``--collector`` may name another service that answers JSON: its answer
    must not end in a traceback.
    """
    lacking = [key for key in required if key not in answer]
    if lacking:
        _fail(f"the answer is not a predtrace collector's: it has no {lacking[0]!r}")
    if output == "json":
        click.echo(json.dumps(answer, indent=2, default=str))
        return
    from predtrace.collector._render import terminal_console  # noqa: PLC0415 - rich on demand

    try:
        render(terminal_console(), answer)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        _fail(f"the answer is not in the shape a predtrace collector gives ({type(exc).__name__})")


def _render(name: str) -> Callable[[Any, Any], None]:
    from predtrace.collector import _render as module  # noqa: PLC0415 - rich loads lazily

    return getattr(module, name)  # type: ignore[no-any-return]


def _broken(missing: list[tuple[str, str]]) -> None:
    if missing:
        for where, reason in missing:
            click.echo(printable(f"chain broken: {where}: {reason}"), err=True)
        sys.exit(1)


@click.command("trace")
@click.argument("lookup_id", metavar="TRACE_ID|PREDICTION_ID")
@_OUTPUT
@_connection
def trace_command(
    lookup_id: str, output: str, collector: str, token: str | None, retry_for: float
) -> None:
    """Show the prediction(s) of a trace id or prediction id and their full lineage.

    Exits 1 when nothing is found or a chain is incomplete (each missing hop
    is named on stderr).
    """
    from predtrace.wire import InvalidIdError, classify_lookup_id  # noqa: PLC0415

    try:
        trace_id, prediction_id = classify_lookup_id(lookup_id)
    except InvalidIdError as exc:
        raise click.BadParameter(str(exc), param_hint="TRACE_ID|PREDICTION_ID") from None
    client = _client(collector, token, retry_for)
    answer = None
    if trace_id is not None:
        answer = _call(lambda: client.get(f"/v1/traces/{trace_id.hex()}"))
    if (answer is None or answer.status == 404) and prediction_id is not None:
        # The id as typed: the collector looks up both it and its canonical
        # form (a UUID may be stored upper case or without dashes).
        given = path_part(lookup_id.strip())
        answer = _call(lambda: client.get(f"/v1/predictions/{given}"))
    assert answer is not None  # noqa: S101 - classify_lookup_id returns at least one
    if answer.status == 404:
        _fail(f"no prediction found for {lookup_id}")
    predictions = answer.body.get("predictions")
    if not isinstance(predictions, list):
        _fail(f"the collector's answer ({answer.status}) holds no predictions: {answer.error}")
    _show(output, answer.body, _render("render_pivot"), ("predictions",))
    try:
        missing = _missing_hops(answer.body, predictions)
    except (KeyError, TypeError, AttributeError) as exc:
        _fail(f"the answer is not in the shape a predtrace collector gives ({type(exc).__name__})")
    _broken(missing)


def _missing_hops(body: Mapping[str, Any], predictions: list[Any]) -> list[tuple[str, str]]:
    """Every missing hop of a pivot answer, those of predictions it left out too.

    Exit codes (DESIGN §7): a truncated answer still found the trace, so it
    exits 0 only when the collector checked the chain of every stored
    prediction, listed or not, and found each complete; 1 when a hop is
    missing (named, for unlisted predictions too) or when not every chain
    could be checked, since the chain is then not known to be complete.
    """
    missing = [
        (f"{p['prediction_id']} {hop['hop']}", hop["reason"])
        for p in predictions
        for hop in p["lineage"]["missing"]
    ]
    if body.get("truncated"):
        click.echo(
            f"predtrace: answer truncated: {len(predictions)} of {body.get('total')}"
            f" predictions listed ({body.get('truncated_by')})",
            err=True,
        )
        missing += _unlisted_missing(body.get("unlisted"))
    if not missing and body.get("complete") is not True:
        missing = [("answer", "the collector did not find every chain complete")]
    return missing


def _unlisted_missing(unlisted: object) -> list[tuple[str, str]]:
    """The broken hops of the predictions a truncated answer left out."""
    if not isinstance(unlisted, list):
        return [("unlisted predictions", "too many chains to check: completeness unknown")]
    return [
        (f"{_group_name(group)} {hop['hop']}", hop["reason"])
        for group in unlisted
        for hop in group["missing"]
    ]


def _group_name(group: Mapping[str, Any]) -> str:
    model = group["model"]
    version = model["version"] or f"@{model['alias']}"
    where = group["deployment"] or "-"
    return f"{group['predictions']} unlisted prediction(s) of {model['name']}/{version} on {where}"


@click.group("model")
def model_group() -> None:
    """Model versions: lineage (run, commit, datasets, images, deployments)."""


@model_group.command("lineage")
@click.argument("model_ref", metavar="NAME/VERSION|NAME@ALIAS")
@_OUTPUT
@_connection
def model_lineage_command(
    model_ref: str, output: str, collector: str, token: str | None, retry_for: float
) -> None:
    """Show a model version's lineage; exits 1 when it is unknown or incomplete."""
    if "@" in model_ref:
        name, _, alias = model_ref.rpartition("@")
        path = f"/v1/models/{path_part(name)}/aliases/{path_part(alias)}/lineage"
    else:
        name, _, version = model_ref.rpartition("/")
        path = f"/v1/models/{path_part(name)}/versions/{path_part(version)}/lineage"
    if not name or not model_ref.rpartition("@" if "@" in model_ref else "/")[2]:
        raise click.BadParameter("use NAME/VERSION or NAME@ALIAS", param_hint="MODEL")
    client = _client(collector, token, retry_for)
    answer = _call(lambda: client.get(path))
    if answer.status == 404:
        _fail(answer.error)
    _show(output, answer.body, _render("render_model_lineage"), ("model_version", "missing"))
    _broken([(str(m["hop"]), str(m["reason"])) for m in lineage_missing(answer.body)])


def lineage_missing(answer: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The missing hops of a model lineage answer, each with its reason.

    A collector that gives no ``missing_reasons`` (an older one) names the
    hops only: they read "not registered".
    """
    reasons = answer.get("missing_reasons")
    if isinstance(reasons, list):
        return [m for m in reasons if isinstance(m, Mapping)]
    return [{"hop": str(h), "reason": "not registered"} for h in answer.get("missing", [])]


@click.command("impact")
@click.option("--dataset", help="dataset digest")
@click.option(
    "--commit",
    help="commit sha; from 7 hex digits on, a prefix finds the full sha (shorter: exact only)",
)
@click.option("--image", help="container image digest")
@_OUTPUT
@_connection
def impact_command(
    *,
    dataset: str | None,
    commit: str | None,
    image: str | None,
    output: str,
    collector: str,
    token: str | None,
    retry_for: float,
) -> None:
    """What a dataset, commit or image touched: model versions, deployments, predictions."""
    given = {k: v for k, v in (("dataset", dataset), ("commit", commit), ("image", image)) if v}
    if len(given) != 1:
        raise click.UsageError("give exactly one of --dataset, --commit or --image")
    client = _client(collector, token, retry_for)
    answer = _call(lambda: client.get("/v1/impact", given))
    if answer.status == 404:
        _fail(answer.error)
    _show(output, answer.body, _render("render_impact"), ("query", "model_versions"))


# The most rows a list answer may be asked for (store._maintenance.MAX_PAGE_LIMIT;
# not imported: the store loads only for ``collector serve``).
_PAGE_LIMIT_MAX = 10_000


@click.command("completeness")
@click.option(
    "--fail-under",
    type=click.FloatRange(0, 1),
    default=None,
    help="exit 1 when the complete share is below this (0-1)",
)
@click.option(
    "--limit",
    type=click.IntRange(1, _PAGE_LIMIT_MAX),
    default=None,
    help="list at most this many models  [collector's default: 1000]",
)
@click.option(
    "--after",
    metavar="MODEL",
    default=None,
    help="list the models after this name (the next page of a truncated answer)",
)
@_OUTPUT
@_connection
def completeness_command(
    *,
    fail_under: float | None,
    limit: int | None,
    after: str | None,
    output: str,
    collector: str,
    token: str | None,
    retry_for: float,
) -> None:
    """Per model, the share of predictions whose lineage chain is complete.

    The totals, and so --fail-under, cover every model; the table lists one
    page of them by name. A truncated list is said on stderr with the
    command for the next page; as for a truncated trace, the exit code
    follows what was checked (every model here), not what was listed.
    """
    if fail_under is not None and math.isnan(fail_under):  # FloatRange lets NaN through
        raise click.BadParameter("must be a number from 0 to 1", param_hint="--fail-under")
    query = {"limit": str(limit)} if limit is not None else {}
    if after is not None:
        query["after"] = after
    client = _client(collector, token, retry_for)
    answer = _call(lambda: client.get("/v1/completeness", query))
    _show(output, answer.body, _render("render_completeness"), ("share", "predictions", "models"))
    _say_truncated(answer.body, "models", "predtrace completeness", limit)
    share = answer.body["share"]
    if not isinstance(share, (int, float)):
        _fail("the answer is not in the shape a predtrace collector gives (share)")
    if fail_under is not None and share < fail_under:
        _fail(f"completeness {share:.1%} is below {fail_under:.1%}")


def _say_truncated(body: Mapping[str, Any], key: str, command: str, limit: int | None) -> None:
    """On stderr: how much of a list answer was listed, and the command for the next page."""
    if not body.get("truncated") or not isinstance(body.get(key), list):
        return
    listed, total, after = len(body[key]), body.get("total"), body.get("next_after")
    if not isinstance(after, str):
        # Without a key to go on from, a next page cannot be asked: say so.
        click.echo(f"predtrace: answer truncated: {listed} of {total} {key} listed", err=True)
        return
    again = f"{command} --after {shlex.quote(after)}"
    if limit is not None:
        again += f" --limit {limit}"
    click.echo(
        printable(f"predtrace: answer truncated: {listed} of {total} {key} listed; next: {again}"),
        err=True,
    )


def _pairs(values: tuple[str, ...], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: use KEY=VALUE", param_hint=what)
        out[key] = value
    return out


def _metrics(values: tuple[str, ...]) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in _pairs(values, "--metric").items()}
    except ValueError:
        raise click.BadParameter("metric values must be numbers", param_hint="--metric") from None


def _body_from_options(opts: Mapping[str, Any]) -> dict[str, object]:
    body: dict[str, object] = {"source": opts["source"]}
    if opts["model"]:
        name, _, version = opts["model"].rpartition("/")
        if not name or not version:
            raise click.BadParameter("use NAME/VERSION", param_hint="--model")
        body["model"] = {
            "name": name,
            "version": version,
            "aliases": list(opts["alias"]),
            "artifact_digest": opts["artifact_digest"] or "",
        }
    if (opts["param"] or opts["metric"] or opts["run_name"] or opts["run_url"]) and not opts[
        "run_id"
    ]:
        raise click.UsageError("--param, --metric, --run-name and --run-url need --run-id")
    if opts["run_id"]:
        body["run"] = {
            "id": opts["run_id"],
            "name": opts["run_name"] or "",
            "url": opts["run_url"] or "",
            "params": _pairs(opts["param"], "--param"),
            "metrics": _metrics(opts["metric"]),
        }
    datasets = []
    for item in opts["dataset"]:
        digest, _, source = item.partition("=")
        datasets.append({"digest": digest, "source": source})
    if datasets:
        body["datasets"] = datasets
    if opts["commit"]:
        body["commit"] = {"sha": opts["commit"], "repo": opts["repo"] or ""}
    if opts["image"]:
        body["image"] = {"digest": opts["image"], "name": opts["image_name"] or ""}
    if opts["deployment"]:
        body["deployment"] = {
            "id": opts["deployment"],
            "service": opts["service"] or "",
            "namespace": opts["namespace"] or "",
        }
    return body


@click.group("lineage")
def lineage_group() -> None:
    """Register lineage with the collector (for CI/CD hooks)."""


@lineage_group.command("register")
@click.option(
    "--file", "file_", type=click.File("r"), help="a JSON registration body ('-' = stdin)"
)
@click.option("--model", help="NAME/VERSION")
@click.option("--alias", multiple=True, help="alias pointing at the version (repeatable)")
@click.option("--artifact-digest", help="digest of the model artifact")
@click.option("--run-id", help="training run id")
@click.option("--run-name")
@click.option("--run-url")
@click.option("--param", multiple=True, help="KEY=VALUE run parameter (repeatable)")
@click.option("--metric", multiple=True, help="KEY=NUMBER run metric (repeatable)")
@click.option("--dataset", multiple=True, help="DIGEST[=SOURCE] the run used (repeatable)")
@click.option("--commit", help="commit sha the run was built from")
@click.option("--repo", help="repository URL of the commit")
@click.option("--image", help="image digest the model version is packaged in")
@click.option("--image-name")
@click.option("--deployment", help="deployment id serving the model version")
@click.option("--service")
@click.option("--namespace")
@click.option("--source", default="ci", show_default=True, help="who registers (recorded)")
@click.option(
    "--replace",
    is_flag=True,
    help="Overwrite a stored run commit, model run or artifact digest that this "
    "registration contradicts (else the collector refuses it with 409); the datasets "
    "and image given become the run's and the version's only ones.",
)
@_connection
def register_command(
    collector: str,
    token: str | None,
    retry_for: float,
    file_: Any,
    replace: bool,
    **opts: Any,
) -> None:
    """Register a model version's lineage: run, datasets, commit, image, deployment.

    Either build it from options or give a JSON body with --file (the body of
    POST /v1/lineage). Lineage already stored is evidence: a registration that
    names another commit for a run, or another run or artifact digest for a
    model version, is refused unless --replace is given.
    """
    if file_ is not None:
        context = click.get_current_context()
        given = [
            name
            for name in opts
            if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in sorted(given))
            raise click.UsageError(
                f"--file is the whole registration: put {flags} in the file instead"
            )
        try:
            body = json.load(file_)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--file") from None
        except RecursionError:
            raise click.BadParameter("JSON nested too deeply", param_hint="--file") from None
    else:
        body = _body_from_options(opts)
    client = _client(collector, token, retry_for)
    path = "/v1/lineage?replace=true" if replace else "/v1/lineage"
    _call_ok(lambda: client.post(path, body), "registration")
    click.echo("registered")


@click.group("collector")
def collector_group() -> None:
    """The lineage collector: ingest, lineage store and query API."""


@collector_group.command("serve")
@click.option(
    "--db",
    envvar="PREDTRACE_COLLECTOR_DB",
    default=None,
    help="sqlite:////abs/path.db, a file path, or postgresql://...  "
    "[default: predtrace-collector.db in the current folder]",
)
@click.option(
    "--listen",
    envvar="PREDTRACE_COLLECTOR_LISTEN",
    default=None,
    help="HOST:PORT (port 0: a free one)  [default: 127.0.0.1:8700]",
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
    help="tokens file (TOML, hashed tokens); none: loopback clients only",
)
@click.option("--mlflow", default=None, help="MLflow tracking URL [default: MLFLOW_TRACKING_URI]")
@click.option("--retention-days", type=float, default=None, help="keep predictions this many days")
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
    """Run the collector until SIGTERM or SIGINT."""
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
        _fail(f"cannot start the collector: {exc}", 1)
    except OSError as exc:
        if exc.filename:  # the store's or the ready file's path, not the socket
            _fail(f"cannot start the collector: {exc.filename}: {exc.strerror}", 1)
        _fail(f"cannot listen on {config.listen}: {exc.strerror}", 1)


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

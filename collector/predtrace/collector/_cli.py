"""The collector's commands: ``predtrace.cli`` finds each one in this module.

The query commands are here: ``trace``, ``model lineage``, ``impact`` and
``completeness``. ``lineage register`` (``_cli_registration``) and
``collector serve`` and ``token`` (``_cli_collector``) are re-exported; what
every command shares (options, calls, failures, output) is in ``_cli_calls``.

Exit codes (DESIGN §7): 0 ok; 1 not found, chain broken (each missing hop named
on stderr) or collector unreachable; 2 usage error. Query commands print rich
tables, or JSON with ``-o json``. Heavy modules (aiohttp, the store) load only
for ``collector serve``.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Mapping
from typing import Any

import click

from predtrace.collector._cli_calls import (
    OUTPUT_OPTION,
    call,
    connection_options,
    exit_if_broken,
    fail,
    query_client,
    renderer,
    show,
)
from predtrace.collector._cli_collector import collector_group
from predtrace.collector._cli_registration import lineage_group
from predtrace.collector._client import path_part
from predtrace.collector._terminal import printable

__all__ = [
    "collector_group",
    "completeness_command",
    "impact_command",
    "lineage_group",
    "lineage_missing",
    "model_group",
    "trace_command",
]


@click.command("trace")
@click.argument("lookup_id", metavar="TRACE_ID|PREDICTION_ID")
@OUTPUT_OPTION
@connection_options
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
    client = query_client(collector, token, retry_for)
    answer = None
    if trace_id is not None:
        answer = call(lambda: client.get(f"/v1/traces/{trace_id.hex()}"))
    if (answer is None or answer.status == 404) and prediction_id is not None:
        # The id as typed: the collector looks up both it and its canonical
        # form (a UUID may be stored upper case or without dashes).
        given = path_part(lookup_id.strip())
        answer = call(lambda: client.get(f"/v1/predictions/{given}"))
    assert answer is not None  # noqa: S101 - classify_lookup_id returns at least one
    if answer.status == 404:
        fail(f"no prediction found for {lookup_id}")
    predictions = answer.body.get("predictions")
    if not isinstance(predictions, list):
        fail(f"the collector's answer ({answer.status}) holds no predictions: {answer.error}")
    show(output, answer.body, renderer("render_pivot"), ("predictions",))
    try:
        missing = _missing_hops(answer.body, predictions)
    except (KeyError, TypeError, AttributeError) as exc:
        fail(f"the answer is not in the shape a predtrace collector gives ({type(exc).__name__})")
    exit_if_broken(missing)


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
@OUTPUT_OPTION
@connection_options
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
    client = query_client(collector, token, retry_for)
    answer = call(lambda: client.get(path))
    if answer.status == 404:
        fail(answer.error)
    show(output, answer.body, renderer("render_model_lineage"), ("model_version", "missing"))
    exit_if_broken([(str(m["hop"]), str(m["reason"])) for m in lineage_missing(answer.body)])


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
@OUTPUT_OPTION
@connection_options
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
    client = query_client(collector, token, retry_for)
    answer = call(lambda: client.get("/v1/impact", given))
    if answer.status == 404:
        fail(answer.error)
    show(output, answer.body, renderer("render_impact"), ("query", "model_versions"))


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
@OUTPUT_OPTION
@connection_options
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
    client = query_client(collector, token, retry_for)
    answer = call(lambda: client.get("/v1/completeness", query))
    show(output, answer.body, renderer("render_completeness"), ("share", "predictions", "models"))
    _say_truncated(answer.body, "models", "predtrace completeness", limit)
    share = answer.body["share"]
    if not isinstance(share, (int, float)):
        fail("the answer is not in the shape a predtrace collector gives (share)")
    if fail_under is not None and share < fail_under:
        fail(f"completeness {share:.1%} is below {fail_under:.1%}")


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

"""``predtrace lineage register``: a CI/CD hook registers a model version's lineage.

The registration (the body of ``POST /v1/lineage``) is read from ``--file``
or built from options; the collector refuses what contradicts stored lineage
(409) unless ``--replace`` is given. Exit codes as for every collector command
(``_cli_calls``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import click

from predtrace.collector._cli_calls import call_ok, connection_options, query_client


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
@click.option("--run-name", help="human name of the training run (with --run-id)")
@click.option("--run-url", help="link to the run in its tracker (with --run-id)")
@click.option("--param", multiple=True, help="KEY=VALUE run parameter (repeatable)")
@click.option("--metric", multiple=True, help="KEY=NUMBER run metric (repeatable)")
@click.option("--dataset", multiple=True, help="DIGEST[=SOURCE] the run used (repeatable)")
@click.option("--commit", help="commit sha the run was built from")
@click.option("--repo", help="repository URL of the commit")
@click.option("--image", help="image digest the model version is packaged in")
@click.option("--image-name", help="image name:tag of --image")
@click.option("--deployment", help="deployment id serving the model version")
@click.option("--service", help="service name of --deployment")
@click.option("--namespace", help="namespace of --deployment")
@click.option("--source", default="ci", show_default=True, help="who registers (recorded)")
@click.option(
    "--replace",
    is_flag=True,
    help="Overwrite a stored run commit, model run or artifact digest that this "
    "registration contradicts (else the collector refuses it with 409); the datasets "
    "and image given become the run's and the version's only ones.",
)
@connection_options
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
    client = query_client(collector, token, retry_for)
    path = "/v1/lineage?replace=true" if replace else "/v1/lineage"
    call_ok(lambda: client.post(path, body), "registration")
    click.echo("registered")

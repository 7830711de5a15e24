"""A registration body holds only the keys its format has: a misspelt one is refused.

``POST /v1/lineage`` used to read the keys it knows and drop the rest: a
CI hook that wrote ``model.alias``, ``model.digest``, ``run.commit``,
``dataset`` or ``images`` was answered 201 and nothing of those was stored
(the version's lineage then named them missing, the alias lookup was a 404).
Now such a body is refused whole (400), naming the key and the one it most
likely meant. OpenLineage events keep their own keys and facets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.collector import CollectorConfig, LineageError, RunningCollector, start_collector
from predtrace.collector.lineage import parse_registration, parse_run_event

DIGEST = "sha256:" + "ab" * 32
SHA = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"
BASE: dict[str, Any] = {"model": {"name": "m", "version": "1"}, "run": {"id": "r"}}


def _with(section: str, **values: object) -> dict[str, Any]:
    """BASE with ``values`` added to ``section`` ("": the top level)."""
    body: dict[str, Any] = {key: dict(value) for key, value in BASE.items()}
    if section == "datasets":
        body["datasets"] = [{"digest": DIGEST, **values}]
    elif section == "":
        body.update(values)
    else:
        body[section] = {**body.get(section, {}), **values}
    return body


# (body, the whole reason)
MISSPELT: list[tuple[dict[str, Any], str]] = [
    (_with("model", alias="champion"), "unknown key 'alias' in model; did you mean 'aliases'?"),
    (
        _with("model", digest=DIGEST),
        "unknown key 'digest' in model; did you mean 'artifact_digest'?",
    ),
    (
        _with("run", commit="1234567abc"),
        "unknown key 'commit' in run; did you mean the top-level 'commit'?",
    ),
    (_with("run", run_id="r2"), "unknown key 'run_id' in run; did you mean 'id'?"),
    (_with("run", metric={"auc": 1}), "unknown key 'metric' in run; did you mean 'metrics'?"),
    (
        _with("", dataset=[{"digest": DIGEST}]),
        "unknown key 'dataset' at the top level of the lineage body; did you mean 'datasets'?",
    ),
    (
        _with("", images={"digest": DIGEST}),
        "unknown key 'images' at the top level of the lineage body; did you mean 'image'?",
    ),
    (
        _with("datasets", sorce="s3://b/t.csv"),
        "unknown key 'sorce' in datasets[0]; did you mean 'source'?",
    ),
    (
        _with("commit", sha=SHA, repository="https://git.example/x"),
        "unknown key 'repository' in commit; did you mean 'repo'?",
    ),
    (
        _with("image", digest=DIGEST, tag="v1"),
        "unknown key 'tag' in image; known keys: digest, name",
    ),
    (
        _with("deployment", id="d", start="2026-01-01T00:00:00Z"),
        "unknown key 'start' in deployment; did you mean 'started'?",
    ),
    (
        _with("deployment", id="d", model={"name": "m", "verison": "1"}),
        "unknown key 'verison' in deployment.model; did you mean 'version'?",
    ),
]


@pytest.mark.parametrize(("body", "reason"), MISSPELT, ids=[c[1] for c in MISSPELT])
def test_an_unknown_key_is_refused_naming_it_and_the_likely_one(
    body: dict[str, Any], reason: str
) -> None:
    with pytest.raises(LineageError) as raised:
        parse_registration(body)
    assert str(raised.value) == reason


def test_an_unknown_key_is_quoted_cut_and_without_control_characters() -> None:
    with pytest.raises(LineageError) as raised:
        parse_registration(_with("", **{"x\x1b[2J" + "y" * 100: 1}))
    reason = str(raised.value)
    assert "\x1b" not in reason and "y" * 60 not in reason and "y'... at the top" in reason
    assert reason.startswith("unknown key 'x\ufffd[2Jyyy") and "known keys: model, run" in reason


def test_a_deployment_may_name_the_version_it_serves_but_only_the_registrations() -> None:
    served = {"id": "d", "model": {"name": "m", "version": 1}}
    alone = parse_registration({"deployment": served})
    assert alone.model is not None and (alone.model.name, alone.model.version) == ("m", "1")
    assert parse_registration(_with("deployment", **served)).model == parse_registration(BASE).model
    with pytest.raises(LineageError, match=r"deployment\.model \(m/2\) must be the registration's"):
        parse_registration(_with("deployment", id="d", model={"name": "m", "version": "2"}))
    with pytest.raises(LineageError, match=r"deployment\.model must be an object"):
        parse_registration(_with("deployment", id="d", model="m/1"))


def test_an_openlineage_event_keeps_its_own_keys_and_facets() -> None:
    event = {
        "eventType": "COMPLETE",
        "eventTime": "2026-01-01T00:00:00Z",
        "producer": "https://example/airflow",
        "schemaURL": "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent",
        "run": {
            "runId": "0190a5b0-0000-7000-8000-000000000001",
            "facets": {
                "predtrace": {
                    "_producer": "https://example/airflow",
                    "_schemaURL": "https://example/predtrace.json",
                    "model": {"name": "m", "version": "1", "flavor": "sklearn"},
                },
                "nominalTime": {"nominalStartTime": "2026-01-01T00:00:00Z"},
            },
        },
        "job": {"namespace": "ml", "name": "train", "facets": {"jobType": {"jobType": "JOB"}}},
        "inputs": [{"namespace": "s3://b", "name": "t.csv", "inputFacets": {}}],
        "outputs": [],
    }
    reg = parse_run_event(event)
    assert reg.model is not None and reg.model.name == "m"


@pytest.fixture
async def collector(tmp_path: Path) -> AsyncIterator[RunningCollector]:
    """A real collector (aiohttp on 127.0.0.1:0, SQLite) without tokens."""
    running = await start_collector(
        CollectorConfig(db=f"sqlite:///{tmp_path}/c.db", listen="127.0.0.1:0")
    )
    try:
        yield running
    finally:
        await running.stop()


async def _call(method: str, url: str, body: object = None) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body) as resp:
        return resp.status, await resp.json()


async def test_the_api_refuses_a_misspelt_body_whole_and_stores_nothing(
    collector: RunningCollector,
) -> None:
    body = {
        "model": {"name": "typo", "version": "1", "alias": "champion", "digest": DIGEST},
        "run": {"id": "typo-run", "commit": "1234567abc"},
        "dataset": [{"digest": DIGEST}],
        "images": {"digest": DIGEST},
    }
    status, answer = await _call("POST", f"{collector.url}/v1/lineage", body)
    assert status == 400, answer
    assert answer["error"].startswith("unknown key 'dataset' at the top level")
    status, _ = await _call("GET", f"{collector.url}/v1/models/typo/versions/1/lineage")
    assert status == 404


async def test_the_demo_the_cli_and_openlineage_still_register(
    collector: RunningCollector, tmp_path: Path
) -> None:
    # The demo's body (proto/predtrace/cli/demo) names the served version in its deployment.
    demo = {
        "model": {
            "name": "churn",
            "version": "1",
            "aliases": ["champion"],
            "artifact_digest": DIGEST,
        },
        "run": {"id": "run-0a1b2c3d", "params": {"lr": "0.1"}, "metrics": {"auc": 0.9}},
        "datasets": [{"digest": DIGEST, "source": "generated://churn-600.csv"}],
        "commit": {"sha": SHA, "repo": "https://example.org/acme/churn-model"},
        "image": {"digest": DIGEST, "name": "churn-model:1"},
        "deployment": {"id": "churn-demo", "model": {"name": "churn", "version": "1"}},
    }
    status, answer = await _call("POST", f"{collector.url}/v1/lineage", demo)
    assert status == 201, answer
    status, lineage = await _call(
        "GET", f"{collector.url}/v1/models/churn/aliases/champion/lineage"
    )
    assert status == 200 and lineage["model_version"]["aliases"] == ["champion"]
    # Every option of `predtrace lineage register` is a key the format has.
    args = ["lineage", "register", "--collector", collector.url, "--retry-for", "0"]
    options = [
        *("--model", "cli/2", "--alias", "prod", "--artifact-digest", DIGEST),
        *("--run-id", "cli-run", "--run-name", "n", "--run-url", "https://r.example/1"),
        *("--param", "lr=0.1", "--metric", "auc=0.9", "--dataset", f"{DIGEST}=s3://b/t.csv"),
        *("--commit", SHA, "--repo", "https://git.example/cli", "--image", DIGEST),
        *("--image-name", "cli:2", "--deployment", "cli-prod", "--service", "cli"),
        *("--namespace", "ml", "--source", "ci"),
    ]
    result = await _invoke([*args, *options])
    assert result.exit_code == 0, result.output
    # A --file body with a misspelt key: the CLI says which (exit 2, a usage error).
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"name": "cli", "version": "3", "alias": "x"}}')
    result = await _invoke([*args, "--file", str(bad)])
    assert result.exit_code == 2
    assert "unknown key 'alias' in model; did you mean 'aliases'?" in result.output
    event = {
        "eventType": "COMPLETE",
        "producer": "x",
        "run": {"runId": "0190a5b0-0000-7000-8000-000000000009", "facets": {"extra": {"k": 1}}},
        "job": {"namespace": "ml", "name": "train", "facets": {"other": {}}},
        "outputs": [{"namespace": "mlflow", "name": "models:/ol/1", "outputFacets": {}}],
        "unknownTopLevel": True,
    }
    status, answer = await _call("POST", f"{collector.url}/v1/openlineage", event)
    assert status == 201, answer


async def _invoke(args: list[str]) -> Any:
    # The CLI is synchronous: run it beside the collector's event loop.
    return await asyncio.to_thread(CliRunner().invoke, main, args)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b'{"model":{"name":"dupA","version":"1"},"model":{"name":"dupB","version":"1"}}', "model"),
        (b'{"model":{"name":"dupC","version":"1","version":"7"},"run":{"id":"r"}}', "version"),
    ],
)
async def test_a_key_written_twice_is_refused_not_silently_the_last(
    collector: RunningCollector, raw: bytes, key: str
) -> None:
    # json keeps the last value: the first model (or version) was dropped unsaid.
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{collector.url}/v1/lineage", data=raw, headers=headers) as resp,
    ):
        assert resp.status == 400
        answer = await resp.json()
    assert answer["error"] == f"the key {key!r} is written twice in one object"
    for name in ("dupA", "dupB", "dupC"):
        status, _ = await _call("GET", f"{collector.url}/v1/models/{name}/versions/1/lineage")
        assert status == 404

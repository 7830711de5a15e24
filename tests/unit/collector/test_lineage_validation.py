"""Lineage values held to their shapes: refused by the API and OpenLineage, cleaned from MLflow.

A digest, commit, id or name of any shape used to be stored and printed by
``predtrace trace``: control characters, newlines that fake a line of the
chain table, bidi overrides that reorder it, kilobytes of text. The CI hook
API and OpenLineage events refuse such a value with a 400 naming the field;
MLflow's are left out or cleaned, the link kept, and counted in one warning.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from predtrace.collector import (
    CollectorConfig,
    LineageError,
    RunningCollector,
    start_collector,
)
from predtrace.collector.lineage import (
    parse_registration,
    parse_run_event,
    registration_from_mlflow,
)
from predtrace.collector.lineage._values import (
    MAX_NAME,
    check_id,
    check_text,
    check_token,
    clean_text,
)

SHA = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"
DIGEST = "sha256:" + "ab" * 32
BASE: dict[str, Any] = {"model": {"name": "m", "version": "1"}, "run": {"id": "r"}}


def _with(section: str, **values: object) -> dict[str, Any]:
    """BASE with ``values`` set in ``section`` ("datasets" is a one-item list)."""
    body: dict[str, Any] = {key: dict(value) for key, value in BASE.items()}
    if section == "datasets":
        body["datasets"] = [{"digest": DIGEST, **values}]
    elif section == "":
        body.update(values)
    else:
        body[section] = {**body.get(section, {}), **values}
    return body


# (what is wrong, body, the field the reason must name)
MALFORMED: list[tuple[str, dict[str, Any], str]] = [
    ("digest with ESC", _with("datasets", digest="sha256:\x1b[2Jab"), "datasets[0].digest"),
    ("digest with newline", _with("datasets", digest="sha256:aa\n✓ commit"), "datasets[0].digest"),
    ("digest with CR", _with("datasets", digest="sha256:aa\rFAKE"), "datasets[0].digest"),
    ("digest of spaces only", _with("datasets", digest="   "), "datasets[0].digest"),
    ("digest that is prose", _with("datasets", digest="not a digest"), "datasets[0].digest"),
    ("digest too long", _with("datasets", digest="sha256:" + "a" * MAX_NAME), "datasets[0].digest"),
    ("digest as a number", _with("datasets", digest=12345), "datasets[0].digest"),
    ("digest with bidi", _with("datasets", digest="sha256:\u202eab"), "datasets[0].digest"),
    ("digest zero-width", _with("datasets", digest="sha256:a\u200bb"), "datasets[0].digest"),
    ("commit with ESC", _with("commit", sha="abc\x1b[31mdef"), "commit.sha"),
    ("commit with spaces", _with("commit", sha="not a commit"), "commit.sha"),
    ("commit too long", _with("commit", sha="a" * 2000), "commit.sha"),
    ("commit as a number", _with("commit", sha=1234567), "commit.sha"),
    ("commit repo with ESC", _with("commit", sha=SHA, repo="https://x\x1b[2J"), "commit.repo"),
    ("image with newline", _with("image", digest="sha256:x\ny"), "image.digest"),
    ("image with DEL and CSI", _with("image", digest="sha256:x\x7f\x9by"), "image.digest"),
    ("artifact with ESC", _with("model", artifact_digest="sha256:\x1b[1m"), "artifact_digest"),
    ("run id with newline", _with("run", id="r\nx"), "run.id"),
    ("run id with edge space", _with("run", id=" r"), "run.id"),
    ("run id zero-width", _with("run", id="r\u200b1"), "run.id"),
    ("run name too long", _with("run", name="n" * (MAX_NAME + 1)), "run.name"),
    ("run name retitles", _with("run", name="train\x1b]0;TITLE\x07"), "run.name"),
    ("run name with bidi", _with("run", name="train\u2066x"), "run.name"),
    ("param value with ESC", _with("run", params={"lr": "0.1\x1b[2J"}), "run.params.lr"),
    ("param key with newline", _with("run", params={"l\nr": "0.1"}), "run.params key"),
    ("metric key with ESC", _with("run", metrics={"a\x1bc": 1.0}), "run.metrics key"),
    ("model name with ESC", _with("model", name="m\x1b[2J"), "model.name"),
    ("model version with tab", _with("model", version="1\t2"), "model.version"),
    ("alias with newline", _with("model", aliases=["a\nb"]), "model.aliases[0]"),
    ("alias with bidi", _with("model", aliases=["ok", "\u202eprod"]), "model.aliases[1]"),
    ("deployment id with ESC", _with("deployment", id="d\x1b[2J"), "deployment.id"),
    ("service with U+2028", _with("deployment", id="d", service="a\u2028b"), "deployment.service"),
    ("source with ESC", _with("", source="ci\x1b[2J"), "source"),
]


@pytest.mark.parametrize(
    ("body", "field"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_lineage_value_is_refused_naming_its_field(
    body: dict[str, Any], field: str
) -> None:
    with pytest.raises(LineageError) as raised:
        parse_registration(body)
    assert field in str(raised.value)


# What the demo, the README, the examples and the existing tests send: still valid.
VALID: list[tuple[str, dict[str, Any]]] = [
    (
        "the demo's registration",
        {
            "model": {"name": "churn", "version": "1", "artifact_digest": DIGEST},
            "run": {"id": "run-0a1b2c3d", "params": {"lr": "0.1"}, "metrics": {"auc": 0.9}},
            "datasets": [{"digest": DIGEST, "source": "generated://churn-600.csv"}],
            "commit": {"sha": SHA, "repo": "https://example.org/acme/churn-model"},
            "image": {"digest": DIGEST, "name": "churn-model:1"},
            "deployment": {"id": "churn-prod"},
        },
    ),
    ("placeholder digests", _with("datasets", digest="sha256:train")),
    ("MLflow's 8-hex dataset digest", _with("datasets", digest="d1g3st42")),
    ("the README's literal", _with("datasets", digest="sha256:...")),
    ("a tag as the commit", _with("commit", sha="v1.2")),
    ("a short sha", _with("commit", sha="1f2e3d")),
    ("a sha256 git commit", _with("commit", sha="ab" * 32)),
    ("an image reference", _with("image", digest="docker-pullable://r.io/a/b@" + DIGEST)),
    ("a name with spaces and accents", _with("model", name="Churn Modèl ✓")),
    ("a version as a number", _with("model", version=3)),
    ("ids holding braces", _with("model", name="m{x}", aliases=["c{1}"])),
    ("a multi-line param", _with("run", params={"note": "line 1\n\tline 2"})),
    ("a run name with spaces", _with("run", name="nightly train (eu)")),
]


@pytest.mark.parametrize("body", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_lineage_the_demo_readme_and_tests_send_is_still_accepted(body: dict[str, Any]) -> None:
    assert parse_registration(body).source == "api"


def test_value_rules_refuse_what_a_terminal_must_not_be_handed() -> None:
    assert check_text("a\tb\nc", "v", multiline=True) == "a\tb\nc"
    for text in ("a\tb", "a\nb", "a\x1bb", "a\x9bb", "a\u2029b", "a\u202eb", "a\ud800b"):
        with pytest.raises(LineageError, match="v must be"):
            check_text(text, "v")
    with pytest.raises(LineageError, match="at most 3 characters, not 4"):
        check_text("abcd", "v", limit=3)
    assert check_id("Modèl 1", "v") == "Modèl 1"
    for text in (" a", "a ", "a\u200bb", "a\ufeff"):
        with pytest.raises(LineageError, match="v must not"):
            check_id(text, "v")
    assert check_token("sha256:train", "v", what="a digest") == "sha256:train"
    assert check_token(None, "v", what="a digest") == ""
    for value in ("a b", "é", "a" * (MAX_NAME + 1), 7, True):
        with pytest.raises(LineageError, match="v must be"):
            check_token(value, "v", what="a digest")


def test_clean_text_cuts_and_marks_what_it_replaced() -> None:
    assert clean_text("ok\x1b[2J\u202eend", 100) == "ok\ufffd[2J\ufffdend"
    assert clean_text("a\nb\tc", 100, multiline=True) == "a\nb\tc"
    assert clean_text("a\nb", 100) == "a\ufffdb"
    assert clean_text("abcdef", 3) == "abc"


def _run_event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "eventType": "COMPLETE",
        "run": {"runId": "0190a5b0-0000-7000-8000-000000000001"},
        "job": {
            "namespace": "ml",
            "name": "train",
            "facets": {"sourceCodeLocation": {"type": "git", "url": "https://g", "version": SHA}},
        },
        "inputs": [
            {
                "namespace": "s3://b",
                "name": "t.csv",
                "facets": {"version": {"datasetVersion": "2026-01-01 00:00:00"}},
            }
        ],
        "outputs": [{"namespace": "mlflow", "name": "models:/olm/1"}],
    }
    for path, value in changes.items():
        *parents, last = path.split("__")
        node: Any = event
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[last] = value
    return event


OPENLINEAGE_MALFORMED = [
    ("job__facets__sourceCodeLocation__version", "abc\x1b[2Jdef", "sourceCodeLocation.version"),
    ("job__facets__sourceCodeLocation__version", "abc def", "sourceCodeLocation.version"),
    ("job__facets__sourceCodeLocation__version", "a" * 2048, "sourceCodeLocation.version"),
    ("inputs__0__facets__version__datasetVersion", "v\x1b]0;x\x07", "inputs[0].facets.version"),
    ("inputs__0__facets__version__datasetVersion", "v" * 513, "inputs[0].facets.version"),
    ("inputs__0__name", "t\n.csv", "inputs[0].name"),
    ("run__runId", "r\nx", "run.runId"),
    ("job__name", "train\u202e", "job.name"),
    ("outputs__0__name", "models:/ol\x1bm/1", "outputs[0].name"),
    ("run__facets", {"predtrace": {"model": {"name": "m", "version": "1 "}}}, "model.version"),
    (
        "run__facets",
        {"predtrace": {"model": {"name": "m", "version": "1", "artifact_digest": "a b"}}},
        "model.artifact_digest",
    ),
]


@pytest.mark.parametrize(("path", "value", "field"), OPENLINEAGE_MALFORMED)
def test_a_malformed_openlineage_value_refuses_the_event_naming_its_field(
    path: str, value: object, field: str
) -> None:
    with pytest.raises(LineageError) as raised:
        parse_run_event(_run_event(**{path: value}))
    assert field in str(raised.value)


def test_an_input_named_past_the_limit_is_refused_naming_the_input() -> None:
    # Was "dataset.digest must be at most 2048 characters": a field not sent.
    event = _run_event(inputs__0__namespace="s3://" + "b" * 1500, inputs__0__name="c" * 1000)
    del event["inputs"][0]["facets"]
    with pytest.raises(LineageError) as raised:
        parse_run_event(event)
    assert str(raised.value) == (
        "inputs[0]: namespace and name must be at most 2048 characters together, not 2506"
    )


def test_an_openlineage_dataset_version_may_be_any_printable_text() -> None:
    registration = parse_run_event(_run_event())
    assert [d.digest for d in registration.datasets] == ["2026-01-01 00:00:00"]
    assert registration.commit is not None and registration.commit.sha == SHA


MLFLOW_VERSION = {
    "name": "churn",
    "version": "3",
    "run_id": "abc",
    "source": "runs:/abc/model\x1b[2J",
    "tags": [{"key": "predtrace.artifact_digest", "value": "not a digest"}],
}
MLFLOW_RUN = {
    "info": {"run_id": "abc", "run_name": "train\x1b]0;TITLE\x07", "experiment_id": "0"},
    "data": {
        "params": [{"key": "lr", "value": "0.1"}, {"key": "evil", "value": "x\x1b[2J"}],
        "metrics": [{"key": "auc", "value": 0.9}, {"key": "a\nb", "value": 1.0}],
        "tags": [
            {"key": "mlflow.source.git.commit", "value": "main branch"},
            {"key": "mlflow.note.content", "value": "# notes\n\n- line"},
            {"key": "bidi", "value": "\u202eoops"},
        ],
    },
    "inputs": {
        "dataset_inputs": [
            {"dataset": {"name": "bad", "digest": "sha256:\x1b[2J"}},
            {"dataset": {"name": "two words", "digest": "digest with spaces"}},
            {
                "tags": [{"key": "mlflow.data.context", "value": "training\nFAKE"}],
                "dataset": {"name": "train\u202e", "digest": "d1", "source": "s3://b/t.csv"},
            },
        ]
    },
}


def test_malformed_mlflow_values_are_left_out_or_cleaned_and_counted_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="predtrace.collector.mlflow"):
        registration = registration_from_mlflow(MLFLOW_VERSION, MLFLOW_RUN, "http://127.0.0.1:1")
    model, run = registration.model, registration.run
    assert model is not None and run is not None
    assert model.source == "runs:/abc/model\ufffd[2J"
    assert model.artifact_digest == ""
    assert run.name == "train\ufffd]0;TITLE\ufffd"
    assert run.params == {"lr": "0.1"}
    assert run.metrics == {"auc": 0.9}
    assert set(run.tags) == {"mlflow.source.git.commit", "mlflow.note.content"}
    assert registration.commit is None, "a commit that is not one is left out"
    assert [(d.digest, d.name, d.context) for d in registration.datasets] == [
        ("d1", "train\ufffd", "training\ufffdFAKE")
    ]
    [record] = caplog.records
    message = record.getMessage()
    assert "MLflow lineage of churn/3: 11 value(s) left out or changed" in message
    assert "dataset digest x2" in message and "commit x1" in message


def test_a_clean_mlflow_answer_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    run = {"info": {"run_id": "abc"}, "data": {"tags": [{"key": "k", "value": "multi\nline"}]}}
    with caplog.at_level(logging.WARNING, logger="predtrace.collector.mlflow"):
        registration_from_mlflow({"name": "churn", "version": "3"}, run, "http://127.0.0.1:1")
    assert caplog.records == []


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


async def _post(url: str, body: object) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def test_the_collector_answers_400_naming_the_field_for_each_malformed_class(
    collector: RunningCollector,
) -> None:
    for what, body, field in MALFORMED:
        status, answer = await _post(f"{collector.url}/v1/lineage", body)
        assert status == 400 and field in answer["error"], (what, status, answer)
    for path, value, field in OPENLINEAGE_MALFORMED:
        status, answer = await _post(f"{collector.url}/v1/openlineage", _run_event(**{path: value}))
        assert status == 400 and field in answer["error"], (path, status, answer)
    # Nothing of a refused body was stored.
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{collector.url}/v1/models/m/versions/1/lineage") as resp,
    ):
        assert resp.status == 404, await resp.text()


async def test_the_collector_still_stores_valid_lineage_as_sent(
    collector: RunningCollector,
) -> None:
    for index, (what, valid) in enumerate(VALID):
        # A model and run of its own each: no body contradicts another's links.
        body = {**valid, "model": {**valid["model"], "version": f"v{index}"}}
        body["run"] = {**valid["run"], "id": f"{valid['run']['id']}-{index}"}
        status, answer = await _post(f"{collector.url}/v1/lineage", body)
        assert status == 201, (what, answer)
    status, _ = await _post(f"{collector.url}/v1/openlineage", _run_event())
    assert status == 201
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{collector.url}/v1/models/olm/versions/1/lineage") as resp,
    ):
        lineage = await resp.json()
    assert [d["digest"] for d in lineage["run"]["datasets"]] == ["2026-01-01 00:00:00"]
    assert lineage["run"]["commit"]["sha"] == SHA

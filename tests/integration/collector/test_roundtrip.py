"""Ingest -> query round trip through `predtrace collector serve`, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.collector.testing import ChainedProducer, make_events
from predtrace.sidecar.pipeline._collector_http import CollectorClient, CollectorClientConfig
from predtrace.wire import IngestAck

from .conftest import Served

pytestmark = pytest.mark.integration
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
ORPHAN_TRACE = "0af7651916cd43dd8448eb211c80319c"
SHA = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"


async def _send(url: str, bodies: list[bytes]) -> list[IngestAck]:
    client = CollectorClient(CollectorClientConfig(url=url))
    try:
        return [await client.send(body, compressed=True) for body in bodies]
    finally:
        await client.close()


def cli(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={"PREDTRACE_COLLECTOR_URL": url})
    return result.exit_code, result.stdout, result.stderr


def test_ingest_then_pivot_impact_and_completeness(
    serve_collector: Callable[..., Served], db_url: str
) -> None:
    served = serve_collector(db_url)
    producer = ChainedProducer("sidecar-a")
    bodies = [
        producer.body(make_events(20, trace_id=bytes.fromhex(TRACE)), compress=True),
        producer.body(make_events(30), compress=True),
        producer.body(
            make_events(5, trace_id=bytes.fromhex(ORPHAN_TRACE), model=("other", "1")),
            compress=True,
        ),
    ]
    acks = asyncio.run(_send(served.url, [*bodies, bodies[0]]))
    assert [(a.accepted, a.duplicate) for a in acks] == [
        (20, False),
        (30, False),
        (5, False),
        (20, True),
    ]

    code, out, err = cli(
        served.url,
        "lineage",
        "register",
        "--model",
        "churn/3",
        "--alias",
        "prod",
        "--run-id",
        "run-42",
        "--param",
        "lr=0.1",
        "--metric",
        "auc=0.91",
        "--dataset",
        "sha256:train=s3://b/train.csv",
        "--commit",
        SHA,
        "--repo",
        "https://git.example/churn",
        "--image",
        "sha256:image-churn-3",
    )
    assert code == 0, err

    code, out, err = cli(served.url, "trace", TRACE, "-o", "json")
    assert code == 0, err
    answer = json.loads(out)
    assert len(answer["predictions"]) == 20 and answer["complete"]
    lineage = answer["predictions"][0]["lineage"]
    assert lineage["run"]["commit"]["sha"] == SHA
    assert lineage["run"]["datasets"][0]["digest"] == "sha256:train"

    code, out, err = cli(served.url, "trace", TRACE)
    assert code == 0 and SHA in out and "sha256:train" in out

    code, out, err = cli(served.url, "trace", ORPHAN_TRACE)
    assert code == 1
    assert "chain broken" in err and "model_version" in err

    prediction_id = answer["predictions"][3]["prediction_id"]
    code, out, _ = cli(served.url, "trace", prediction_id, "-o", "json")
    assert code == 0 and [p["prediction_id"] for p in json.loads(out)["predictions"]] == [
        prediction_id
    ]

    code, out, err = cli(served.url, "model", "lineage", "churn@prod", "-o", "json")
    assert code == 0, err
    assert json.loads(out)["predictions"] == 50

    code, out, _ = cli(served.url, "impact", "--commit", SHA[:10], "-o", "json")
    assert code == 0 and json.loads(out)["predictions"] == 50

    code, out, _ = cli(served.url, "completeness", "-o", "json")
    report = json.loads(out)
    assert (report["predictions"], report["complete"]) == (55, 50)
    code, _, err = cli(served.url, "completeness", "--fail-under", "0.95")
    assert code == 1 and "below" in err

    with urllib.request.urlopen(f"{served.url}/metrics") as resp:  # noqa: S310 - loopback
        metrics = resp.read().decode()
    assert 'predtrace_collector_batches_total{outcome="duplicate"} 1.0' in metrics


def test_cli_exit_codes_for_unknown_and_malformed_ids(
    serve_collector: Callable[..., Served], tmp_path: object
) -> None:
    served = serve_collector(f"sqlite:///{tmp_path}/c.db")
    code, _, err = cli(served.url, "trace", TRACE)
    assert code == 1 and "no prediction found" in err
    code, _, _ = cli(served.url, "trace", "not an id at all")
    assert code == 2
    code, _, _ = cli(served.url, "impact")
    assert code == 2
    code, _, err = cli(served.url, "model", "lineage", "churn/404")
    assert code == 1 and "not registered" in err
    code, _, err = cli("http://127.0.0.1:9", "trace", TRACE)
    assert code == 1 and "cannot reach the collector" in err


OPENLINEAGE = {
    "eventType": "COMPLETE",
    "eventTime": "2026-01-01T00:00:00Z",
    "run": {"runId": "0190a5b0-0000-7000-8000-000000000042"},
    "job": {
        "namespace": "ml",
        "name": "train_churn",
        "facets": {
            "sourceCodeLocation": {
                "type": "git",
                "url": "https://git.example/churn",
                "version": SHA,
            }
        },
    },
    "inputs": [
        {
            "namespace": "s3://b",
            "name": "train.csv",
            "facets": {"version": {"datasetVersion": "sha256:ol-train"}},
        }
    ],
    "outputs": [{"namespace": "mlflow", "name": "models:/churn/3"}],
}


def test_an_openlineage_event_produces_the_same_chain(
    serve_collector: Callable[..., Served], tmp_path: object
) -> None:
    served = serve_collector(f"sqlite:///{tmp_path}/c.db")
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{served.url}/v1/openlineage",
        data=json.dumps(OPENLINEAGE).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request) as resp:  # noqa: S310 - loopback
        assert resp.status == 201
    asyncio.run(
        _send(
            served.url, [ChainedProducer("p").body(make_events(3, trace_id=bytes.fromhex(TRACE)))]
        )
    )
    code, out, err = cli(served.url, "trace", TRACE, "-o", "json")
    lineage = json.loads(out)["predictions"][0]["lineage"]
    assert lineage["run"]["id"] == OPENLINEAGE["run"]["runId"]  # type: ignore[index]
    assert lineage["run"]["commit"]["sha"] == SHA
    assert [d["digest"] for d in lineage["run"]["datasets"]] == ["sha256:ol-train"]
    assert code == 0, err


def test_lineage_register_fails_loudly_when_the_collector_refuses_the_body(
    serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    served = serve_collector(f"sqlite:///{tmp_path}/c.db")
    big = tmp_path / "big.json"  # over the collector's 1 MiB lineage body limit: 413
    big.write_text(json.dumps({"run": {"id": "r", "name": "x" * (2 * 1024 * 1024)}}))
    code, out, err = cli(served.url, "lineage", "register", "--file", str(big))
    assert code == 1 and "registered" not in out
    assert "413" in err


def test_a_contradicting_registration_is_409_until_replace_says_so(
    serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    served = serve_collector(f"sqlite:///{tmp_path}/c.db")
    first = ["lineage", "register", "--model", "churn/3", "--run-id", "run-42", "--commit", SHA]
    assert cli(served.url, *first)[0] == 0
    other = [*first[:-1], "0badc0de"]
    code, out, err = cli(served.url, *other)
    assert code == 1 and "registered" not in out
    assert f"409: run run-42 is built from commit {SHA}, not 0badc0de" in err
    assert "replace" in err

    url = f"{served.url}/v1/lineage?replace=maybe"
    request = urllib.request.Request(url, data=b"{}", method="POST")  # noqa: S310 - loopback
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
    refused.value.close()  # an HTTPError holds the response and its socket
    assert refused.value.code == 400

    code, out, err = cli(served.url, *other, "--replace")
    assert code == 0, err
    _, out, _ = cli(served.url, "model", "lineage", "churn/3", "-o", "json")  # 1: chain incomplete
    assert json.loads(out)["run"]["commit"]["sha"] == "0badc0de"

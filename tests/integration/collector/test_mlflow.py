"""The MLflow pivot against a real MLflow server: trace id -> run -> dataset digest -> commit.

And against an MLflow that answers badly, hangs or is unreachable (a fake on
127.0.0.1, port 0): queries still answer from the store, with the hop missing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import MlflowConfig, MlflowRegistry
from predtrace.collector.store import open_store
from predtrace.collector.testing import ChainedProducer, make_events

from .conftest import Served
from .test_roundtrip import _send, cli

pytestmark = [pytest.mark.integration, pytest.mark.mlflow]
TRACE = "5bf92f3577b34da6a3ce929d0e0e4737"
SHA = "9a8b7c6d5e4f30211a2b3c4d5e6f708192a3b4c5"


def _mlflow(base: str, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{base}/api/2.0/mlflow/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read() or b"{}")  # type: ignore[no-any-return]


def register_model(base: str, name: str) -> str:
    """Register a model version from a run that logged a dataset and a commit (REST only)."""
    run = _mlflow(base, "runs/create", {"experiment_id": "0", "run_name": "train", "start_time": 1})
    run_id = str(run["run"]["info"]["run_id"])  # type: ignore[index]
    _mlflow(base, "runs/log-parameter", {"run_id": run_id, "key": "lr", "value": "0.1"})
    _mlflow(
        base,
        "runs/log-metric",
        {"run_id": run_id, "key": "auc", "value": 0.91, "timestamp": 1, "step": 0},
    )
    dataset = {
        "name": "churn-train",
        "digest": "d1g3st42",
        "source_type": "local",
        "source": json.dumps({"uri": "s3://bucket/train.csv"}),
    }
    _mlflow(
        base,
        "runs/log-inputs",
        {
            "run_id": run_id,
            "datasets": [
                {"tags": [{"key": "mlflow.data.context", "value": "training"}], "dataset": dataset}
            ],
        },
    )
    _mlflow(
        base, "runs/set-tag", {"run_id": run_id, "key": "mlflow.source.git.commit", "value": SHA}
    )
    _mlflow(
        base,
        "runs/set-tag",
        {"run_id": run_id, "key": "mlflow.source.git.repoURL", "value": "https://git.example/m"},
    )
    _mlflow(base, "registered-models/create", {"name": name})
    version = _mlflow(
        base,
        "model-versions/create",
        {"name": name, "source": f"runs:/{run_id}/model", "run_id": run_id},
    )
    number = str(version["model_version"]["version"])  # type: ignore[index]
    _mlflow(base, "registered-models/alias", {"name": name, "alias": "champion", "version": number})
    return run_id


def test_trace_resolves_run_dataset_and_commit_from_mlflow(
    mlflow_server: str, serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    run_id = register_model(mlflow_server, "churn-mlflow")
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", mlflow_server)
    events = make_events(4, trace_id=bytes.fromhex(TRACE), model=("churn-mlflow", "1"))
    asyncio.run(_send(served.url, [ChainedProducer("p").body(events)]))

    code, out, err = cli(served.url, "trace", TRACE, "-o", "json")
    assert code == 0, err
    lineage = json.loads(out)["predictions"][0]["lineage"]
    assert lineage["model_version"]["registry"] == "mlflow"
    assert lineage["model_version"]["aliases"] == ["champion"]
    assert lineage["run"]["id"] == run_id
    assert lineage["run"]["params"] == {"lr": "0.1"}
    assert lineage["run"]["metrics"] == {"auc": 0.91}
    assert lineage["run"]["datasets"] == [
        {
            "digest": "d1g3st42",
            "source": "s3://bucket/train.csv",
            "name": "churn-train",
            "context": "training",
        }
    ]
    assert lineage["run"]["commit"] == {"sha": SHA, "repo": "https://git.example/m"}


def test_model_lineage_by_alias_asks_mlflow_when_the_store_does_not_know(
    mlflow_server: str, serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    run_id = register_model(mlflow_server, "fraud-mlflow")
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", mlflow_server)
    code, out, err = cli(served.url, "model", "lineage", "fraud-mlflow@champion", "-o", "json")
    answer = json.loads(out)
    assert answer["run"]["id"] == run_id
    assert answer["run"]["commit"]["sha"] == SHA
    assert code == 1 and "deployment" in err  # registered, but nothing serves it yet


def _new_version(base: str, name: str) -> str:
    """Another version of a registered model, from a run of its own."""
    run = _mlflow(base, "runs/create", {"experiment_id": "0", "run_name": "retrain"})
    run_id = str(run["run"]["info"]["run_id"])  # type: ignore[index]
    version = _mlflow(
        base,
        "model-versions/create",
        {"name": name, "source": f"runs:/{run_id}/model", "run_id": run_id},
    )
    return str(version["model_version"]["version"])  # type: ignore[index]


def test_a_prediction_naming_only_an_alias_is_resolved_through_mlflow(
    mlflow_server: str, serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    run_id = register_model(mlflow_server, "alias-only-mlflow")
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", mlflow_server)
    producer = ChainedProducer("p")
    early, trace = "6bf92f3577b34da6a3ce929d0e0e4739", "7bf92f3577b34da6a3ce929d0e0e4739"

    def alias_only(trace_id: str) -> bytes:
        events = make_events(
            2, trace_id=bytes.fromhex(trace_id), model=("alias-only-mlflow", ""), alias="champion"
        )
        return producer.body(events)

    # Served before the collector first asked MLflow where champion points:
    # MLflow says where an alias is now, not since when, so which version
    # served these is not known.
    asyncio.run(_send(served.url, [alias_only(early)]))
    code, out, err = cli(served.url, "model", "lineage", "alias-only-mlflow@champion", "-o", "json")
    assert json.loads(out)["model_version"]["version"] == "1", err
    asyncio.run(_send(served.url, [alias_only(trace)]))

    _, out, err = cli(served.url, "trace", trace, "-o", "json")
    lineage = json.loads(out)["predictions"][0]["lineage"]
    assert lineage["model_version"]["version"] == "1", err
    assert lineage["model_version"]["resolved_via_alias"] == "champion"
    assert lineage["run"]["id"] == run_id
    assert "model_version" not in [m["hop"] for m in lineage["missing"]]
    code, out, err = cli(served.url, "trace", early, "-o", "json")
    lineage = json.loads(out)["predictions"][0]["lineage"]
    assert code == 1 and lineage["model_version"] is None
    assert "or first made known to the store" in err


async def test_an_alias_moved_in_mlflow_wins_once_the_cached_answer_is_stale(
    mlflow_server: str, tmp_path: Path
) -> None:
    register_model(mlflow_server, "moved-mlflow")  # version 1, champion -> 1
    second = _new_version(mlflow_server, "moved-mlflow")
    now = [1000.0]
    registry = MlflowRegistry(MlflowConfig(url=mlflow_server, ttl=300), clock=lambda: now[0])
    store = open_store(f"sqlite:///{tmp_path}/c.db")
    await store.open()
    service = LineageService(store, registry, CollectorMetrics())
    try:
        assert await service.resolve_alias("moved-mlflow", "champion") == "1"
        body = {"name": "moved-mlflow", "alias": "champion", "version": second}
        await asyncio.to_thread(_mlflow, mlflow_server, "registered-models/alias", body)
        assert await service.resolve_alias("moved-mlflow", "champion") == "1"  # cached

        now[0] += 301
        assert await service.resolve_alias("moved-mlflow", "champion") == second
        assert await store.resolve_alias("moved-mlflow", "champion") == second
        assert await service.resolve_alias("moved-mlflow", "never-set") is None
    finally:
        await service.close()
        await store.close()


class _BadMlflow(ThreadingHTTPServer):
    """An MLflow that answers malformed JSON (aliases as text, run info a list) or hangs."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _BadMlflowHandler)
        self.mode = "malformed"
        self.requests = 0
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _BadMlflowHandler(BaseHTTPRequestHandler):
    server: _BadMlflow

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests += 1
        if self.server.mode == "hang":
            self.server.release.wait(60)
            return
        if "/runs/get" in self.path:
            answer: object = {"run": {"info": [1], "data": {}}}
        else:
            version = {"name": "bad", "version": "1", "run_id": "r-1", "aliases": "champ"}
            answer = {"model_version": [1] if "registered-models/alias" in self.path else version}
        body = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def bad_mlflow() -> Iterator[_BadMlflow]:
    server = _BadMlflow()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_malformed_mlflow_answer_leaves_the_hop_missing_instead_of_a_500(
    bad_mlflow: _BadMlflow, serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", bad_mlflow.url)
    trace = "8bf92f3577b34da6a3ce929d0e0e473a"
    events = make_events(2, trace_id=bytes.fromhex(trace), model=("bad", "1"))
    asyncio.run(_send(served.url, [ChainedProducer("p").body(events)]))

    code, out, err = cli(served.url, "trace", trace, "-o", "json")
    lineage = json.loads(out)["predictions"][0]["lineage"]
    assert code == 1 and lineage["model_version"] is None
    reason = {m["hop"]: m["reason"] for m in lineage["missing"]}["model_version"]
    assert "the MLflow lookup failed: MLflow sent model_version.aliases as text" in reason

    code, out, err = cli(served.url, "completeness", "-o", "json")
    assert json.loads(out)["models"][0]["missing"]["model_version"] == 2, err
    code, out, err = cli(served.url, "model", "lineage", "bad/1", "--retry-for", "0")
    assert code == 1
    assert "503: model version bad/1 is not in the store; the MLflow lookup failed" in err
    code, out, err = cli(served.url, "model", "lineage", "bad@champ", "--retry-for", "0")
    assert "503: alias bad@champ is not in the store; the MLflow lookup failed" in err
    assert "Traceback" not in served.log.read_text()


def test_a_hung_mlflow_delays_one_query_and_is_then_not_asked_again(
    bad_mlflow: _BadMlflow, serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", bad_mlflow.url)
    trace = "9bf92f3577b34da6a3ce929d0e0e473b"
    producer = ChainedProducer("p")
    bodies = [
        producer.body(make_events(1, trace_id=bytes.fromhex(trace), model=("hung", str(v))))
        for v in range(1, 9)
    ]
    asyncio.run(_send(served.url, bodies))
    bad_mlflow.mode = "hang"

    _, out, err = cli(served.url, "completeness", "-o", "json", "--retry-for", "0")
    assert json.loads(out)["models"][0]["missing"]["model_version"] == 8, err
    asked = bad_mlflow.requests
    assert 1 <= asked <= 4  # side by side, a few at once, within one deadline

    _, out, _ = cli(served.url, "trace", trace, "-o", "json", "--retry-for", "0")
    lineage = json.loads(out)["predictions"][0]["lineage"]
    reason = {m["hop"]: m["reason"] for m in lineage["missing"]}["model_version"]
    assert "did not answer within" in reason
    cli(served.url, "completeness", "-o", "json", "--retry-for", "0")
    assert bad_mlflow.requests == asked  # the failure is remembered: nobody waits again


def test_an_unreachable_mlflow_answers_503_naming_it_not_not_registered(
    serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    served = serve_collector(f"sqlite:///{tmp_path}/c.db", "--mlflow", url)
    code, _, err = cli(served.url, "model", "lineage", "rec/1", "--retry-for", "0")
    assert code == 1
    assert "503: model version rec/1 is not in the store; the MLflow lookup failed" in err
    assert "MLflow unreachable" in err
    assert "is not registered" not in err

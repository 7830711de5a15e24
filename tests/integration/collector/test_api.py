"""The query API and `predtrace trace` against `predtrace collector serve`: lookups that
must find what ingest stored, and answers that must say what they left out."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.collector.testing import ChainedProducer, make_events
from predtrace.wire import PredictionEvent, decode_ack

from .conftest import Served, stop

pytestmark = pytest.mark.integration
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
LINEAGE = {
    "model": {"name": "churn", "version": "3"},
    "run": {"id": "run-42"},
    "datasets": [{"digest": "sha256:train"}],
    "commit": {"sha": "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"},
    "image": {"digest": "sha256:image-churn-3"},
    "deployment": {"id": "churn-prod"},
}


def cli(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env={"PREDTRACE_COLLECTOR_URL": url})
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    return result.exit_code, result.stdout, result.stderr


def get(url: str) -> tuple[int, str, dict[str, object]]:
    """Status, content type and JSON body of a GET (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:  # noqa: S310 - loopback
            status, ctype, raw = resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, ctype, raw = exc.code, exc.headers["Content-Type"], exc.read()
    return status, ctype, json.loads(raw) if ctype.startswith("application/json") else {}


def post_json(url: str, body: object) -> int:
    data = json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - loopback
        url, data=data, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
        return int(resp.status)


def send(url: str, producer: str, events: list[PredictionEvent]) -> None:
    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{url}/v1/batches",
        data=ChainedProducer(producer).body(events),
        headers={"Content-Type": "application/vnd.predtrace.batch+msgpack"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as resp:  # noqa: S310 - loopback
        ack = decode_ack(resp.read())
    assert ack.accepted == len(events), ack


@pytest.fixture
def served(serve_collector: Callable[..., Served], db_url: str) -> Served:
    """A collector on each store (SQLite, PostgreSQL)."""
    return serve_collector(db_url)


@pytest.mark.parametrize(
    "stored",
    [
        "83aae1e491c34cb38bf1413c1a7703d2",  # .NET Guid.ToString("N")
        "6171FCAE-2F54-46B8-BCA7-D147BCEB6835",  # upper case
    ],
)
def test_a_uuid_prediction_id_stored_in_another_spelling_is_found_by_that_spelling(
    served: Served, stored: str
) -> None:
    canonical = str(uuid.uuid4())
    events = [
        replace(e, prediction_id=p)
        for e, p in zip(make_events(2), (stored, canonical), strict=True)
    ]
    send(served.url, "p", events)
    post_json(f"{served.url}/v1/lineage", LINEAGE)
    status, _, body = get(f"{served.url}/v1/predictions/{stored}")
    assert status == 200, body
    assert [p["prediction_id"] for p in body["predictions"]] == [stored]  # type: ignore[attr-defined]
    code, out, err = cli(served.url, "trace", stored, "-o", "json")
    assert code == 0, err
    assert [p["prediction_id"] for p in json.loads(out)["predictions"]] == [stored]
    # An id stored in canonical form is still found by its other spellings.
    for given in (canonical.upper(), canonical.replace("-", "")):
        status, _, body = get(f"{served.url}/v1/predictions/{given}")
        assert status == 200, (given, body)


def test_a_uuid_stored_in_any_spelling_is_found_by_any_other(served: Served) -> None:
    ids = [str(uuid.uuid4()) for _ in range(4)]
    stored = [ids[0].upper(), ids[1].replace("-", ""), ids[2].replace("-", "").upper(), ids[3]]
    events = [replace(e, prediction_id=p) for e, p in zip(make_events(4), stored, strict=True)]
    send(served.url, "p", events)
    for canonical, kept in zip(ids, stored, strict=True):
        bare = canonical.replace("-", "")
        for given in (canonical, canonical.upper(), bare, bare.upper(), f"urn:uuid:{canonical}"):
            code, out, err = cli(served.url, "trace", given, "-o", "json")
            assert code in (0, 1) and out, (kept, given, err)  # found (its chain is broken)
            assert [p["prediction_id"] for p in json.loads(out)["predictions"]] == [kept]


def test_impact_by_a_short_sha_of_two_commits_refuses_like_git(served: Served) -> None:
    first, second = "abcdef1" + "1" * 33, "abcdef1" + "2" * 33
    for version, sha in (("1", first), ("2", second)):
        body = {"model": {"name": "m", "version": version}, "run": {"id": f"r{version}"}}
        assert post_json(f"{served.url}/v1/lineage", {**body, "commit": {"sha": sha}}) == 201
    send(served.url, "p", make_events(3, model=("m", "1")) + make_events(4, model=("m", "2")))
    status, _, body = get(f"{served.url}/v1/impact?commit=abcdef1")
    assert (status, body.get("matches")) == (400, [first, second]), body
    code, out, err = cli(served.url, "impact", "--commit", "abcdef1")
    assert code == 2 and not out
    assert f"prefix of 2 commits ({first}, {second}); give more digits" in err
    code, out, err = cli(served.url, "impact", "--commit", "abcdef12")
    assert code == 0, err
    assert "4 prediction(s)" in out and f"commit: {second}" in out


def test_model_lineage_names_why_each_hop_is_missing(served: Served) -> None:
    body = {"model": {"name": "m2", "version": "1"}, "run": {"id": "r-m2"}}
    assert post_json(f"{served.url}/v1/lineage", body) == 201
    code, _, err = cli(served.url, "model", "lineage", "m2/1")
    assert code == 1
    assert "chain broken: datasets: run r-m2 logged no dataset inputs" in err
    assert "chain broken: commit: run r-m2 has no commit" in err
    assert "not registered" not in err


def test_ids_holding_braces_are_reachable_on_every_route(served: Served) -> None:
    prediction_id, producer = "req-{42}", "edge-{7}"
    event = replace(make_events(1)[0], prediction_id=prediction_id)
    event = replace(event, model=replace(event.model, name="m{x}", version="1"))
    send(served.url, producer, [event])
    registration = {"model": {"name": "m{x}", "version": "1", "aliases": ["c{1}"]}}
    assert post_json(f"{served.url}/v1/lineage", {**registration, "run": {"id": "r"}}) == 201

    def q(text: str) -> str:
        return quote(text, safe="")

    for path, found in (
        (f"/v1/predictions/{q(prediction_id)}", "predictions"),
        (f"/v1/producers/{q(producer)}", "producer_id"),
        (f"/v1/models/{q('m{x}')}/versions/1/lineage", "model_version"),
        (f"/v1/models/{q('m{x}')}/aliases/{q('c{1}')}/lineage", "model_version"),
    ):
        status, ctype, body = get(served.url + path)
        assert (status, found in body) == (200, True), (path, status, ctype, body)
    status, ctype, body = get(f"{served.url}/v1/traces/{q('{x}')}")
    assert (status, "error" in body) == (400, True), (ctype, body)
    assert cli(served.url, "trace", prediction_id)[0] == 1  # found; its chain has no commit
    _, _, err = cli(served.url, "model", "lineage", "m{x}/1")
    assert "chain broken" in err and "not found" not in err, err


def test_a_trace_past_the_row_limit_says_so_and_names_the_hop_broken_after_it(
    served: Served,
) -> None:
    post_json(f"{served.url}/v1/lineage", LINEAGE)
    trace_id = bytes.fromhex(TRACE)
    good = make_events(1000, trace_id=trace_id, timestamp_ns=1_000_000)
    bad = make_events(1, trace_id=trace_id, model=("churn", "999"), timestamp_ns=2_000_000)
    send(served.url, "p", [*good, *bad])
    status, _, body = get(f"{served.url}/v1/traces/{TRACE}")
    assert status == 200
    assert len(body["predictions"]) == 1000  # type: ignore[arg-type]
    assert (body["truncated"], body["total"], body["complete"]) == (True, 1001, False)
    code, _, err = cli(served.url, "trace", TRACE, "-o", "json")
    assert code == 1
    assert "answer truncated: 1000 of 1001" in err
    assert "churn/999" in err and "model_version" in err


def test_a_trace_answer_stops_at_its_byte_budget_and_says_so(served: Served) -> None:
    post_json(f"{served.url}/v1/lineage", LINEAGE)
    # 3 MB of control characters: 18 MB as JSON (\u0001), past the 16 MiB budget.
    huge = {f"k{i}": "\x01" * 60_000 for i in range(50)}
    small = make_events(1, trace_id=bytes.fromhex(TRACE), timestamp_ns=1)
    event = replace(make_events(1, trace_id=bytes.fromhex(TRACE))[0], attributes=huge)
    send(served.url, "p", [*small, event])
    status, _, body = get(f"{served.url}/v1/traces/{TRACE}")
    assert status == 200
    assert len(body["predictions"]) == 1  # type: ignore[arg-type]
    assert (body["truncated"], body["truncated_by"], body["total"]) == (True, "bytes", 2)
    assert body["complete"] is True, "the unlisted prediction's chain was checked too"
    code, _, err = cli(served.url, "trace", TRACE)
    assert code == 0, err  # found, and every chain checked complete: see _cli
    assert "answer truncated: 1 of 2" in err


def test_serve_says_where_it_listens_and_takes_its_ready_file_away_on_exit(
    serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    db = tmp_path / "c.db"
    served = serve_collector(f"sqlite:///{db}")
    ready = tmp_path / "ready-0"
    assert ready.exists()
    stop(served.process)
    assert served.process.returncode == 0
    assert not ready.exists()  # a supervisor polling it must not find a dead address
    assert f"collector ready on {served.url} (store sqlite:///{db})" in served.log.read_text()


def test_the_store_named_in_the_log_carries_no_password() -> None:
    from predtrace.collector._server import _store_name  # noqa: PLC0415

    assert _store_name("postgresql://pt:s3cret@db:5432/p") == "postgresql://***@db:5432/p"
    assert _store_name("sqlite:////var/lib/p.db") == "sqlite:////var/lib/p.db"


def test_a_path_in_the_collector_url_is_named_not_read_as_no_prediction_found(
    serve_collector: Callable[..., Served], tmp_path: Path
) -> None:
    served = serve_collector(f"sqlite:///{tmp_path}/c.db")
    unknown = "4bf92f3577b34da6a3ce929d0e0e4736"
    # The collector's own "not found" (JSON) still means not found, exit 1.
    found = CliRunner().invoke(main, ["trace", unknown, "--collector", served.url])
    assert found.exit_code == 1 and f"no prediction found for {unknown}" in found.stderr
    # Its route miss (text 404, a path prefix in --collector) is not about the id.
    wrong = CliRunner().invoke(main, ["trace", unknown, "--collector", served.url + "/predtrace"])
    assert wrong.exit_code == 1
    assert "no prediction found" not in wrong.stderr
    assert "is --collector the collector's base URL" in wrong.stderr

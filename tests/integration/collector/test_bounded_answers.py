"""`predtrace collector serve` answers list queries a page at a time, and a NUL in a
query value is a 400 on each store (PostgreSQL once answered it 503, "retry")."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from predtrace.collector.testing import make_events

from .conftest import Served
from .test_api import cli, get, send

pytestmark = pytest.mark.integration


@pytest.fixture
def served(serve_collector: Callable[..., Served], db_url: str) -> Served:
    """A collector on each store (SQLite, PostgreSQL)."""
    return serve_collector(db_url)


def test_producers_and_completeness_come_a_page_at_a_time(served: Served) -> None:
    for i in range(3):
        send(served.url, f"edge-{i}", make_events(2, model=(f"m{i}", "1")))
    status, _, body = get(f"{served.url}/v1/producers?limit=2")
    assert status == 200
    assert [p["producer_id"] for p in body["producers"]] == ["edge-0", "edge-1"]  # type: ignore[attr-defined]
    assert (body["total"], body["truncated"], body["next_after"]) == (3, True, "edge-1")
    status, _, body = get(f"{served.url}/v1/producers?limit=2&after=edge-1")
    assert [p["producer_id"] for p in body["producers"]] == ["edge-2"]  # type: ignore[attr-defined]
    assert (body["total"], body["truncated"]) == (3, False)

    code, out, err = cli(served.url, "completeness", "--limit", "2", "-o", "json")
    assert code == 0, err
    answer = json.loads(out)
    assert [m["model"] for m in answer["models"]] == ["m0", "m1"]
    assert (answer["predictions"], answer["total"], answer["truncated"]) == (6, 3, True)
    assert "next: predtrace completeness --after m1 --limit 2" in err
    code, out, err = cli(served.url, "completeness", "--after", "m1")
    assert code == 0 and "truncated" not in err, err
    assert "m2" in out and "m0" not in out


@pytest.mark.parametrize(
    "path",
    ["/v1/producers/a%00b", "/v1/impact?commit=abc%00def", "/v1/models/%00/versions/1/lineage"],
)
def test_a_nul_in_a_query_value_is_a_400_not_a_store_outage(served: Served, path: str) -> None:
    status, _, body = get(served.url + path)
    assert status == 400, body
    assert "NUL character" in str(body["error"])

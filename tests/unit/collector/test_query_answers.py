"""What the query answers say: an ambiguous short sha, why a model lineage hop is
missing, and the titles of the tables (alias-only chains, truncated answers)."""

from __future__ import annotations

import pytest

from predtrace.collector._api import _uuid_spellings
from predtrace.collector._render import (
    render_impact,
    render_model_lineage,
    render_pivot,
    terminal_console,
)
from predtrace.collector.lineage import parse_registration
from predtrace.collector.store import Store
from predtrace.collector.store._reads import AmbiguousCommitError

C1 = "abcdef1" + "1" * 33
C2 = "abcdef1" + "2" * 33


def _printed(render: object, answer: dict[str, object]) -> str:
    console = terminal_console()
    console.width = 200
    with console.capture() as capture:
        render(console, answer)  # type: ignore[operator]
    return capture.get()


async def _commits(store: Store) -> None:
    for version, sha in (("1", C1), ("2", C2)):
        body = {"model": {"name": "m", "version": version}, "run": {"id": f"r{version}"}}
        await store.register(parse_registration({**body, "commit": {"sha": sha}}))


async def test_a_short_sha_of_two_commits_is_refused_naming_both(store: Store) -> None:
    await _commits(store)
    with pytest.raises(AmbiguousCommitError) as refused:
        await store.impact("commit", "ABCDEF1")
    assert refused.value.commits == [C1, C2]
    assert "give more digits" in str(refused.value)
    for given, run in ((C2[:8], "r2"), (C1, "r1")):  # one more digit tells them apart
        impact = await store.impact("commit", given)
        assert impact is not None and impact["runs"] == [run]


async def test_a_short_and_a_full_sha_of_one_commit_are_one_commit(store: Store) -> None:
    base = {"model": {"name": "m", "version": "1"}, "run": {"id": "r1"}}
    await store.register(parse_registration({**base, "commit": {"sha": C1[:9]}}))
    other = {"model": {"name": "m", "version": "2"}, "run": {"id": "r2"}}
    await store.register(parse_registration({**other, "commit": {"sha": C1}}))
    impact = await store.impact("commit", C1[:7])
    assert impact is not None
    assert (impact["runs"], impact["node"]) == (["r1", "r2"], {"sha": [C1[:9], C1]})


async def test_model_lineage_says_why_each_hop_is_missing(store: Store) -> None:
    body = {"model": {"name": "m2", "version": "1"}, "run": {"id": "r-m2"}}
    await store.register(parse_registration(body))
    lineage = await store.model_lineage("m2", "1")
    assert lineage is not None
    assert lineage["missing"] == ["commit", "datasets", "image", "deployment"]
    reasons = {m["hop"]: m["reason"] for m in lineage["missing_reasons"]}  # type: ignore[attr-defined]
    assert reasons["commit"] == "run r-m2 has no commit (tag mlflow.source.git.commit)"
    assert reasons["datasets"] == "run r-m2 logged no dataset inputs"
    assert "no image registered for m2/1" in reasons["image"]
    out = _printed(render_model_lineage, lineage)
    assert "run r-m2 logged no dataset inputs" in out and "not registered" not in out

    await store.register(parse_registration({"model": {"name": "m1", "version": "1"}}))
    lineage = await store.model_lineage("m1", "1")
    assert lineage is not None
    reasons = {m["hop"]: m["reason"] for m in lineage["missing_reasons"]}  # type: ignore[attr-defined]
    assert reasons["run"] == "model version m1/1: registered without a run (-)"
    assert reasons["commit"] == "unknown: no training run"


def _prediction(model: dict[str, str], lineage: dict[str, object]) -> dict[str, object]:
    return {
        "prediction_id": "p-1",
        "timestamp": "2026-11-29T10:00:00Z",
        "model": model,
        "deployment": {"id": "prod", "pod": "prod-1"},
        "status": "ok",
        "output": None,
        "lineage": lineage,
    }


def test_an_alias_only_chain_is_titled_by_the_version_it_resolved_to_or_the_alias() -> None:
    alias_only = {"name": "churn", "version": "", "alias": "champion"}
    resolved = {"model_version": {"name": "churn", "version": "4", "aliases": []}, "missing": []}
    out = _printed(
        render_pivot, {"query": "trace t", "predictions": [_prediction(alias_only, resolved)]}
    )
    assert "lineage of churn/4 (@champion)" in out
    assert "churn/ " not in out and "churn/@" not in out
    unknown = {"model_version": None, "missing": [{"hop": "model_version", "reason": "moved"}]}
    out = _printed(
        render_pivot, {"query": "trace t", "predictions": [_prediction(alias_only, unknown)]}
    )
    assert "lineage of churn@champion" in out


def test_a_truncated_pivot_says_how_many_of_how_many_are_shown() -> None:
    model = {"name": "m", "version": "1", "alias": ""}
    answer = {
        "query": "trace t",
        "predictions": [_prediction(model, {"missing": []})] * 3,
        "total": 10_000,
        "truncated": True,
    }
    assert "trace t: 3 of 10,000 prediction(s) shown" in _printed(render_pivot, answer)
    answer = {"query": "trace t", "predictions": [_prediction(model, {"missing": []})], "total": 1}
    assert "trace t: 1 prediction(s)" in _printed(render_pivot, answer)


def test_impact_by_a_short_sha_shows_the_commit_it_found() -> None:
    answer = {
        "query": {"kind": "commit", "value": "abcdef1"},
        "node": {"sha": [C1]},
        "predictions": 3,
        "model_versions": [],
        "runs": ["r1"],
    }
    out = _printed(render_impact, answer)
    assert "impact of commit abcdef1: 3 prediction(s)" in out
    assert f"commit: {C1}\n" in out


def test_a_uuid_is_looked_up_in_every_spelling_a_caller_id_as_given() -> None:
    canonical = "6171fcae-2f54-46b8-bca7-d147bceb6835"
    assert set(_uuid_spellings(canonical)) == {
        canonical,
        canonical.upper(),
        canonical.replace("-", ""),
        canonical.replace("-", "").upper(),
    }
    assert _uuid_spellings("Req-ABC") == ("Req-ABC",)


def test_impact_by_image_says_which_other_spellings_it_found() -> None:
    stored = "ghcr.io/acme/churn@sha256:" + "7" * 64
    answer = {
        "query": {"kind": "image", "value": "sha256:" + "7" * 64},
        "node": {"digest": "sha256:" + "7" * 64, "stored_as": [stored]},
        "predictions": 6,
        "model_versions": [],
        "runs": [],
    }
    assert f"image also stored as: {stored}\n" in _printed(render_impact, answer)

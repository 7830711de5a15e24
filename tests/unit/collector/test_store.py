"""The store, on SQLite and PostgreSQL: idempotent ingest, hash chain, lineage, queries."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import replace

import pytest

from predtrace.collector._errors import LineageConflictError
from predtrace.collector._metrics import CollectorMetrics
from predtrace.collector._service import LineageService
from predtrace.collector.lineage import Registration, parse_registration
from predtrace.collector.store import IngestRecord, PivotAnswer, Store, prediction_row
from predtrace.collector.store._ops import Exec, Fetch
from predtrace.collector.store._writes import ingest_plan
from predtrace.collector.testing import make_events
from predtrace.wire import PredictionEvent

TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
SHA = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c"


def _digest(producer: str, seq: int) -> bytes:
    return hashlib.sha256(f"{producer}/{seq}".encode()).digest()


def record(
    producer: str,
    seq: int,
    events: list[PredictionEvent],
    *,
    prev: bytes | None = None,
    digest: bytes | None = None,
    received_ns: int | None = None,
) -> IngestRecord:
    now = received_ns or time.time_ns()
    return IngestRecord(
        producer_id=producer,
        seq=seq,
        digest=digest if digest is not None else _digest(producer, seq),
        prev_digest=prev if prev is not None else (_digest(producer, seq - 1) if seq > 1 else b""),
        batch_id=b"",
        created_ns=now,
        received_ns=now,
        rows=[prediction_row(e, producer, seq, now) for e in events],
    )


FULL_LINEAGE = {
    "model": {"name": "churn", "version": "3", "aliases": ["prod"]},
    "run": {"id": "run-42", "params": {"lr": "0.1"}, "metrics": {"auc": 0.91}},
    "datasets": [{"digest": "sha256:train", "source": "s3://b/train.csv", "context": "training"}],
    "commit": {"sha": SHA, "repo": "https://git.example/churn"},
    "image": {"digest": "sha256:image-churn-3", "name": "churn:3"},
}


async def test_a_batch_delivered_twice_is_stored_once(store: Store) -> None:
    events = make_events(5, trace_id=TRACE)
    first = await store.ingest(record("p", 1, events))
    again = await store.ingest(record("p", 1, events))
    assert (first.duplicate, first.stored) == (False, 5)
    assert (again.duplicate, again.stored) == (True, 5)
    predictions, _ = await store.pivot("trace_id", TRACE)
    assert len(predictions) == 5
    assert (await store.producer("p"))["batches"] == 1  # type: ignore[index]


async def test_out_of_order_batches_are_each_stored_once_and_the_gap_closes(store: Store) -> None:
    assert (await store.ingest(record("p", 3, make_events(1)))).chain == "gap"
    assert (await store.ingest(record("p", 1, make_events(1)))).chain == "first"
    report = await store.producer("p")
    assert report is not None
    assert report["missing_ranges"] == [[2, 2]]
    assert report["missing_batches"] == 1
    assert (await store.ingest(record("p", 2, make_events(1)))).chain == "ok"
    report = await store.producer("p")
    assert report is not None
    assert (report["missing_ranges"], report["batches"], report["chain_breaks"]) == ([], 3, 0)


async def test_a_broken_chain_is_recorded_in_both_directions(store: Store) -> None:
    await store.ingest(record("p", 1, make_events(1)))
    outcome = await store.ingest(record("p", 2, make_events(1), prev=b"x" * 32))
    assert outcome.chain == "mismatch"
    # seq 4 arrives first and names a predecessor digest that seq 3 does not have.
    await store.ingest(record("p", 4, make_events(1), prev=b"y" * 32))
    await store.ingest(record("p", 3, make_events(1)))
    report = await store.producer("p")
    assert report is not None
    assert report["chain_breaks"] == 2
    assert [(e["seq"], e["kind"]) for e in report["chain_events"]] == [  # type: ignore[attr-defined]
        (2, "mismatch"),
        (4, "mismatch"),
    ]


async def test_a_reused_sequence_number_with_other_bytes_is_recorded_not_stored(
    store: Store,
) -> None:
    await store.ingest(record("p", 1, make_events(2)))
    outcome = await store.ingest(record("p", 1, make_events(3), digest=b"other" * 6))
    assert outcome.conflict and outcome.stored == 0
    again = await store.ingest(record("p", 1, make_events(2)))
    assert again.duplicate and not again.conflict
    report = await store.producer("p")
    assert report is not None
    assert [e["kind"] for e in report["chain_events"]] == ["seq_reused"]  # type: ignore[attr-defined]
    assert report["events"] == 2


async def test_the_pivot_names_every_missing_hop_without_lineage(store: Store) -> None:
    await store.ingest(record("p", 1, make_events(2, trace_id=TRACE, image="")))
    predictions, unresolved = await store.pivot("trace_id", TRACE)
    chain = predictions[0]["lineage"]
    assert isinstance(chain, dict)
    assert [m["hop"] for m in chain["missing"]] == [
        "image",
        "model_version",
        "run",
        "commit",
        "datasets",
    ]
    assert chain["complete"] is False
    assert unresolved == [("churn", "3", "", "churn-prod", "")]


async def test_registered_lineage_completes_the_chain(store: Store) -> None:
    await store.ingest(record("p", 1, make_events(3, trace_id=TRACE)))
    await store.register(parse_registration(FULL_LINEAGE))
    predictions, unresolved = await store.pivot("trace_id", TRACE)
    chain = predictions[0]["lineage"]
    assert isinstance(chain, dict)
    assert chain["complete"] is True, chain["missing"]
    assert unresolved == []
    run = chain["run"]
    assert isinstance(run, dict)
    assert run["commit"] == {"sha": SHA, "repo": "https://git.example/churn"}
    assert run["datasets"][0]["digest"] == "sha256:train"
    assert run["params"] == {"lr": "0.1"}
    assert chain["image"] == {"digest": "sha256:image-churn-3", "name": "churn:3"}


async def test_a_registration_merges_and_keeps_what_it_does_not_mention(store: Store) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    await store.register(parse_registration({"model": {"name": "churn", "version": "3"}}))
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert lineage["run"]["id"] == "run-42"  # type: ignore[index]
    assert lineage["model_version"]["aliases"] == ["prod"]  # type: ignore[index]


CONTRADICTIONS = {
    "another commit for the run": (
        {"run": {"id": "run-42"}, "commit": {"sha": "0badc0de"}},
        f"run run-42 is built from commit {SHA}, not 0badc0de",
    ),
    "another run for the model version": (
        {"model": {"name": "churn", "version": "3"}, "run": {"id": "run-99"}},
        "model churn/3 was produced by run run-42, not run-99",
    ),
    "another artifact digest": (
        {"model": {"name": "churn", "version": "3", "artifact_digest": "sha256:other"}},
        "model churn/3 has artifact digest sha256:model, not sha256:other",
    ),
}


@pytest.mark.parametrize("case", CONTRADICTIONS, ids=list(CONTRADICTIONS))
async def test_a_registration_that_contradicts_stored_lineage_is_refused_and_writes_nothing(
    store: Store, case: str
) -> None:
    first = {**FULL_LINEAGE, "model": {**FULL_LINEAGE["model"], "artifact_digest": "sha256:model"}}
    await store.register(parse_registration(first))
    before = await store.model_lineage("churn", "3")
    body, reason = CONTRADICTIONS[case]
    with pytest.raises(LineageConflictError, match=reason):
        await store.register(parse_registration({**body, "image": {"digest": "sha256:new"}}))
    assert await store.model_lineage("churn", "3") == before
    assert await store.impact("image", "sha256:new") is None  # not even the image


async def test_replace_corrects_a_stored_link(store: Store) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    fix = {"run": {"id": "run-42"}, "commit": {"sha": "0badc0de"}}
    await store.register(parse_registration(fix), on_conflict="replace")
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert lineage["run"]["commit"]["sha"] == "0badc0de"  # type: ignore[index]
    same = {"run": {"id": "run-42"}, "commit": {"sha": "0badc0de", "repo": "r"}}
    await store.register(parse_registration(same))  # agreeing again is fine


async def test_replace_with_datasets_and_an_image_makes_them_the_only_ones_stored(
    store: Store,
) -> None:
    wrong = {
        **FULL_LINEAGE,
        "datasets": [{"digest": "sha256:wrong"}, {"digest": "sha256:train"}],
        "image": {"digest": "sha256:wrong-image"},
        "deployment": {"id": "churn-prod"},
    }
    await store.register(parse_registration(wrong))
    await store.register(parse_registration({**FULL_LINEAGE, "deployment": {"id": "other"}}))
    right = {**FULL_LINEAGE, "deployment": {"id": "churn-prod"}}
    await store.register(parse_registration(right), on_conflict="replace")
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert [d["digest"] for d in lineage["run"]["datasets"]] == ["sha256:train"]  # type: ignore[index]
    assert lineage["model_version"]["images"] == ["sha256:image-churn-3"]  # type: ignore[index]
    wrong_data = await store.impact("dataset", "sha256:wrong")
    assert wrong_data is not None and wrong_data["model_versions"] == []  # the node alone
    assert await store.impact("image", "sha256:wrong-image") is None
    # Without replace, a registration only adds.
    await store.register(parse_registration({**FULL_LINEAGE, "image": {"digest": "sha256:b"}}))
    images = (await store.model_lineage("churn", "3"))["model_version"]["images"]  # type: ignore[index]
    assert images == ["sha256:b", "sha256:image-churn-3"]


@pytest.mark.parametrize("again", [SHA[:7], SHA.upper(), SHA[:12].upper()])
async def test_the_same_commit_written_another_way_agrees_and_the_full_sha_stays(
    store: Store, again: str
) -> None:
    short = {**FULL_LINEAGE, "commit": {"sha": SHA[:7]}}
    await store.register(parse_registration(short))
    await store.register(parse_registration({"run": {"id": "run-42"}, "commit": {"sha": SHA}}))
    await store.register(parse_registration({"run": {"id": "run-42"}, "commit": {"sha": again}}))
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert lineage["run"]["commit"]["sha"] == SHA  # type: ignore[index]


async def test_the_full_sha_keeps_the_repository_the_short_one_was_registered_with(
    store: Store,
) -> None:
    short = {**FULL_LINEAGE, "commit": {"sha": SHA[:7], "repo": "https://git.example/churn"}}
    await store.register(parse_registration(short))
    await store.register(parse_registration({"run": {"id": "run-42"}, "commit": {"sha": SHA}}))
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert lineage["run"]["commit"] == {"sha": SHA, "repo": "https://git.example/churn"}  # type: ignore[index]


@pytest.mark.parametrize(("stored", "again"), [(SHA, "1"), (SHA, SHA[:6]), ("v1.2", "v1.2.3")])
async def test_a_prefix_too_short_or_not_a_sha_does_not_agree(
    store: Store, stored: str, again: str
) -> None:
    await store.register(parse_registration({"run": {"id": "r"}, "commit": {"sha": stored}}))
    with pytest.raises(LineageConflictError):
        await store.register(parse_registration({"run": {"id": "r"}, "commit": {"sha": again}}))


async def test_keep_stores_the_rest_and_leaves_contradicted_links_as_stored(store: Store) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    other = {
        "model": {"name": "churn", "version": "3", "aliases": ["canary"]},
        "run": {"id": "ol-run-1"},
        "datasets": [{"digest": "sha256:eval", "context": "evaluation"}],
        "commit": {"sha": "0badc0de"},
    }
    kept = await store.register(parse_registration(other), on_conflict="keep")
    assert kept == ["model churn/3 was produced by run run-42, not ol-run-1"]
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert lineage["run"]["id"] == "run-42"  # type: ignore[index]
    assert sorted(lineage["model_version"]["aliases"]) == ["canary", "prod"]  # type: ignore[index]
    assert await store.impact("dataset", "sha256:eval") is not None, "the new run is stored"


async def test_an_alias_only_prediction_resolves_through_the_registered_alias(store: Store) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    await store.ingest(
        record("p", 1, make_events(1, trace_id=TRACE, model=("churn", ""), alias="prod"))
    )
    predictions, _ = await store.pivot("trace_id", TRACE)
    chain = predictions[0]["lineage"]
    assert isinstance(chain, dict)
    assert chain["complete"] is True
    assert chain["model_version"]["resolved_via_alias"] == "prod"  # type: ignore[index]


async def test_lookup_by_prediction_id_finds_one_prediction(store: Store) -> None:
    events = make_events(3)
    await store.ingest(record("p", 1, events))
    predictions, _ = await store.pivot("prediction_id", events[1].prediction_id)
    assert [p["prediction_id"] for p in predictions] == [events[1].prediction_id]


async def test_impact_from_dataset_commit_and_image_counts_predictions(store: Store) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    await store.ingest(record("p", 1, make_events(4)))
    await store.ingest(record("p", 2, make_events(3, deployment="churn-canary")))
    await store.ingest(record("p", 3, make_events(5, model=("other", "1"), image="sha256:x")))
    for kind, value in (
        ("dataset", "sha256:train"),
        ("commit", SHA[:8]),
        ("image", "sha256:image-churn-3"),
    ):
        impact = await store.impact(kind, value)
        assert impact is not None, kind
        assert impact["predictions"] == 7, kind
        versions = impact["model_versions"]
        assert isinstance(versions, list)
        assert [(v["name"], v["version"]) for v in versions] == [("churn", "3")]
        assert sorted(d["id"] for d in versions[0]["deployments"]) == ["churn-canary", "churn-prod"]
    assert await store.impact("dataset", "sha256:unknown") is None


async def test_impact_by_image_counts_imageless_predictions_only_for_a_versions_sole_image(
    store: Store,
) -> None:
    await store.register(parse_registration(FULL_LINEAGE))  # churn/3 in image-churn-3
    await store.ingest(record("p", 1, make_events(4)))
    await store.ingest(record("p", 2, make_events(2, image="")))
    alone = await store.impact("image", "sha256:image-churn-3")
    assert alone is not None
    assert alone["predictions"] == 6  # its only image: the image-less two were served from it
    assert alone["model_versions"][0]["image_unknown"] == 0  # type: ignore[index]

    await store.ingest(record("p", 3, make_events(3, image="sha256:rebuilt")))
    for image, counted in (("sha256:image-churn-3", 4), ("sha256:rebuilt", 3)):
        impact = await store.impact("image", image)
        assert impact is not None
        # Two images now: the image-less two could be either's, so neither counts them.
        assert impact["predictions"] == counted, image
        version = impact["model_versions"][0]  # type: ignore[index]
        assert (version["predictions"], version["image_unknown"]) == (counted, 2), image


async def test_completeness_counts_predictions_by_model(store: Store) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    await store.ingest(record("p", 1, make_events(6)))
    await store.ingest(record("p", 2, make_events(2, model=("other", "1"))))
    report = await store.completeness()
    assert (report["predictions"], report["complete"]) == (8, 6)
    by_model = {m["model"]: m for m in report["models"]}  # type: ignore[attr-defined]
    assert by_model["churn"]["share"] == 1.0
    assert by_model["other"]["missing"]["model_version"] == 2


async def test_model_lineage_lists_deployments_with_counts(store: Store) -> None:
    await store.register(
        parse_registration({**FULL_LINEAGE, "deployment": {"id": "churn-prod", "service": "churn"}})
    )
    await store.ingest(record("p", 1, make_events(4)))
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert lineage["complete"] is True, lineage["missing"]
    assert lineage["predictions"] == 4
    assert await store.model_lineage("churn", "99") is None


def test_a_lost_insert_race_with_other_bytes_is_a_conflict_not_a_duplicate() -> None:
    # PostgreSQL, two deliveries of (p, 1) at once: both find no row, the other
    # one's INSERT wins. Driven step by step: the store's answers are scripted.
    plan = ingest_plan(record("p", 1, make_events(3)))
    assert isinstance(next(plan), Fetch)  # the neighbours: none yet
    insert = plan.send([])
    assert isinstance(insert, Fetch) and insert.sql.startswith("INSERT INTO batches")
    reread = plan.send([])  # ON CONFLICT DO NOTHING: nothing inserted
    assert isinstance(reread, Fetch) and "WHERE producer_id = ? AND seq = ?" in reread.sql
    event = plan.send([(b"winner" * 6, 7)])
    assert isinstance(event, Exec) and "chain_events" in event.sql and "seq_reused" in event.args
    with pytest.raises(StopIteration) as done:
        plan.send(None)
    assert done.value.value.conflict and done.value.value.stored == 0


class _Registry:
    """A registry that answers one fixed registration (unit test fake)."""

    def __init__(self, body: dict[str, object]) -> None:
        self.body = body

    async def lookup(self, name: str, version: str) -> Registration:
        return parse_registration(self.body, source="mlflow")

    def cached(self, name: str, version: str) -> tuple[bool, bool]:
        return False, False  # nothing remembered: always asked


async def test_a_registry_that_disagrees_is_logged_and_the_rest_of_its_answer_stored(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    answer = {
        "model": {"name": "churn", "version": "3", "artifact_digest": "sha256:m3"},
        "run": {"id": "run-7"},
    }
    metrics = CollectorMetrics()
    service = LineageService(store, _Registry(answer), metrics)  # type: ignore[arg-type]
    assert await service._from_registry("churn", "3") is True
    assert "MLflow disagrees with stored lineage" in caplog.text
    assert metrics.lineage_conflicts.labels("mlflow")._value.get() == 1
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    assert lineage["run"]["id"] == "run-42"  # type: ignore[index]
    assert lineage["model_version"]["artifact_digest"] == "sha256:m3"  # type: ignore[index]


async def test_mlflow_naming_the_full_sha_of_a_short_registered_one_is_no_conflict(
    store: Store,
) -> None:
    await store.register(parse_registration({**FULL_LINEAGE, "commit": {"sha": SHA[:7]}}))
    answer = {
        "model": {"name": "churn", "version": "4"},
        "run": {"id": "run-42"},
        "commit": {"sha": SHA},
    }
    metrics = CollectorMetrics()
    service = LineageService(store, _Registry(answer), metrics)  # type: ignore[arg-type]
    assert await service._from_registry("churn", "4") is True
    assert metrics.lineage_conflicts.labels("mlflow")._value.get() == 0
    lineage = await store.model_lineage("churn", "4")
    assert lineage is not None
    assert lineage["run"]["commit"]["sha"] == SHA  # type: ignore[index]


async def test_concurrent_contradicting_registrations_give_exactly_one_409(store: Store) -> None:
    # PostgreSQL: without the registration lock both could read "no commit"
    # and the second write would overwrite the first in silence.
    async def register(run_id: str, sha: str) -> str:
        body = {"run": {"id": run_id}, "commit": {"sha": sha}}
        try:
            await store.register(parse_registration(body))
        except LineageConflictError:
            return "409"
        return "ok"

    for attempt in range(10):
        run_id = f"run-{attempt}"
        outcomes = await asyncio.gather(register(run_id, "aaaa111"), register(run_id, "bbbb222"))
        assert sorted(outcomes) == ["409", "ok"], f"attempt {attempt}"


async def test_a_prediction_id_is_looked_up_in_every_spelling_given_at_once(store: Store) -> None:
    dashless, upper = "83aae1e491c34cb38bf1413c1a7703d2", "6171FCAE-2F54-46B8-BCA7-D147BCEB6835"
    events = [
        replace(e, prediction_id=p) for e, p in zip(make_events(2), (dashless, upper), strict=True)
    ]
    await store.ingest(record("p", 1, events))
    for stored in (dashless, upper):
        canonical = str(uuid.UUID(stored))
        predictions, _ = await store.pivot("prediction_id", (stored, canonical))
        assert [p["prediction_id"] for p in predictions] == [stored]


async def test_a_pivot_past_its_row_limit_says_so_and_checks_the_chains_it_left_out(
    store: Store,
) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    await store.ingest(record("p", 1, make_events(3, trace_id=TRACE, timestamp_ns=1_000)))
    within, _ = await store.pivot("trace_id", TRACE, limit=3)
    assert isinstance(within, PivotAnswer)
    assert (len(within), within.total, within.cut_by, within.complete) == (3, 3, None, True)
    late = make_events(1, trace_id=TRACE, model=("churn", "9"), timestamp_ns=2_000)
    await store.ingest(record("p", 2, late))
    predictions, unresolved = await store.pivot("trace_id", TRACE, limit=3)
    assert isinstance(predictions, PivotAnswer)
    assert (len(predictions), predictions.total, predictions.cut_by) == (3, 4, "limit")
    assert all(p["lineage"]["complete"] for p in predictions)  # type: ignore[index]
    assert predictions.complete is False, "the unlisted prediction's chain is broken"
    assert predictions.unlisted is not None
    [group] = predictions.unlisted
    assert (group["model"], group["predictions"]) == (
        {"name": "churn", "version": "9", "alias": ""},
        1,
    )
    assert "model_version" in [m["hop"] for m in group["missing"]]  # type: ignore[attr-defined]
    assert ("churn", "9", "", "churn-prod", "sha256:image-churn-3") in unresolved


async def test_a_pivot_stops_listing_at_its_byte_budget_and_counts_the_rest(store: Store) -> None:
    big = {f"k{i}": "\x01" * 1000 for i in range(20)}  # 20 kB stored, 120 kB of JSON
    events = [replace(e, attributes=big) for e in make_events(3, trace_id=TRACE)]
    await store.ingest(record("p", 1, [*make_events(1, trace_id=TRACE, timestamp_ns=1), *events]))
    predictions, _ = await store.pivot("trace_id", TRACE, max_bytes=100_000)
    assert isinstance(predictions, PivotAnswer)
    assert (len(predictions), predictions.total, predictions.cut_by) == (1, 4, "bytes")
    assert predictions.unlisted is not None
    assert [g["predictions"] for g in predictions.unlisted] == [3]
    assert len(json.dumps(list(predictions))) <= 100_000


async def test_a_pivot_whose_first_prediction_passes_the_budget_lists_none_but_counts_it(
    store: Store,
) -> None:
    big = {"k": "x" * 200_000}  # its stored text alone is past the budget: never loaded
    await store.ingest(record("p", 1, [replace(make_events(1, trace_id=TRACE)[0], attributes=big)]))
    predictions, _ = await store.pivot("trace_id", TRACE, max_bytes=100_000)
    assert isinstance(predictions, PivotAnswer)
    assert (len(predictions), predictions.total, predictions.cut_by) == (0, 1, "bytes")


FULL_B = hashlib.sha1(b"run B").hexdigest()  # noqa: S324 - a commit-like name, not security


@pytest.mark.parametrize(
    ("given", "run"),
    [
        (SHA.upper(), "run-42"),  # case does not matter
        (SHA[:7].upper(), "run-42"),  # a short sha finds the full one stored
        (FULL_B, "run-b"),  # a full sha finds the short one stored
        (FULL_B[:10], "run-b"),  # a longer short sha finds a shorter one
        (FULL_B[:8].upper(), "run-b"),
    ],
)
async def test_impact_by_commit_follows_registrations_rule_for_case_and_short_shas(
    store: Store, given: str, run: str
) -> None:
    await store.register(parse_registration(FULL_LINEAGE))
    short_b = {"model": {"name": "churn", "version": "4"}, "run": {"id": "run-b"}}
    await store.register(parse_registration({**short_b, "commit": {"sha": FULL_B[:8]}}))
    impact = await store.impact("commit", given)
    assert impact is not None
    assert impact["runs"] == [run]
    # Another commit that shares only the first 7 digits is not the same one.
    eighth = next(c for c in "0123456789abcdef" if c not in (SHA[7], FULL_B[7]))
    assert await store.impact("commit", given[:7] + eighth * 33) is None


async def test_an_alias_moved_after_predictions_does_not_rewrite_which_version_served_them(
    store: Store,
) -> None:
    # Predictions that name only fraud@champion: the alias pointed at fraud/1
    # when they were made; after CI moves it to fraud/2, the old ones must not
    # be explained by fraud/2 (and called complete), the new ones are.
    def version(n: str, image: str) -> dict[str, object]:
        return {
            "model": {"name": "fraud", "version": n, "aliases": ["champion"]},
            "run": {"id": f"fraud-run-{n}"},
            "commit": {"sha": SHA},
            "datasets": [{"digest": f"sha256:fraud-data-{n}"}],
            "image": {"digest": image},
        }

    await store.register(parse_registration(version("1", "sha256:fimg")))
    old_trace, new_trace = bytes(range(16)), bytes(range(1, 17))
    old = make_events(2, trace_id=old_trace, model=("fraud", ""), alias="champion", image="")
    await store.ingest(record("p", 1, old))
    await store.register(parse_registration(version("1", "sha256:fimg")))  # no move: same version
    before, _ = await store.pivot("trace_id", old_trace)
    assert before[0]["lineage"]["complete"] is True, before[0]["lineage"]["missing"]
    assert before[0]["lineage"]["model_version"]["version"] == "1"
    # impact and model lineage count them as trace explains them: fraud/1's.
    impact = await store.impact("dataset", "sha256:fraud-data-1")
    assert impact is not None and impact["predictions"] == 2
    lineage_1 = await store.model_lineage("fraud", "1")
    assert lineage_1 is not None and lineage_1["predictions"] == 2

    await store.register(parse_registration(version("2", "sha256:fimg2")))  # the move
    after, _ = await store.pivot("trace_id", old_trace)
    lineage = after[0]["lineage"]
    assert lineage["complete"] is False and lineage["model_version"] is None
    (reason,) = [m["reason"] for m in lineage["missing"] if m["hop"] == "model_version"]
    assert "alias 'champion' was moved to version 2" in reason

    new = make_events(1, trace_id=new_trace, model=("fraud", ""), alias="champion", image="")
    await store.ingest(record("p", 2, new))
    fresh, _ = await store.pivot("trace_id", new_trace)
    assert fresh[0]["lineage"]["model_version"]["version"] == "2"
    # One trace across the move: each prediction by its own time.
    late = make_events(1, trace_id=old_trace, model=("fraud", ""), alias="champion", image="")
    await store.ingest(record("p", 3, late))
    both, _ = await store.pivot("trace_id", old_trace)
    assert [
        p["lineage"]["model_version"] and p["lineage"]["model_version"]["version"] for p in both
    ] == [None, None, "2"]
    # The stored group began before the move: completeness does not call it complete.
    completeness = await store.completeness()
    (fraud,) = [m for m in completeness["models"] if m["model"] == "fraud"]  # type: ignore[union-attr]
    assert fraud["complete"] == 0 and fraud["missing"]["model_version"] == 4

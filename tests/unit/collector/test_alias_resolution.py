"""Which version served a prediction that names only an alias, and in which image.

Every query (trace, completeness, impact, model lineage) answers by one rule:
an alias explains a prediction only when the store knew it pointed at its
version when the prediction was made; otherwise the version is unknown, with
the reason. A prediction that names no image is given its version's image
only when the version has one known image. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import time

from predtrace.collector.lineage import parse_registration
from predtrace.collector.store import Store
from predtrace.collector.testing import make_events

from .test_store import SHA, record

TRACE = bytes.fromhex("8bf92f3577b34da6a3ce929d0e0e4731")
LATER = bytes.fromhex("8bf92f3577b34da6a3ce929d0e0e4732")
IMAGE = "sha256:" + "c" * 64
HOUR_NS = 3600 * 1_000_000_000


def _version(
    n: str, *, aliases: tuple[str, ...] = ("champion",), image: str | None = None
) -> dict[str, object]:
    body: dict[str, object] = {
        "model": {"name": "churn", "version": n, "aliases": list(aliases)},
        "run": {"id": f"run-{n}"},
        "commit": {"sha": SHA},
        "datasets": [{"digest": f"sha256:data-{n}"}],
        "deployment": {"id": "churn-prod"},
    }
    if image is not None:
        body["image"] = {"digest": image}
    return body


async def _register(store: Store, body: dict[str, object]) -> None:
    await store.register(parse_registration(body))


def _chains(predictions: list[dict[str, object]]) -> list[dict[str, object]]:
    return [p["lineage"] for p in predictions]  # type: ignore[misc]


def _model_reason(chain: dict[str, object]) -> str:
    missing = chain["missing"]
    assert isinstance(missing, list)
    return next((m["reason"] for m in missing if m["hop"] == "model_version"), "")


async def _counted(store: Store, version: str) -> tuple[int, int, int]:
    """(impact by dataset, model lineage, complete in completeness) of a churn version."""
    impact = await store.impact("dataset", f"sha256:data-{version}")
    lineage = await store.model_lineage("churn", version)
    completeness = await store.completeness()
    return (
        int(impact["predictions"]) if impact else 0,  # type: ignore[call-overload]
        int(lineage["predictions"]) if lineage else 0,  # type: ignore[call-overload]
        int(completeness["complete"]),  # type: ignore[call-overload]
    )


async def test_an_alias_first_learned_after_predictions_named_it_does_not_explain_them(
    store: Store,
) -> None:
    # churn/3 served them (its CI hook gave no alias); champion is first
    # registered with churn/4, created after them: churn/4 did not serve them.
    await _register(store, _version("3", aliases=(), image=IMAGE))
    served = make_events(3, trace_id=TRACE, model=("churn", ""), alias="champion", image=IMAGE)
    await store.ingest(record("p", 1, served))
    await _register(store, _version("4", image=IMAGE))

    predictions, _ = await store.pivot("trace_id", TRACE)
    chain = _chains(predictions)[0]
    assert chain["model_version"] is None and chain["complete"] is False
    reason = _model_reason(chain)
    assert "alias 'champion' was moved to version 4, or first made known to the store" in reason
    assert "the version that served them is unknown" in reason
    assert await _counted(store, "4") == (0, 0, 0)

    # Predictions made once the store knows the alias are churn/4's.
    after = make_events(2, trace_id=LATER, model=("churn", ""), alias="champion", image=IMAGE)
    await store.ingest(record("p", 2, after))
    predictions, _ = await store.pivot("trace_id", LATER)
    chain = _chains(predictions)[0]
    assert chain["complete"] is True, chain["missing"]
    assert chain["model_version"]["version"] == "4"  # type: ignore[index]


async def test_an_alias_registered_before_any_prediction_named_it_explains_them(
    store: Store,
) -> None:
    await _register(store, _version("3", image=IMAGE))
    served = make_events(3, trace_id=TRACE, model=("churn", ""), alias="champion", image=IMAGE)
    await store.ingest(record("p", 1, served))
    predictions, _ = await store.pivot("trace_id", TRACE)
    chain = _chains(predictions)[0]
    assert chain["complete"] is True, chain["missing"]
    assert chain["model_version"]["resolved_via_alias"] == "champion"  # type: ignore[index]
    assert await _counted(store, "3") == (3, 3, 3)
    impact = await store.impact("image", IMAGE)
    assert impact is not None and impact["predictions"] == 3


async def test_a_prediction_older_than_the_version_its_alias_names_is_not_explained_by_it(
    store: Store,
) -> None:
    # An edge device ships, after the alias was registered, what it served
    # an hour before: the store learned of churn/3 after that.
    await _register(store, _version("3", image=IMAGE))
    old = make_events(
        2,
        trace_id=TRACE,
        model=("churn", ""),
        alias="champion",
        image=IMAGE,
        timestamp_ns=time.time_ns() - HOUR_NS,
    )
    await store.ingest(record("edge", 1, old))
    predictions, _ = await store.pivot("trace_id", TRACE)
    chain = _chains(predictions)[0]
    assert chain["model_version"] is None
    assert "points at version 3, which the store learned of at" in _model_reason(chain)
    assert await _counted(store, "3") == (0, 0, 0)
    assert await store.impact("image", IMAGE) is not None  # the registered image still is known


async def test_a_prediction_without_a_timestamp_is_unknown_once_its_alias_moved(
    store: Store,
) -> None:
    await _register(store, _version("3"))
    before_move = time.time_ns()
    await _register(store, _version("4"))  # champion moves to churn/4
    untimed, timed = (
        make_events(1, model=("churn", ""), alias="champion", image="", timestamp_ns=ts)[0]
        for ts in (0, before_move)
    )
    await store.ingest(record("edge", 1, [untimed, timed]))
    for event in (untimed, timed):
        predictions, _ = await store.pivot("prediction_id", event.prediction_id)
        chain = _chains(predictions)[0]
        assert chain["model_version"] is None, event.timestamp_unix_nano
        assert "the version that served" in _model_reason(chain)
    predictions, _ = await store.pivot("prediction_id", untimed.prediction_id)
    assert "the prediction has no timestamp" in _model_reason(_chains(predictions)[0])
    # Every query agrees: neither is churn/4's (nor complete).
    assert await _counted(store, "4") == (0, 0, 0)


async def test_a_prediction_without_a_timestamp_follows_an_alias_that_never_moved(
    store: Store,
) -> None:
    await _register(store, _version("3", image=IMAGE))
    untimed = make_events(1, model=("churn", ""), alias="champion", image=IMAGE, timestamp_ns=0)
    await store.ingest(record("edge", 1, untimed))
    predictions, _ = await store.pivot("prediction_id", untimed[0].prediction_id)
    assert _chains(predictions)[0]["complete"] is True
    assert await _counted(store, "3") == (1, 1, 1)


async def test_an_event_without_a_timestamp_does_not_date_its_group(store: Store) -> None:
    await _register(store, _version("3", image=IMAGE))
    first = time.time_ns()
    timed = make_events(1, image=IMAGE, timestamp_ns=first)
    untimed = make_events(1, image=IMAGE, timestamp_ns=0)
    await store.ingest(record("p", 1, [*untimed, *timed]))
    await store.ingest(record("p", 2, make_events(1, image=IMAGE, timestamp_ns=0)))
    lineage = await store.model_lineage("churn", "3")
    assert lineage is not None
    (deployment,) = lineage["deployments"]  # type: ignore[misc]
    assert deployment["predictions"] == 3
    assert deployment["first_seen"] is not None and deployment["first_seen"].startswith("20")


async def test_impact_by_image_counts_predictions_that_name_only_an_alias(store: Store) -> None:
    # CI registered churn/4 @champion without an image; the server (alias
    # only) sends its image digest: impact of that image finds churn/4.
    await _register(store, _version("4"))
    served = make_events(5, trace_id=TRACE, model=("churn", ""), alias="champion", image=IMAGE)
    await store.ingest(record("p", 1, served))
    impact = await store.impact("image", IMAGE)
    assert impact is not None
    assert [(v["name"], v["version"], v["predictions"]) for v in impact["model_versions"]] == [  # type: ignore[attr-defined]
        ("churn", "4", 5)
    ]
    lineage = await store.model_lineage("churn", "4")
    assert lineage is not None
    assert lineage["model_version"]["images"] == [IMAGE]  # type: ignore[index]
    assert "image" not in lineage["missing"]  # type: ignore[operator]


async def test_a_prediction_naming_no_image_gets_its_versions_image_only_if_it_has_one(
    store: Store,
) -> None:
    old, new = "sha256:" + "b" * 64, "sha256:" + "a" * 64
    await _register(store, _version("3", aliases=(), image=old))
    await store.ingest(record("p", 1, make_events(1, trace_id=TRACE, image="")))
    predictions, _ = await store.pivot("trace_id", TRACE)
    chain = _chains(predictions)[0]
    assert chain["complete"] is True and chain["image"]["digest"] == old  # type: ignore[index]

    await _register(store, _version("3", aliases=(), image=new))  # a rebuild
    predictions, _ = await store.pivot("trace_id", TRACE)
    chain = _chains(predictions)[0]
    assert chain["image"] is None and chain["complete"] is False
    (reason,) = [m["reason"] for m in chain["missing"] if m["hop"] == "image"]  # type: ignore[attr-defined]
    assert "the event names no image, and model version churn/3 is in 2 images" in reason
    completeness = await store.completeness()
    assert (completeness["complete"], completeness["predictions"]) == (0, 1)
    for image in (old, new):  # impact says the same: not counted for either image
        impact = await store.impact("image", image)
        assert impact is not None
        (version,) = impact["model_versions"]  # type: ignore[misc]
        assert (version["predictions"], version["image_unknown"]) == (0, 1)


async def test_impact_by_image_finds_every_spelling_of_the_digest(store: Store) -> None:
    # CI registers sha256:X; the runtime reports repo@sha256:X: one image.
    hex_digits = "7" * 64
    registered, reported = f"sha256:{hex_digits}", f"ghcr.io/acme/churn@sha256:{hex_digits}"
    await _register(store, _version("4", aliases=(), image=registered))
    await store.ingest(record("p", 1, make_events(6, model=("churn", "4"), image=reported)))
    await store.ingest(
        record("p", 2, make_events(2, trace_id=TRACE, model=("churn", "4"), image=""))
    )
    for given in (registered, reported, hex_digits, registered.upper()):
        impact = await store.impact("image", given)
        assert impact is not None, given
        (version,) = impact["model_versions"]  # type: ignore[misc]
        # One image in two spellings: the imageless predictions are its too.
        assert (version["predictions"], version["image_unknown"]) == (8, 0), given
        assert sorted(impact["node"]["stored_as"]) == sorted(  # type: ignore[index]
            {registered, reported} - {given}
        )
    predictions, _ = await store.pivot("trace_id", TRACE)
    chain = _chains(predictions)[0]
    assert chain["complete"] is True and chain["image"]["digest"] == registered  # type: ignore[index]
    assert await store.impact("image", "sha256:" + "8" * 64) is None

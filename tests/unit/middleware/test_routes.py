"""Which requests are predictions: built-in OIP v2 / KServe v1 routes and user patterns."""

from __future__ import annotations

import pytest

from predtrace.middleware import RoutePattern
from predtrace.middleware._routes import BUILTIN_ROUTES, RouteMatch, RouteTable

TABLE = RouteTable((RoutePattern(template="/score/{name}/{other}"), *BUILTIN_ROUTES))


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/v2/models/iris/infer", ("/v2/models/{name}/infer", "oip-v2-rest", "iris", "")),
        (
            "POST",
            "/v2/models/iris/versions/3/infer",
            ("/v2/models/{name}/versions/{version}/infer", "oip-v2-rest", "iris", "3"),
        ),
        (
            "POST",
            "/v1/models/mnist:predict",
            ("/v1/models/{name}:predict", "kserve-v1", "mnist", ""),
        ),
        ("POST", "/score/a/b", ("/score/{name}/{other}", "http", "a", "")),
    ],
)
def test_prediction_routes_match_with_model_identity(
    method: str, path: str, expected: tuple[str, str, str, str]
) -> None:
    assert TABLE.match(method, path) == RouteMatch(*expected)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v2/models/iris/infer"),
        ("POST", "/v2/models/iris"),
        ("POST", "/v2/models/iris/infer/extra"),
        ("POST", "/v2/models/a/b/infer"),
        ("POST", "/v1/models/mnist:explain"),
        ("POST", "/health"),
    ],
)
def test_other_requests_are_not_predictions(method: str, path: str) -> None:
    assert TABLE.match(method, path) is None


def test_results_are_cached_but_the_cache_is_bounded() -> None:
    table = RouteTable(BUILTIN_ROUTES)
    for i in range(5000):
        table.match("POST", f"/v2/models/m{i}/infer")
    assert len(table._cache) == 1024
    assert table.match("POST", "/v2/models/m4999/infer") == RouteMatch(
        "/v2/models/{name}/infer", "oip-v2-rest", "m4999", ""
    )


def test_pattern_text_parses_method_and_template() -> None:
    assert RoutePattern.parse("put /x/{version}") == RoutePattern(
        method="PUT", template="/x/{version}"
    )
    assert RoutePattern.parse("/x") == RoutePattern(template="/x")


def test_model_identity_from_the_path_is_bounded_and_without_control_characters() -> None:
    # A NUL would make the collector refuse the event; a 70k name, the span too big.
    table = RouteTable(BUILTIN_ROUTES)
    found = table.match("POST", "/v2/models/a\x00b\x1f\x7fc/versions/" + "v" * 70_000 + "/infer")
    assert found is not None
    assert found.name == "abc" and found.version == "v" * 256
    spaced = table.match("POST", "/v2/models/my model\u00a0\u00e9/infer")
    assert spaced is not None and spaced.name == "my model\u00a0\u00e9"  # printable text kept

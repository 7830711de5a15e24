"""Terminal tables print collector data literally: no markup, no emoji codes."""

from __future__ import annotations

from predtrace.collector._render import (
    render_completeness,
    render_impact,
    render_model_lineage,
    render_pivot,
    terminal_console,
)


def _printed(render: object, answer: dict[str, object]) -> str:
    console = terminal_console()
    console.width = 200
    with console.capture() as capture:
        render(console, answer)  # type: ignore[operator]
    return capture.get()


def test_digests_and_names_are_printed_literally() -> None:
    answer = {
        "query": {"kind": "dataset", "value": "sha256:abcd"},
        "predictions": 3,
        "model_versions": [
            {
                "name": "churn[bold]",
                "version": "3",
                "run_id": "r-:smile:",
                "deployments": [
                    {"id": "prod", "predictions": 3, "first_seen": "t0", "last_seen": "t1"}
                ],
            }
        ],
        "runs": ["r-:smile:"],
    }
    out = _printed(render_impact, answer)
    # ":abcd:" once rendered as an emoji; "[bold]" vanished as markup.
    assert "impact of dataset sha256:abcd: 3 prediction(s)" in out
    assert "churn[bold]/3" in out
    assert "r-:smile:" in out


def test_model_lineage_lists_deployments_once_and_hides_empty_params() -> None:
    answer = {
        "model_version": {"name": "churn", "version": "3", "aliases": ["prod"], "origin": "ci"},
        "run": {"id": "r-42", "params": {}, "metrics": {}, "datasets": [], "commit": None},
        "deployments": [
            {"id": "churn-prod", "predictions": 0, "first_seen": None, "last_seen": None}
        ],
        "missing": ["deployment", "commit"],
    }
    out = _printed(render_model_lineage, answer)
    assert out.count("churn-prod") == 1  # in the deployments table, not as a chain hop
    assert "params:" not in out
    assert "✗ not registered" in out  # the commit hop is named as missing


def test_completeness_with_no_predictions_does_not_claim_100_percent() -> None:
    out = _printed(render_completeness, {"share": 1.0, "predictions": 0, "models": []})
    assert "no predictions stored yet" in out
    assert "100.0%" not in out


def test_impact_by_image_names_the_predictions_it_could_not_attribute() -> None:
    version = {"name": "churn", "version": "3", "run_id": "r-42", "deployments": []}
    answer = {
        "query": {"kind": "image", "value": "sha256:a"},
        "predictions": 0,
        "model_versions": [{**version, "image_unknown": 2}, {**version, "version": "4"}],
    }
    out = _printed(render_impact, answer)
    assert "not counted: 2 prediction(s) of churn/3 name no image" in out
    assert "churn/4 name" not in out


def test_control_sequences_in_collector_data_are_shown_not_sent_to_the_terminal() -> None:
    evil = "m\x1b[2J\x1b[31mRED\x1b]0;pwned\x07\x9b"
    answer = {
        "query": {"kind": "dataset", "value": evil},
        "predictions": 1,
        "model_versions": [{"name": evil, "version": "3", "run_id": None, "deployments": []}],
    }
    out = _printed(render_impact, answer)
    assert "\x1b" not in out.replace("\x1b[0m", "").replace("\x1b[1m", "").replace("\x1b[3m", "")
    assert "\x07" not in out and "\x9b" not in out
    assert "m\\x1b[2J\\x1b[31mRED\\x1b]0;pwned\\x07\\x9b" in out


def test_bidi_overrides_and_line_separators_in_collector_data_are_shown_escaped() -> None:
    evil = "sha256:\u202egmi\u2066x\u2028y"  # shows as "sha256:img..." reversed, raw
    answer = {
        "query": {"kind": "image", "value": evil},
        "predictions": 1,
        "model_versions": [{"name": evil, "version": "3", "run_id": None, "deployments": []}],
    }
    out = _printed(render_impact, answer)
    assert not any(c in out for c in "\u202e\u2066\u2028")
    assert "sha256:\\u202egmi\\u2066x\\u2028y" in out


def test_a_pivot_keeps_each_prediction_id_on_one_line_even_at_80_columns() -> None:
    pid = "01a2279a-bdd5-732d-9dfc-bbcc89e2526c"
    prediction = {
        "prediction_id": pid,
        "timestamp": "2026-11-29T10:00:00.000000Z",
        "model": {"name": "churn-with-a-long-name", "version": "3", "alias": ""},
        "deployment": {"id": "churn-prod-eu-west-1", "pod": "churn-prod-eu-west-1-abcdef"},
        "status": "OK",
        "output": {"label": "stay", "score": 0.93},
        "lineage": {"missing": []},
    }
    console = terminal_console()
    console.width = 80
    with console.capture() as capture:
        render_pivot(console, {"query": "trace x", "predictions": [prediction]})
    assert pid in capture.get()


def test_tables_written_to_a_pipe_are_laid_out_wide() -> None:
    assert terminal_console().width >= 200  # pytest captures stdout: not a terminal

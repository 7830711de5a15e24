"""Sidecar settings checked at startup, named by flag and variable, and the counters that
show what the sidecar removes or drops from the first scrape on."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import aiohttp
import grpc
import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from predtrace.cli import main
from predtrace.sidecar._cli import build_config
from predtrace.sidecar._config import (
    DeploymentConfig,
    RedactionConfig,
    SidecarConfig,
    edge_from_env,
    parse_size,
)
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar._metrics import MetricsServer
from predtrace.sidecar._processors import RedactionProcessor
from predtrace.v1 import sidecar_pb2, sidecar_pb2_grpc
from predtrace.wire import PredictionEvent, event_to_proto

from .conftest import Running, StartSidecar
from .test_config import BASE, options

SIDECAR = Path(__file__).parents[3] / "sidecar" / "predtrace" / "sidecar"


def serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``predtrace sidecar serve`` with a usable base; (exit code, output)."""
    base = ["sidecar", "serve", "--listen", "127.0.0.1:0", "--spool", str(tmp_path / "spool")]
    base += ["--collector", "http://127.0.0.1:8700"]
    result = CliRunner().invoke(main, [*base, *args], env=env)
    return result.exit_code, result.output


# -- F1: a malformed size or URL is a usage error, never a traceback ----------------------


@pytest.mark.parametrize(
    "text", ["512i", "4i", "1ib", "1kbb", "1 iB", "k", "1e3", "1" + "0" * 400, "99999999T"]
)
def test_a_size_that_is_no_size_or_too_large_is_refused_as_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="--spool-max-bytes: "):
        parse_size(text, "--spool-max-bytes")


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("512k", 512 * 1024),
        ("512KB", 512 * 1024),
        ("512KiB", 512 * 1024),
        ("2 GiB", 2 * 1024**3),
        ("1.5m", 3 * 512 * 1024),
        ("7b", 7),
        ("1T", 1024**4),
    ],
)
def test_every_size_spelling_of_before_still_parses(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--spool-max-bytes", "512i"], "--spool-max-bytes: not a size: '512i'"),
        (["--max-message-bytes", "4i"], "--max-message-bytes: not a size: '4i'"),
        (["--quarantine-max-bytes", "1ib"], "--quarantine-max-bytes: not a size: '1ib'"),
        (["--spool-max-bytes", "1" + "0" * 400], "--spool-max-bytes: a size must be at most"),
        (["--oip-proxy", "garbage"], "expected --oip-proxy LISTEN=UPSTREAM, got 'garbage'"),
        (
            ["--otlp-listen", "127.0.0.1:0", "--otlp-export", "http://[::1"],
            "--otlp-export 'http://[::1' cannot be used: it is not a usable URL",
        ),
    ],
)
def test_serve_refuses_a_malformed_size_or_url_with_exit_2(
    tmp_path: Path, args: list[str], says: str
) -> None:
    code, output = serve(tmp_path, *args)
    assert code == 2, output
    assert says in output
    assert "Traceback" not in output
    assert not (tmp_path / "spool").exists(), "refused before the spool is opened"


# -- F2: OTLP settings that need --otlp-listen are refused without it ---------------------


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ({"otlp_http_listen": "127.0.0.1:0"}, "--otlp-http-listen needs --otlp-listen"),
        ({"otlp_export": "http://127.0.0.1:4318/v1/traces"}, "--otlp-export needs --otlp-listen"),
        (
            {"otlp_listen": "127.0.0.1:0", "otlp_export_headers": ("X-A=b",)},
            "--otlp-export-header needs --otlp-export",
        ),
    ],
)
def test_otlp_settings_that_would_be_ignored_are_refused(
    given: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        build_config(options(**given), BASE)


def test_otlp_export_from_the_environment_without_a_receiver_is_refused_naming_both() -> None:
    env = {**BASE, "PREDTRACE_OTLP_EXPORT": "http://127.0.0.1:4318"}
    with pytest.raises(ConfigError, match=re.escape("--otlp-export (PREDTRACE_OTLP_EXPORT) needs")):
        build_config(options(), env)
    config = build_config(options(), {**env, "PREDTRACE_OTLP_LISTEN": "127.0.0.1:0"})
    assert config.otlp_export == "http://127.0.0.1:4318"


def test_serve_help_says_what_the_otlp_settings_need() -> None:
    result = CliRunner().invoke(main, ["sidecar", "serve", "--help"], terminal_width=2000)
    text = " ".join(result.output.split())
    assert "HOST:PORT of OTLP/HTTP; needs --otlp-listen" in text
    assert "forwarded to; needs --otlp-listen" in text


# -- F3: an --otlp-export URL or header that cannot work fails at startup ------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://", "it names no host"),
        ("http://:4318/v1/traces", "it names no host"),
        ("http://127.0.0.1:99999/v1/traces", "not a usable URL (Port out of range"),
        ("http://127.0.0.1:0/v1/traces", "a port from 1 to 65535"),
        ("http://127.0.0.1:x/v1/traces", "not a usable URL"),
        ("http://back end:4318/v1/traces", "no spaces or control characters"),
        ("grpc://backend:4317", "http(s)://"),
    ],
)
def test_an_otlp_export_url_that_cannot_be_sent_to_is_refused(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        build_config(options(otlp_listen="127.0.0.1:0", otlp_export=url), BASE)


def test_an_otlp_export_url_error_never_shows_its_password() -> None:
    url = "http://user:s3cret@127.0.0.1:0/v1/traces"
    with pytest.raises(ConfigError) as info:
        build_config(options(otlp_listen="127.0.0.1:0", otlp_export=url), BASE)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://backend:4318/v1/traces", "https://[::1]:4318", "HTTP://backend", "http://b:1/"]
)
def test_a_usable_otlp_export_url_is_taken(url: str) -> None:
    config = build_config(options(otlp_listen="127.0.0.1:0", otlp_export=url), BASE)
    assert config.otlp_export == url


@pytest.mark.parametrize(
    ("header", "says"),
    [
        ("Bad Name=x", "--otlp-export-header 'Bad Name' cannot be sent: a header name is a token"),
        ("X-Ok:=x", "a header name is a token"),
        ("Authorization=Bearer s3cret\nX-Evil: 1", "must not hold control characters"),
    ],
)
def test_an_otlp_export_header_that_cannot_be_sent_is_a_usage_error(
    tmp_path: Path, header: str, says: str
) -> None:
    code, output = serve(
        tmp_path,
        *("--otlp-listen", "127.0.0.1:0", "--otlp-export", "http://127.0.0.1:4318"),
        *("--otlp-export-header", header),
    )
    assert code == 2, output
    assert says in output
    assert "s3cret" not in output, "a header value may be a credential: never echoed"


def test_a_header_without_a_value_is_refused_without_echoing_it(tmp_path: Path) -> None:
    code, output = serve(
        tmp_path,
        *("--otlp-listen", "127.0.0.1:0", "--otlp-export", "http://127.0.0.1:4318"),
        *("--otlp-export-header", "Authorization: Bearer s3cret"),
    )
    assert code == 2, output
    assert "--otlp-export-header NAME=VALUE" in output
    assert "s3cret" not in output


def test_token_header_names_are_taken_as_given() -> None:
    config = build_config(
        options(
            otlp_listen="127.0.0.1:0",
            otlp_export="http://127.0.0.1:4318",
            otlp_export_headers=("x-mlflow-experiment-id=0", "Authorization=Bearer a\tb"),
        ),
        BASE,
    )
    assert config.otlp_export_headers == (
        ("x-mlflow-experiment-id", "0"),
        ("Authorization", "Bearer a\tb"),
    )


# -- F6: errors name the flag and the variable the value came from -----------------------


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"PREDTRACE_SIDECAR_LISTEN": "localhost"}, "--listen (PREDTRACE_SIDECAR_LISTEN) must"),
        (
            {"PREDTRACE_METRICS_LISTEN": "http://127.0.0.1:9100"},
            "--metrics-listen (PREDTRACE_METRICS_LISTEN) must be HOST:PORT",
        ),
        (
            {"PREDTRACE_OTLP_LISTEN": "127.0.0.1:0", "PREDTRACE_OTLP_EXPORT": "backend:4318"},
            "--otlp-export (PREDTRACE_OTLP_EXPORT) 'backend:4318' cannot be used",
        ),
        ({"PREDTRACE_OTLP_LISTEN": "nope"}, "--otlp-listen (PREDTRACE_OTLP_LISTEN) must"),
        (
            {"PREDTRACE_PRODUCER_ID": " edge-7"},
            "--producer-id (PREDTRACE_PRODUCER_ID) ' edge-7' is not usable",
        ),
        (
            {"PREDTRACE_SPOOL_MAX_BYTES": "2gigs"},
            "--spool-max-bytes (PREDTRACE_SPOOL_MAX_BYTES): not a size: '2gigs'",
        ),
        ({"PREDTRACE_REDACT": "(["}, "--redact (PREDTRACE_REDACT): bad redaction pattern"),
        (
            {"PREDTRACE_SIDECAR_TLS_CERT": "/nonexistent.pem"},
            "TLS needs both --tls-cert (PREDTRACE_SIDECAR_TLS_CERT) and --tls-key",
        ),
        (
            {"PREDTRACE_COLLECTOR_URL": "http://127.0.0.1:99999"},
            "--collector (PREDTRACE_COLLECTOR_URL): ",
        ),
    ],
)
def test_an_unusable_variable_is_named_with_its_flag(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(options(), {**BASE, **env})
    assert says in str(info.value)


def test_a_flag_is_named_alone_and_wins_over_a_bad_variable() -> None:
    with pytest.raises(ConfigError, match=r"^--listen must be HOST:PORT"):
        build_config(options(listen="localhost"), BASE)
    env = {**BASE, "PREDTRACE_SIDECAR_LISTEN": "localhost", "PREDTRACE_REDACT": "(["}
    config = build_config(options(listen="127.0.0.1:0", redact=("x",)), env)
    assert (config.listen, config.redaction.patterns) == ("127.0.0.1:0", ("x",))


def test_serve_names_the_variable_of_a_bad_spool_cap(tmp_path: Path) -> None:
    code, output = serve(tmp_path, env={"PREDTRACE_SPOOL_MAX_BYTES": "2gigs"})
    assert code == 2, output
    assert "--spool-max-bytes (PREDTRACE_SPOOL_MAX_BYTES): not a size" in output


class _NoApp:
    """MetricsServer.start reads nothing of the app: only a scrape does."""


async def test_a_busy_metrics_port_is_named_like_a_busy_grpc_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
        server = MetricsServer(_NoApp())  # type: ignore[arg-type]
        try:
            with pytest.raises(OSError, match=r"(?i)address already in use") as info:
                await server.start(listen)
        finally:
            await server.stop()
    assert str(info.value).startswith(
        f"cannot listen on {listen} (--metrics-listen): address already in use"
    )


def test_the_highest_otlp_port_with_a_derived_http_port_is_refused_at_startup() -> None:
    with pytest.raises(ConfigError, match="give --otlp-http-listen HOST:PORT"):
        build_config(options(otlp_listen="127.0.0.1:65535"), BASE)
    given = options(otlp_listen="127.0.0.1:65535", otlp_http_listen="127.0.0.1:4318")
    assert build_config(given, BASE).otlp_http_listen == "127.0.0.1:4318"
    assert build_config(options(otlp_listen="127.0.0.1:0"), BASE).otlp_http_listen is None


# -- F7: PREDTRACE_EDGE reads as the middleware's booleans do ----------------------------


@pytest.mark.parametrize(
    ("value", "edge"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("on", True),
        ("On", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_predtrace_edge_takes_the_middlewares_true_and_false_words(value: str, edge: bool) -> None:
    assert edge_from_env({"PREDTRACE_EDGE": value}) is edge
    assert build_config(options(), {**BASE, "PREDTRACE_EDGE": value}).edge is edge


@pytest.mark.parametrize("value", ["enabled", "2", "edge", "tru"])
def test_any_other_predtrace_edge_value_is_a_usage_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="PREDTRACE_EDGE must be true or false"):
        edge_from_env({"PREDTRACE_EDGE": value})
    code, output = serve(tmp_path, env={"PREDTRACE_EDGE": value})
    assert code == 2, output
    assert (
        f"PREDTRACE_EDGE must be true or false (1/true/yes/on, 0/false/no/off), got {value!r}"
        in (" ".join(output.split()))
    )
    # --edge/--no-edge win over the variable: it is not read then.
    assert build_config(options(edge=True), {**BASE, "PREDTRACE_EDGE": value}).edge


# -- F8: a deployment value no event could carry fails at startup ------------------------


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"PREDTRACE_K8S_POD_NAME": "p" * 70_000}, "PREDTRACE_K8S_POD_NAME cannot be the "),
        (
            {"POD_NAMESPACE": "\u00e9" * 40_000},
            "POD_NAMESPACE cannot be the deployment's namespace",
        ),
        ({"PREDTRACE_IMAGE_NAME": "reg/\udcff"}, "not valid UTF-8"),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=a%00b"},
            "OTEL_RESOURCE_ATTRIBUTES (k8s.pod.name) cannot be the deployment's pod "
            "stamped on events: it holds a NUL character",
        ),
        ({"PREDTRACE_DEPLOYMENT_ID": "d" * 65_537}, "more than the 65536 bytes"),
    ],
)
def test_a_deployment_value_no_event_could_carry_is_refused_naming_its_variable(
    env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        DeploymentConfig.from_env(env)
    assert says in str(info.value)
    with pytest.raises(ConfigError):
        build_config(options(), {**BASE, **env})


def test_a_deployment_value_of_the_largest_text_is_taken() -> None:
    assert len(DeploymentConfig.from_env({"POD_NAME": "p" * 65_536}).pod) == 65_536
    with pytest.raises(ConfigError, match="the deployment's node cannot be stamped"):
        DeploymentConfig(node="n" * 65_537)


def test_serve_refuses_an_overlong_pod_name_with_exit_2(tmp_path: Path) -> None:
    code, output = serve(tmp_path, env={"PREDTRACE_K8S_POD_NAME": "p" * 70_000})
    assert code == 2, output[:300]
    assert "PREDTRACE_K8S_POD_NAME cannot be the deployment's pod" in output


# -- F11: the image digest from OTEL_RESOURCE_ATTRIBUTES --------------------------------


def test_the_image_digest_comes_from_the_otel_resource_when_not_set_apart() -> None:
    digest = "sha256:" + "b" * 64
    resource = f"container.image.id={digest},container.image.name=reg/churn"
    dep = DeploymentConfig.from_env({"OTEL_RESOURCE_ATTRIBUTES": resource})
    assert (dep.image_digest, dep.image_name) == (digest, "reg/churn")
    both = {"OTEL_RESOURCE_ATTRIBUTES": resource, "PREDTRACE_IMAGE_DIGEST": "sha256:own"}
    assert DeploymentConfig.from_env(both).image_digest == "sha256:own"


# -- F5: what the sidecar's allow-lists remove is counted and said once -------------------


def test_redaction_counts_the_features_and_attributes_it_removes_in_either_form(
    caplog: pytest.LogCaptureFixture,
) -> None:
    redact = RedactionProcessor(RedactionConfig(allow_features=("age",)))
    caplog.set_level(logging.WARNING, logger="predtrace.sidecar.redaction")
    redact(PredictionEvent("p", features={"age": 1.0, "tenure": 2.0}, attributes={"a": "b"}))
    redact.on_map({16: {"age": 1.0, "income": 2.0, "tenure": 3.0}, 17: {"c": "d", "e": "f"}})
    redact.on_map({16: {"age": 1.0}})  # nothing removed
    assert redact.counts() == {"feature": 3, "attribute": 3}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, "once for features, once for attributes"
    assert "--allow-feature or PREDTRACE_ALLOW_FEATURES" in said[0]
    assert "'tenure'" in said[0]
    assert "--allow-attribute or PREDTRACE_ALLOW_ATTRIBUTES" in said[1]


def test_nothing_is_counted_when_everything_is_allowed() -> None:
    redact = RedactionProcessor(RedactionConfig(allow_features=("*",), allow_attributes=("*",)))
    redact.on_map({16: {"a": 1.0}, 17: {"b": "c"}})
    redact(PredictionEvent("p", features={"a": 1.0}, attributes={"b": "c"}))
    assert redact.counts() == {"feature": 0, "attribute": 0}


async def _scrape(running: Running) -> dict[str, float]:
    url = f"http://{running.app.addresses['metrics']}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def test_metrics_count_features_and_attributes_the_sidecar_removed(
    start_sidecar: StartSidecar,
) -> None:
    running: Running = await start_sidecar(
        metrics_listen="127.0.0.1:0", redaction=RedactionConfig(allow_features=("age",))
    )
    fresh = await _scrape(running)
    assert fresh['predtrace_sidecar_redacted_total{what="feature"}'] == 0
    assert fresh['predtrace_sidecar_redacted_total{what="attribute"}'] == 0
    event = PredictionEvent("m1", features={"age": 1.0, "tenure": 12.0}, attributes={"k": "v"})
    async with grpc.aio.insecure_channel(running.target) as channel:
        await sidecar_pb2_grpc.SidecarStub(channel).RecordBatch(
            sidecar_pb2.RecordBatchRequest(events=[event_to_proto(event)])
        )
    after = await _scrape(running)
    assert after['predtrace_sidecar_redacted_total{what="feature"}'] == 1
    assert after['predtrace_sidecar_redacted_total{what="attribute"}'] == 1


# -- F9: every drop reason has a series from the first scrape ---------------------------


def _reasons_in_source() -> tuple[set[str], set[str]]:
    """Event drop reasons and OTLP span drop reasons the sidecar's code can count."""
    events: set[str] = set()
    for path in [*SIDECAR.glob("spool/*.py"), *SIDECAR.glob("_ship*.py")]:
        events |= set(re.findall(r"\.drop\(\s*\"(\w+)\"", path.read_text()))
    events |= set(re.findall(r"out\[\"(\w+)\"\]", (SIDECAR / "_status.py").read_text()))
    spans = set(re.findall(r"\.drop\(\s*\"(\w+)\"", (SIDECAR / "_otlp_export.py").read_text()))
    return events, spans


async def test_a_fresh_sidecar_shows_every_drop_reason_at_zero(
    start_sidecar: StartSidecar,
) -> None:
    events, spans = _reasons_in_source()
    assert {"byte_cap", "corrupt", "torn", "missing_segment", "rejected", "quarantined"} <= events
    assert {"invalid", "processor", "oip_buffer"} <= events
    assert {"queue_full", "retries_exhausted", "shutdown"} <= spans
    running: Running = await start_sidecar(
        metrics_listen="127.0.0.1:0",
        otlp_listen="127.0.0.1:0",
        otlp_export="http://127.0.0.1:9/v1/traces",
    )
    fresh = await _scrape(running)
    for reason in events:
        assert fresh[f'predtrace_sidecar_dropped_events_total{{reason="{reason}"}}'] == 0, reason
    for reason in spans:
        key = f'predtrace_sidecar_otlp_dropped_spans_total{{reason="{reason}"}}'
        assert fresh[key] == 0, reason


# -- --help and `sidecar status` --------------------------------------------------------


def test_serve_help_shows_the_defaults_and_variables() -> None:
    result = CliRunner().invoke(main, ["sidecar", "serve", "--help"], terminal_width=2000)
    text = " ".join(result.output.split())
    for says in (
        "[PREDTRACE_SPOOL_MAX_BYTES, else 1GiB]",
        "[5000; 10000 with --edge]",
        "[0.2; 1 with --edge]",
        "and OTLP/HTTP body accepted [4MiB]",
        "[PREDTRACE_ALLOW_FEATURES, comma-separated; else none",
        "[PREDTRACE_ALLOW_ATTRIBUTES, comma-separated; else none]",
        "[PREDTRACE_REDACT, one per line]",
        "Least severe log records written to stderr.",
    ):
        assert says in text, says


def test_status_help_shows_the_timeout_default() -> None:
    result = CliRunner().invoke(main, ["sidecar", "status", "--help"], terminal_width=2000)
    assert "[default: 5.0]" in result.output


def test_status_refuses_both_a_target_and_a_ready_file(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.write_text("127.0.0.1:9\n")
    args = ["sidecar", "status", "--target", "127.0.0.1:8", "--ready-file", str(ready)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "give --target or --ready-file, not both" in result.output


def test_a_sidecar_config_built_in_code_is_checked_the_same_way() -> None:
    base = SidecarConfig.from_env(BASE)
    with pytest.raises(ConfigError, match="--otlp-http-listen needs --otlp-listen"):
        SidecarConfig(collector=base.collector, spool=base.spool, otlp_http_listen="127.0.0.1:0")


# -- a token or CA file that would fail every delivery is handled at startup -------------


def test_a_token_from_a_mounted_secret_loses_its_newline() -> None:
    # Kept, it failed every delivery ("Forbidden control character detected
    # in headers"), and the shipper's error ended the sidecar, on every restart.
    config = build_config(options(), {**BASE, "PREDTRACE_TOKEN": "pt_tok\n"})
    assert config.collector.token == "pt_tok"
    assert build_config(options(token="  pt_tok \r\n"), BASE).collector.token == "pt_tok"


@pytest.mark.parametrize(
    ("given", "env", "says"),
    [
        ({"token": "pt_SECRET\nx"}, {}, "--token: the token holds spaces, control or non-ASCII"),
        ({}, {"PREDTRACE_TOKEN": "pt_SECRET x"}, "--token (PREDTRACE_TOKEN): the token holds"),
    ],
)
def test_a_token_no_header_can_hold_is_refused_without_quoting_it(
    given: dict[str, object], env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        build_config(options(**given), {**BASE, **env})
    assert str(raised.value).startswith(says), raised.value
    assert "SECRET" not in str(raised.value)


def test_a_collector_ca_file_that_is_no_certificate_is_refused_at_startup(tmp_path: Path) -> None:
    # Loaded at the first delivery, it failed every one for ever, reported as
    # "spool I/O failed".
    junk = tmp_path / "ca.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as raised:
        build_config(options(), {**BASE, "PREDTRACE_COLLECTOR_CA": str(junk)})
    text = str(raised.value)
    assert text.startswith("--collector-ca (PREDTRACE_COLLECTOR_CA): collector CA file"), text
    assert "is not a PEM certificate bundle" in text
    code, output = serve(tmp_path, "--collector-ca", str(junk))
    assert code == 2, output
    assert "Traceback" not in output

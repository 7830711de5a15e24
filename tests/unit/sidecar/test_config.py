"""Sidecar settings: flags over environment, validation at startup, enrichment and redaction."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from predtrace.cli import main
from predtrace.sidecar._batch import encode_event
from predtrace.sidecar._cli import build_config
from predtrace.sidecar._config import (
    DeploymentConfig,
    RedactionConfig,
    ShipperConfig,
    SidecarConfig,
    parse_hostport,
    parse_size,
    producer_id_problem,
)
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar._processors import DeploymentEnricher, RedactionProcessor
from predtrace.sidecar.pipeline import CollectorClient
from predtrace.sidecar.spool import Spool, SpoolConfig
from predtrace.wire import DeploymentRef, OutputSummary, PredictionEvent

BASE = {"PREDTRACE_COLLECTOR_URL": "http://127.0.0.1:8700", "PREDTRACE_SPOOL_DIR": "/var/spool/p"}


def options(**kw: object) -> dict[str, object]:
    values: dict[str, object] = {
        name: None
        for name in (
            "listen", "collector_url", "spool_dir", "ready_file", "token", "collector_timeout",
            "producer_id", "spool_max_bytes", "spool_segment_bytes", "otlp_listen",
            "otlp_http_listen", "otlp_export", "metrics_listen", "max_message_bytes",
            "drain_timeout", "poison_attempts", "batch_max_events", "batch_linger",
            "quarantine_max_bytes",
        )
    }  # fmt: skip
    values.update(edge=None, otlp_export_headers=(), oip_proxies=(), allow_feature=())
    values.update(allow_attribute=(), redact=())
    values.update(kw)
    return values


def test_flags_win_over_the_environment_and_sizes_parse() -> None:
    env = {**BASE, "PREDTRACE_SIDECAR_LISTEN": "127.0.0.1:1", "PREDTRACE_SPOOL_MAX_BYTES": "1GiB"}
    config = build_config(
        options(listen="127.0.0.1:2", spool_max_bytes="64MiB", oip_proxies=("a:1=b:2",)), env
    )
    assert config.listen == "127.0.0.1:2"
    assert config.spool.max_bytes == 64 * 1024**2
    assert config.oip_proxies == (("a:1", "b:2"),)
    assert config.collector.url == "http://127.0.0.1:8700"


def test_edge_mode_caps_backoff_at_five_minutes_and_never_gives_up() -> None:
    config = build_config(options(edge=True, poison_attempts=7), BASE)
    assert config.edge
    assert config.shipper.retry.max_backoff == 300.0
    assert config.shipper.retry.max_attempts is None
    assert config.shipper.poison_attempts == 7


@pytest.mark.parametrize(
    ("flag", "env", "edge"),
    [
        (None, "1", True),
        (False, "1", False),
        (True, "", True),
        (None, "", False),
        (None, "YES", True),
    ],
)
def test_the_edge_flag_wins_over_predtrace_edge_either_way(
    flag: bool | None, env: str, edge: bool
) -> None:
    config = build_config(options(edge=flag, poison_attempts=None), {**BASE, "PREDTRACE_EDGE": env})
    assert config.edge is edge
    assert (config.shipper.retry.max_backoff == 300.0) is edge  # edge's capped backoff, or not


def test_missing_collector_and_spool_are_named() -> None:
    with pytest.raises(ConfigError, match="PREDTRACE_COLLECTOR_URL"):
        SidecarConfig.from_env({"PREDTRACE_SPOOL_DIR": "/x"})
    with pytest.raises(ConfigError, match="PREDTRACE_SPOOL_DIR"):
        SidecarConfig.from_env({"PREDTRACE_COLLECTOR_URL": "http://127.0.0.1:1"})


def test_a_token_over_plaintext_to_a_remote_host_is_refused_without_echoing_it() -> None:
    with pytest.raises(ConfigError) as info:
        SidecarConfig.from_env({**BASE, "PREDTRACE_COLLECTOR_URL": "http://collector.example:80"},
                               token="s3cret-token")  # fmt: skip
    assert "s3cret-token" not in str(info.value)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"listen": "nope"}, "--listen"),
        ({"otlp_export": "grpc://x"}, "--otlp-export"),
        ({"max_message_bytes": 10}, "--max-message-bytes"),
    ],
)
def test_bad_settings_fail_at_startup(bad: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SidecarConfig.from_env(BASE, **bad)


def test_sizes_and_addresses_parse_or_fail_clearly() -> None:
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("512k") == 512 * 1024
    assert parse_hostport("[::1]:4555", "x") == ("::1", 4555)
    with pytest.raises(ConfigError):
        parse_size("lots")
    with pytest.raises(ConfigError):
        ShipperConfig(max_batch_events=20_000)


def test_deployment_identity_comes_from_the_downward_api_and_otel_resource() -> None:
    env = {
        "POD_NAME": "churn-7d9f",
        "POD_NAMESPACE": "ml",
        "NODE_NAME": "node-3",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=churn-api,container.image.name=reg/churn",
        "PREDTRACE_IMAGE_DIGEST": "sha256:abc",
    }
    dep = DeploymentConfig.from_env(env)
    assert (dep.pod, dep.namespace, dep.node) == ("churn-7d9f", "ml", "node-3")
    assert (dep.service, dep.image_name, dep.image_digest) == (
        "churn-api",
        "reg/churn",
        "sha256:abc",
    )
    enricher = DeploymentEnricher(dep)
    event = enricher(PredictionEvent("p", deployment=DeploymentRef(pod="explicit")))
    assert event.deployment.pod == "explicit", "the event's own values win"
    assert event.deployment.namespace == "ml"
    assert enricher.resource_attributes()["k8s.pod.name"] == "churn-7d9f"


def test_redaction_keeps_only_allow_listed_names_and_masks_patterns() -> None:
    redact = RedactionProcessor(
        RedactionConfig(
            allow_features=("age", "tenure_*"),
            allow_attributes=("note",),
            patterns=(r"[\w.]+@[\w.]+",),
        )
    )
    event = redact(
        PredictionEvent(
            "p",
            features={"age": 1.0, "tenure_m": 2.0, "income": 3.0},
            attributes={"note": "mail bob@example.org now", "email": "x@y.z"},
            output=OutputSummary(label="bob@example.org"),
        )
    )
    assert event.features == {"age": 1.0, "tenure_m": 2.0}
    assert event.attributes == {"note": "mail [redacted] now"}
    assert event.output is not None and event.output.label == "[redacted]"


def test_with_empty_allow_lists_no_feature_or_attribute_leaves() -> None:
    event = RedactionProcessor(RedactionConfig())(
        PredictionEvent("p", features={"a": 1.0}, attributes={"b": "c"})
    )
    assert (event.features, event.attributes) == ({}, {})


@pytest.mark.parametrize("seconds", [0.0, -2.0, float("nan"), float("inf"), 7200.0])
def test_an_unusable_collector_timeout_is_a_usage_error_naming_the_flag(seconds: float) -> None:
    with pytest.raises(ConfigError, match="--collector-timeout"):
        build_config(options(collector_timeout=seconds), BASE)


def test_a_collector_timeout_is_taken_as_given() -> None:
    assert build_config(options(collector_timeout=0.25), BASE).collector.timeout == 0.25
    assert build_config(options(), BASE).collector.timeout == 10.0


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999", "http://127.0.0.1:0", "http://h:x"])
def test_a_collector_url_with_an_invalid_port_is_a_usage_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"--collector: .*invalid port"):
        build_config(options(collector_url=url), BASE)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--collector-timeout", "inf"], "--collector-timeout"),
        (["--collector-timeout", "nan"], "--collector-timeout"),
        (["--collector-timeout", "0"], "--collector-timeout"),
        (["--collector", "http://127.0.0.1:99999"], "invalid port"),
        (["--producer-id", "a" * 201], "--producer-id"),
        (["--quarantine-max-bytes", "lots"], "not a size"),
        (["--max-message-bytes", "2GiB"], "--max-message-bytes must be between 64 KiB and"),
        # gRPC takes no scheme: accepted, every call failed UNAVAILABLE.
        (["--oip-proxy", "127.0.0.1:0=http://127.0.0.1:8081"], "not an http URL"),
        (["--oip-proxy", "127.0.0.1:0=127.0.0.1:0"], "UPSTREAM must name the port to connect"),
    ],
)
def test_serve_refuses_unusable_values_with_exit_2(
    tmp_path: Path, args: list[str], says: str
) -> None:
    base = ["sidecar", "serve", "--listen", "127.0.0.1:0", "--spool", str(tmp_path / "spool")]
    base += ["--collector", "http://127.0.0.1:8700"]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("producer_id", "problem"),
    [
        ("edge-7", None),
        ("dev 7 x", None),
        ("a" * 200, None),
        ("", "it is empty"),
        ("a" * 201, "longer than 200"),
        ("edge\x007", "not printable"),
        ("edge\n7", "not printable"),
        ("\ufffd" * 3 + "\x00", "not printable"),
        (" edge", "whitespace"),
    ],
)
def test_producer_ids_follow_one_rule(producer_id: str, problem: str | None) -> None:
    found = producer_id_problem(producer_id)
    assert (found is None) if problem is None else (problem in (found or "")), found
    if problem is not None and producer_id:
        with pytest.raises(ConfigError, match="--producer-id"):
            build_config(options(producer_id=producer_id), BASE)


def test_the_quarantine_cap_flag_parses_a_size() -> None:
    config = build_config(options(quarantine_max_bytes="2MiB"), BASE)
    assert config.shipper.quarantine_max_bytes == 2 * 1024**2
    assert build_config(options(), BASE).shipper.quarantine_max_bytes is None


def test_serve_exits_1_at_once_when_the_shipper_stops_on_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Never a sidecar that keeps acknowledging with a dead shipper: it exits,
    # non-zero, without waiting for a signal, and a supervisor restarts it.
    spool = Spool.open(SpoolConfig(directory=str(tmp_path / "spool")))
    spool.append_sync([encode_event(PredictionEvent(prediction_id="waiting"))])
    spool.close()

    async def broken_send(self: object, body: bytes, *, compressed: bool) -> object:
        raise ValueError("a bug in the sender")

    monkeypatch.setattr(CollectorClient, "send", broken_send)
    args = ["sidecar", "serve", "--listen", "127.0.0.1:0", "--spool", str(tmp_path / "spool")]
    args += ["--collector", "http://127.0.0.1:8700", "--producer-id", "edge-1"]
    result = CliRunner().invoke(main, [*args, "--drain-timeout", "1", "--batch-linger", "0"])
    assert result.exit_code == 1, result.output
    assert "the shipper stopped on an error (ValueError: a bug in the sender)" in result.output
    again = Spool.open(SpoolConfig(directory=str(tmp_path / "spool")))
    try:
        assert again.stats().records == 1, "the event stays spooled for the next start"
    finally:
        again.close()


@pytest.mark.parametrize(
    ("args", "flag", "field"),
    [
        (["--batch-max-events", "20000"], "--batch-max-events must be", "max_batch_events"),
        (["--batch-linger", "100"], "--batch-linger must be between 0 and 60", "linger must"),
        (["--poison-attempts", "0"], "--poison-attempts must be at least 1", "poison_attempts"),
        (["--spool-max-bytes", "0"], "--spool-max-bytes (PREDTRACE_SPOOL_MAX_BYTES)", "max_bytes"),
        (["--spool-segment-bytes", "1k"], "--spool-segment-bytes must be", "segment_bytes"),
        (["--max-message-bytes", "2147483648"], "--max-message-bytes must", "max_message_bytes"),
    ],
)
def test_serve_names_the_flag_of_an_unusable_value_not_an_internal_field(
    tmp_path: Path, args: list[str], flag: str, field: str
) -> None:
    base = ["sidecar", "serve", "--listen", "127.0.0.1:0", "--spool", str(tmp_path / "spool")]
    base += ["--collector", "http://127.0.0.1:8700"]
    result = CliRunner().invoke(main, [*base, *args])
    assert result.exit_code == 2, result.output
    assert flag in result.output
    assert field not in result.output.replace(flag, "")


def test_the_largest_message_limit_grpc_takes_is_accepted() -> None:
    config = build_config(options(max_message_bytes=str(2**31 - 1)), BASE)
    assert config.max_message_bytes == 2**31 - 1


def test_the_middleware_spelling_of_the_pod_and_node_variables_is_read_too() -> None:
    env = {"PREDTRACE_K8S_POD": "churn-7d9f", "PREDTRACE_K8S_NODE": "node-3", "POD_NAME": "x"}
    dep = DeploymentConfig.from_env(env)
    assert (dep.pod, dep.node) == ("churn-7d9f", "node-3")
    both = {**env, "PREDTRACE_K8S_POD_NAME": "named", "PREDTRACE_K8S_NODE_NAME": "named-node"}
    dep = DeploymentConfig.from_env(both)
    assert (dep.pod, dep.node) == ("named", "named-node"), "the sidecar's own spelling wins"


def test_otel_resource_attribute_values_are_percent_decoded_as_the_otel_sdk_does() -> None:
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=churn%20api,k8s.pod.name=churn%2C7d9f,"
        "k8s.node.name=node%3D3,container.image.name=reg/churn%25"
    }
    dep = DeploymentConfig.from_env(env)
    assert (dep.service, dep.pod, dep.node) == ("churn api", "churn,7d9f", "node=3")
    assert dep.image_name == "reg/churn%"


def test_credentials_in_the_collector_url_are_a_usage_error_that_does_not_echo_them() -> None:
    url = "http://alice:s3cret@127.0.0.1:8700"
    with pytest.raises(ConfigError, match=r"^--collector: the collector URL must not") as info:
        build_config(options(collector_url=url), BASE)
    assert "s3cret" not in str(info.value)
    assert "--token or PREDTRACE_TOKEN" in str(info.value)
    with pytest.raises(ConfigError, match="must not carry a user name or password"):
        build_config(options(), {**BASE, "PREDTRACE_COLLECTOR_URL": url})


@pytest.mark.parametrize(
    "upstream",
    ["model:8001", "dns:///model.ns.svc:8001", "ipv4:10.0.0.5:8001", "unix:///tmp/m.sock"],
)
def test_an_oip_upstream_may_be_any_grpc_target(upstream: str) -> None:
    # dns:/// is how a headless Kubernetes service is balanced over: gRPC reads it.
    config = build_config(options(oip_proxies=(f"127.0.0.1:0={upstream}",)), BASE)
    assert config.oip_proxies == (("127.0.0.1:0", upstream),)

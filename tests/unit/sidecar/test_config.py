"""Sidecar settings: flags over environment, validation at startup, enrichment and redaction."""

from __future__ import annotations

import pytest

from predtrace.sidecar._cli import build_config
from predtrace.sidecar._config import (
    DeploymentConfig,
    RedactionConfig,
    ShipperConfig,
    SidecarConfig,
    parse_hostport,
    parse_size,
)
from predtrace.sidecar._errors import ConfigError
from predtrace.sidecar._processors import DeploymentEnricher, RedactionProcessor
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
        ({"max_message_bytes": 10}, "max_message_bytes"),
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

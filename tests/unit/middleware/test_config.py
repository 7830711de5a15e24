"""MiddlewareConfig: validation at startup with clear messages, and from_env."""

from __future__ import annotations

import pytest

from predtrace.middleware import ConfigError, MiddlewareConfig, RoutePattern
from predtrace.middleware import environment_variables as env
from predtrace.sidecar.testing import InMemoryExporter


def test_needs_exactly_one_destination() -> None:
    with pytest.raises(ConfigError, match="exactly one of collector_url, sidecar_target"):
        MiddlewareConfig()
    with pytest.raises(ConfigError, match="got collector_url, sidecar_target"):
        MiddlewareConfig(collector_url="http://127.0.0.1:1", sidecar_target="127.0.0.1:2")
    assert MiddlewareConfig(enabled=False).enabled is False


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"sample_rate": 1.5}, "sample_rate must be within 0..1"),
        ({"sample_rate": float("nan")}, "sample_rate"),
        ({"fingerprint_key": "short"}, "at least 16 characters"),
        ({"id_header": "X Prediction"}, "id_header must be a lower-case header name"),
        ({"max_body_bytes": -1}, "max_body_bytes must be >= 0"),
        ({"shutdown_timeout": 0}, "shutdown_timeout must be a finite number of seconds > 0"),
        ({"collector_timeout": float("inf")}, "collector_timeout must be a finite number"),
        ({"routes": ("POST /x/{name",)}, "unclosed or stray brace"),
        ({"routes": ("POST /x/name}/y",)}, "unclosed or stray brace"),
        ({"routes": ("predict",)}, "must start with '/'"),
        ({"routes": ("FETCH /x",)}, "route method must be one of"),
        ({"routes": ("POST /a/{name}/{name}",)}, "repeats a placeholder"),
        ({"sidecar_tls_cert": "/c.pem"}, "go together"),
    ],
)
def test_invalid_settings_fail_at_startup_naming_the_setting(
    settings: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        MiddlewareConfig(exporter=InMemoryExporter(), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    [
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "host",
        "proxy-authenticate",
        "proxy-authorization",
    ],
)
def test_a_framing_or_hop_by_hop_id_header_is_refused_at_startup(name: str) -> None:
    # The id written there would break the response (a streamed answer with
    # content-length: <uuid>), so the setting fails before the first request.
    message = f"id_header \\(PREDTRACE_ID_HEADER\\) must not be '{name}': a framing or hop-by-hop"
    with pytest.raises(ConfigError, match=message):
        MiddlewareConfig(exporter=InMemoryExporter(), id_header=name)
    with pytest.raises(ConfigError, match=message):
        MiddlewareConfig.from_env(
            {env.PREDTRACE_ID_HEADER: name.upper(), env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:1"}
        )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"collector_url": "ftp://x"}, "collector URL must be http"),
        ({"collector_url": "http://10.0.0.5:80", "collector_token": "t"}, "plaintext"),
        ({"sidecar_target": "no-port"}, "must be 'host:port'"),
        ({"sidecar_target": "host:99999"}, "must be 'host:port'"),
    ],
)
def test_invalid_destinations_fail_without_echoing_secrets(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        MiddlewareConfig(**settings)  # type: ignore[arg-type]
    assert "t'" not in str(caught.value) or "token" not in settings


def test_token_and_key_never_appear_in_repr() -> None:
    config = MiddlewareConfig(
        collector_url="http://127.0.0.1:9", collector_token="s3cret-token", fingerprint_key="k" * 20
    )
    assert "s3cret" not in repr(config) and "kkkk" not in repr(config)


def test_from_env_reads_every_documented_variable() -> None:
    environ = {
        env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:4555",
        env.PREDTRACE_SIDECAR_TIMEOUT: "2.5",
        env.OTEL_SERVICE_NAME: "otel-name",
        env.PREDTRACE_MODEL_NAME: "churn",
        env.PREDTRACE_MODEL_VERSION: "7",
        env.PREDTRACE_MODEL_ALIAS: "champion",
        env.PREDTRACE_MODEL_ID: "models:/churn/7",
        env.PREDTRACE_MODEL_DIGEST: "sha256:ab",
        env.PREDTRACE_DEPLOYMENT_ID: "dep-1",
        env.PREDTRACE_K8S_NAMESPACE: "ml",
        env.PREDTRACE_K8S_POD: "pod-1",
        env.PREDTRACE_K8S_NODE: "node-1",
        env.PREDTRACE_IMAGE_DIGEST: "sha256:cd",
        env.PREDTRACE_IMAGE_NAME: "registry/churn",
        env.PREDTRACE_ROUTES: "POST /predict, /models/{name}/score",
        env.PREDTRACE_BUILTIN_ROUTES: "no",
        env.PREDTRACE_ID_HEADER: "X-Request-Trace",
        env.PREDTRACE_OIP_ECHO_ID: "off",
        env.PREDTRACE_FINGERPRINT_KEY: "0123456789abcdef",
        env.PREDTRACE_FEATURES: "tenure, plan",
        env.PREDTRACE_ATTRIBUTES: "tenant",
        env.PREDTRACE_SAMPLE_RATE: "0.25",
        env.PREDTRACE_MAX_BODY_BYTES: "2048",
        env.PREDTRACE_MAX_OUTPUT_BYTES: "1024",
        env.PREDTRACE_QUEUE_SIZE: "100",
        env.PREDTRACE_BATCH_SIZE: "10",
        env.PREDTRACE_EXPORT_DELAY: "0.5",
        env.PREDTRACE_STALL_GRACE: "0.75",
        env.PREDTRACE_SHUTDOWN_TIMEOUT: "3",
        env.PREDTRACE_FLUSH_TRACER_PROVIDER: "false",
    }
    config = MiddlewareConfig.from_env(environ)
    assert config.sidecar_target == "127.0.0.1:4555" and config.sidecar_timeout == 2.5
    assert config.service == "otel-name"
    assert (config.model_name, config.model_version, config.model_alias) == (
        "churn",
        "7",
        "champion",
    )
    assert (config.model_id, config.model_digest) == ("models:/churn/7", "sha256:ab")
    assert (config.deployment_id, config.namespace, config.pod, config.node) == (
        "dep-1",
        "ml",
        "pod-1",
        "node-1",
    )
    assert (config.image_digest, config.image_name) == ("sha256:cd", "registry/churn")
    assert config.route_patterns() == (
        RoutePattern(template="/predict"),
        RoutePattern(template="/models/{name}/score"),
    )
    assert config.id_header == "x-request-trace" and config.oip_echo_id is False
    assert config.fingerprint_key == "0123456789abcdef"
    assert config.feature_allowlist == frozenset({"tenure", "plan"})
    assert config.attribute_allowlist == frozenset({"tenant"})
    assert (config.sample_rate, config.max_body_bytes, config.max_output_bytes) == (
        0.25,
        2048,
        1024,
    )
    assert (config.queue.max_queue_size, config.queue.max_batch_size) == (100, 10)
    assert config.queue.schedule_delay == 0.5 and config.shutdown_timeout == 3.0
    assert config.queue.stall_grace == 0.75
    assert config.flush_tracer_provider is False


def test_from_env_prefers_predtrace_service_name_and_takes_objects_as_arguments() -> None:
    exporter = InMemoryExporter()
    config = MiddlewareConfig.from_env(
        {env.PREDTRACE_SERVICE_NAME: "own", env.OTEL_SERVICE_NAME: "otel"}, exporter=exporter
    )
    assert config.service == "own" and config.exporter is exporter


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (env.PREDTRACE_SAMPLE_RATE, "lots", "PREDTRACE_SAMPLE_RATE must be a number"),
        (env.PREDTRACE_ENABLED, "maybe", "PREDTRACE_ENABLED must be true or false"),
        (env.PREDTRACE_QUEUE_SIZE, "1.5", "PREDTRACE_QUEUE_SIZE must be an integer"),
        (env.PREDTRACE_BATCH_SIZE, "0", "queue settings"),
        # float() reads these; no setting means them (NaN spun the export
        # worker, inf killed it at its first wait).
        (env.PREDTRACE_EXPORT_DELAY, "nan", "PREDTRACE_EXPORT_DELAY must be a finite number"),
        (env.PREDTRACE_EXPORT_DELAY, "inf", "PREDTRACE_EXPORT_DELAY must be a finite number"),
        (env.PREDTRACE_EXPORT_DELAY, "1e10", r"queue settings \(PREDTRACE_EXPORT_DELAY\)"),
        (env.PREDTRACE_EXPORT_DELAY, "0", r"queue settings \(PREDTRACE_EXPORT_DELAY\)"),
        (env.PREDTRACE_EXPORT_DELAY, "1e-6", r"queue settings \(PREDTRACE_EXPORT_DELAY\)"),
        (env.PREDTRACE_QUEUE_SIZE, "10000000", r"queue settings \(PREDTRACE_QUEUE_SIZE\)"),
        (env.PREDTRACE_STALL_GRACE, "inf", "PREDTRACE_STALL_GRACE must be a finite number"),
        (env.PREDTRACE_STALL_GRACE, "0", r"queue settings \(PREDTRACE_STALL_GRACE\)"),
        (env.PREDTRACE_SHUTDOWN_TIMEOUT, "inf", "PREDTRACE_SHUTDOWN_TIMEOUT must be a finite"),
        (env.PREDTRACE_SHUTDOWN_TIMEOUT, "-inf", "PREDTRACE_SHUTDOWN_TIMEOUT must be a finite"),
        (env.PREDTRACE_COLLECTOR_TIMEOUT, "NaN", "PREDTRACE_COLLECTOR_TIMEOUT must be a finite"),
        (env.PREDTRACE_SIDECAR_TIMEOUT, "Infinity", "PREDTRACE_SIDECAR_TIMEOUT must be a finite"),
        (env.PREDTRACE_SAMPLE_RATE, "nan", "PREDTRACE_SAMPLE_RATE must be a finite number"),
    ],
)
def test_from_env_names_the_variable_that_does_not_parse(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        MiddlewareConfig.from_env({name: value, env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:1"})


def test_from_env_without_destination_says_which_variables_to_set() -> None:
    with pytest.raises(ConfigError, match="PREDTRACE_COLLECTOR_URL"):
        MiddlewareConfig.from_env({})
    assert MiddlewareConfig.from_env({env.PREDTRACE_ENABLED: "false"}).enabled is False


def test_every_environment_constant_is_its_own_name_and_documented() -> None:
    import ast  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    tree = ast.parse(inspect.getsource(env))
    names = [n for n in dir(env) if n.isupper()]
    assert names and all(getattr(env, n) == n for n in names)
    documented = set()
    for prev, node in zip(tree.body, tree.body[1:], strict=False):
        if isinstance(prev, ast.AnnAssign) and isinstance(node, ast.Expr):
            documented.add(prev.target.id)  # type: ignore[union-attr]
    assert documented == set(names) - {"Final"}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (env.PREDTRACE_FINGERPRINT_KEY, "short", "PREDTRACE_FINGERPRINT_KEY: fingerprint_key must"),
        (env.PREDTRACE_SAMPLE_RATE, "2", "PREDTRACE_SAMPLE_RATE: sample_rate must be within"),
        (env.PREDTRACE_MAX_BODY_BYTES, "-1", "PREDTRACE_MAX_BODY_BYTES: max_body_bytes must"),
        # A call given up while the sidecar spools it: each retry stored it again.
        (env.PREDTRACE_SIDECAR_TIMEOUT, "0.002", "PREDTRACE_SIDECAR_TIMEOUT: sidecar_timeout must"),
        # Split at the last ':', a URL read as host 'http://127.0.0.1': accepted, every
        # export then failed UNAVAILABLE.
        (
            env.PREDTRACE_SIDECAR_TARGET,
            "http://127.0.0.1:4555",
            "PREDTRACE_SIDECAR_TARGET: sidecar_target must be 'host:port', not a URL",
        ),
    ],
)
def test_from_env_names_the_variable_of_a_value_that_parses_but_is_refused(
    name: str, value: str, message: str
) -> None:
    environ = {env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:4555", name: value}
    with pytest.raises(ConfigError) as info:
        MiddlewareConfig.from_env(environ)
    assert str(info.value).startswith(message)


def test_from_env_names_the_collector_url_variable() -> None:
    with pytest.raises(ConfigError, match=r"^PREDTRACE_COLLECTOR_URL: collector_url: "):
        MiddlewareConfig.from_env({env.PREDTRACE_COLLECTOR_URL: "ftp://x"})


def test_a_batch_size_no_receiver_takes_is_refused_at_startup() -> None:
    # Accepted before: every full batch was then refused by the receivers (at most
    # 10,000 events in one batch), dead-lettered and counted.
    environ = {
        env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:4555",
        env.PREDTRACE_QUEUE_SIZE: "20000",
        env.PREDTRACE_BATCH_SIZE: "12000",
    }
    with pytest.raises(
        ConfigError, match=r"queue settings \(PREDTRACE_BATCH_SIZE\).* at most 10000"
    ):
        MiddlewareConfig.from_env(environ)
    environ[env.PREDTRACE_BATCH_SIZE] = "10000"
    assert MiddlewareConfig.from_env(environ).queue.max_batch_size == 10_000


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        (env.PREDTRACE_COLLECTOR_TOKEN, "tok en", "PREDTRACE_COLLECTOR_TOKEN: collector_token:"),
        (env.PREDTRACE_COLLECTOR_TIMEOUT, "100000", "PREDTRACE_COLLECTOR_TIMEOUT: collector_time"),
    ],
)
def test_a_bad_collector_setting_names_its_own_variable(
    variable: str, value: str, says: str
) -> None:
    # Was named PREDTRACE_COLLECTOR_URL (the timeout), or no variable at all (the token).
    environ = {env.PREDTRACE_COLLECTOR_URL: "http://127.0.0.1:8700", variable: value}
    with pytest.raises(ConfigError) as raised:
        MiddlewareConfig.from_env(environ)
    assert str(raised.value).startswith(says), raised.value
    assert "tok en" not in str(raised.value)

"""The middleware reads the deployment from the environment as the sidecar does.

One pod is one deployment whichever of them stamps the event: the same
variables (``PREDTRACE_*``, the Kubernetes downward API, ``OTEL_*``) in the
same order, and a value no event could carry fails startup naming its
variable instead of costing every event.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from predtrace.collector.store._rows import deployment_key
from predtrace.middleware import ConfigError, MiddlewareConfig, instrument_app
from predtrace.middleware import environment_variables as env
from predtrace.middleware._runtime import build_exporter
from predtrace.middleware.testing import call_asgi
from predtrace.sidecar._config import DeploymentConfig
from predtrace.sidecar._errors import ConfigError as SidecarConfigError
from predtrace.sidecar._processors import DeploymentEnricher
from predtrace.sidecar.pipeline import DEPLOYMENT_FIELDS, CollectorHttpExporter
from predtrace.sidecar.testing import InMemoryExporter
from predtrace.wire import DEFAULT_LIMITS, PredictionEvent

# The tester's environment (F4): downward API, both spellings, and the OTel resource.
K8S = {
    "POD_NAME": "pod-a",
    "NODE_NAME": "node-1",
    "POD_NAMESPACE": "ns1",
    "PREDTRACE_K8S_POD_NAME": "pod-a",
    "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=pod-a,k8s.namespace.name=ns1,k8s.node.name=node-1",
    "PREDTRACE_SERVICE_NAME": "svc-k",
}
# MiddlewareConfig's name of each field of the sidecar's DeploymentConfig.
_CONFIG_FIELD = {name: name for name in DEPLOYMENT_FIELDS} | {"id": "deployment_id"}


def _from_env(environ: dict[str, str]) -> MiddlewareConfig:
    return MiddlewareConfig.from_env(environ, exporter=InMemoryExporter())


def _middleware_deployment(config: MiddlewareConfig) -> dict[str, str]:
    return {name: getattr(config, _CONFIG_FIELD[name]) for name in DEPLOYMENT_FIELDS}


def _sidecar_deployment(environ: dict[str, str]) -> dict[str, str]:
    return dataclasses.asdict(DeploymentConfig.from_env(environ))


# -- F4: the downward-API variables the sidecar reads ------------------------------------


def test_the_downward_api_and_otel_resource_give_the_middleware_pod_node_and_namespace() -> None:
    config = _from_env(K8S)
    assert (config.namespace, config.pod, config.node) == ("ns1", "pod-a", "node-1")
    assert (config.service, config.deployment_id) == ("svc-k", "")


@pytest.mark.parametrize(
    "environ",
    [
        K8S,
        {"POD_NAME": "p", "NODE_NAME": "n", "POD_NAMESPACE": "ns"},
        {"K8S_POD_NAME": "p", "K8S_NODE_NAME": "n", "K8S_NAMESPACE": "ns"},
        {
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=churn%20api,k8s.pod.name=p%2C1,"
            "k8s.node.name=n,k8s.namespace.name=ns,container.image.name=reg/churn,"
            "container.image.id=sha256:" + "c" * 64,
            "OTEL_SERVICE_NAME": "otel-svc",
        },
        {"PREDTRACE_DEPLOYMENT_ID": "dep-1", "PREDTRACE_IMAGE_DIGEST": "sha256:ab"},
        {"PREDTRACE_K8S_POD": "mw-pod", "PREDTRACE_K8S_NODE": "mw-node", "POD_NAME": "x"},
    ],
)
def test_middleware_and_sidecar_read_the_same_deployment_from_one_environment(
    environ: dict[str, str],
) -> None:
    assert _middleware_deployment(_from_env(environ)) == _sidecar_deployment(environ)


@pytest.mark.parametrize(
    ("field", "chain"),
    [
        (
            "pod",
            [
                ("PREDTRACE_K8S_POD_NAME", "a"),
                ("PREDTRACE_K8S_POD", "b"),
                ("POD_NAME", "c"),
                ("K8S_POD_NAME", "d"),
                ("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=e"),
            ],
        ),
        (
            "node",
            [
                ("PREDTRACE_K8S_NODE_NAME", "a"),
                ("PREDTRACE_K8S_NODE", "b"),
                ("NODE_NAME", "c"),
                ("K8S_NODE_NAME", "d"),
                ("OTEL_RESOURCE_ATTRIBUTES", "k8s.node.name=e"),
            ],
        ),
        (
            "namespace",
            [
                ("PREDTRACE_K8S_NAMESPACE", "a"),
                ("POD_NAMESPACE", "b"),
                ("K8S_NAMESPACE", "c"),
                ("OTEL_RESOURCE_ATTRIBUTES", "k8s.namespace.name=d"),
            ],
        ),
        (
            "service",
            [
                ("PREDTRACE_SERVICE_NAME", "a"),
                ("OTEL_SERVICE_NAME", "b"),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=c"),
            ],
        ),
        (
            "image_digest",
            [
                ("PREDTRACE_IMAGE_DIGEST", "sha256:a"),
                ("OTEL_RESOURCE_ATTRIBUTES", "container.image.id=sha256:b"),
            ],
        ),
    ],
)
def test_each_variable_wins_over_the_ones_after_it_as_the_sidecar_documents(
    field: str, chain: list[tuple[str, str]]
) -> None:
    for first in range(len(chain)):
        environ = dict(chain[first:])
        expected = chain[first][1].rpartition("=")[2]
        assert getattr(_from_env(environ), field) == expected, environ
        assert getattr(DeploymentConfig.from_env(environ), field) == expected, environ


def test_the_middleware_names_of_the_variables_keep_working() -> None:
    environ = {
        env.PREDTRACE_K8S_NAMESPACE: "ml",
        env.PREDTRACE_K8S_POD: "pod-1",
        env.PREDTRACE_K8S_NODE: "node-1",
        env.PREDTRACE_DEPLOYMENT_ID: "dep-1",
        env.PREDTRACE_IMAGE_DIGEST: "sha256:cd",
        env.PREDTRACE_IMAGE_NAME: "registry/churn",
        env.PREDTRACE_SERVICE_NAME: "own",
        env.OTEL_SERVICE_NAME: "otel",
    }
    config = _from_env(environ)
    assert (config.namespace, config.pod, config.node) == ("ml", "pod-1", "node-1")
    assert (config.deployment_id, config.image_digest) == ("dep-1", "sha256:cd")
    assert (config.image_name, config.service) == ("registry/churn", "own")


def test_explicit_arguments_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in K8S.items():
        monkeypatch.setenv(name, value)
    config = MiddlewareConfig(exporter=InMemoryExporter(), pod="mine", namespace="own-ns")
    assert (config.pod, config.namespace, config.node, config.service) == ("mine", "own-ns", "", "")
    replaced = dataclasses.replace(_from_env(K8S), pod="mine")
    assert (replaced.pod, replaced.node) == ("mine", "node-1")


# -- F11: the image digest from OTEL_RESOURCE_ATTRIBUTES -------------------------------


def test_the_image_digest_comes_from_the_otel_resource_when_not_set_apart() -> None:
    digest = "sha256:" + "b" * 64
    resource = f"container.image.id={digest},container.image.name=reg/churn"
    config = _from_env({"OTEL_RESOURCE_ATTRIBUTES": resource})
    assert (config.image_digest, config.image_name) == (digest, "reg/churn")
    both = {"OTEL_RESOURCE_ATTRIBUTES": resource, env.PREDTRACE_IMAGE_DIGEST: "sha256:own"}
    assert _from_env(both).image_digest == "sha256:own"


# -- F8: a value no event could carry fails startup, naming its variable -----------------


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({env.PREDTRACE_K8S_POD: "p" * 70_000}, "PREDTRACE_K8S_POD cannot be the deployment's pod"),
        ({"PREDTRACE_K8S_POD_NAME": "p" * 70_000}, "PREDTRACE_K8S_POD_NAME cannot be the "),
        ({"POD_NAMESPACE": "\u00e9" * 40_000}, "POD_NAMESPACE cannot be the deployment's"),
        ({"NODE_NAME": "n\x00"}, "NODE_NAME cannot be the deployment's node"),
        ({env.PREDTRACE_IMAGE_NAME: "reg/\udcff"}, "not valid UTF-8"),
        (
            {"OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=a%00b"},
            "OTEL_RESOURCE_ATTRIBUTES (k8s.pod.name) cannot be the deployment's pod",
        ),
        ({env.PREDTRACE_DEPLOYMENT_ID: "d" * 65_537}, "more than the 65536 bytes"),
        ({env.PREDTRACE_SERVICE_NAME: "s" * 65_537}, "PREDTRACE_SERVICE_NAME cannot be"),
        ({env.PREDTRACE_MODEL_NAME: "m" * 70_000}, "PREDTRACE_MODEL_NAME: model_name cannot be"),
        ({env.PREDTRACE_MODEL_VERSION: "3\x00"}, "PREDTRACE_MODEL_VERSION: model_version cannot"),
        ({env.PREDTRACE_MODEL_ALIAS: "a" * 70_000}, "PREDTRACE_MODEL_ALIAS: model_alias cannot"),
        ({env.PREDTRACE_MODEL_ID: "models:/\udcff"}, "PREDTRACE_MODEL_ID: model_id cannot"),
        ({env.PREDTRACE_MODEL_DIGEST: "d" * 70_000}, "PREDTRACE_MODEL_DIGEST: model_digest"),
    ],
)
def test_an_identity_value_no_event_could_carry_fails_startup_naming_its_variable(
    environ: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _from_env(environ)
    assert says in str(info.value)
    assert len(str(info.value)) < 300, "the message does not echo the value"
    if not next(iter(environ)).startswith("PREDTRACE_MODEL_"):  # the sidecar reads no model
        with pytest.raises(SidecarConfigError) as sidecar:
            DeploymentConfig.from_env(environ)
        assert str(sidecar.value) == str(info.value), "one message for one variable"


@pytest.mark.parametrize(
    "field",
    ["pod", "node", "namespace", "service", "deployment_id", "image_digest", "model_name"],
)
def test_an_identity_argument_no_event_could_carry_is_refused(field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field} cannot be stamped on events"):
        MiddlewareConfig(exporter=InMemoryExporter(), **{field: "x" * 65_537})
    with pytest.raises(ConfigError, match="NUL"):
        MiddlewareConfig(exporter=InMemoryExporter(), **{field: "a\x00b"})


def test_a_value_of_the_largest_text_is_taken() -> None:
    assert len(_from_env({"POD_NAME": "p" * 65_536}).pod) == 65_536
    assert len(_from_env({env.PREDTRACE_MODEL_NAME: "m" * 65_536}).model_name) == 65_536


def test_a_long_service_name_still_gives_a_producer_id_the_collector_takes() -> None:
    # The service name prefixes the direct-mode producer id: 250 characters made
    # one of 263, over the collector's 256, and every batch was refused.
    service = "s" * 250
    config = MiddlewareConfig.from_env(
        {env.PREDTRACE_COLLECTOR_URL: "http://127.0.0.1:8700", env.PREDTRACE_SERVICE_NAME: service}
    )
    exporter = build_exporter(config)
    try:
        assert isinstance(exporter, CollectorHttpExporter)
        assert len(exporter.producer_id) <= DEFAULT_LIMITS.max_id_len
        assert exporter.producer_id.startswith("s" * 200)
        assert config.service == service, "events keep the whole name"
    finally:
        exporter.shutdown(1)


# -- the TLS files of the sidecar: checked at startup, naming the variable ---------------


@pytest.mark.parametrize(
    ("missing", "variable"),
    [
        ("ca", env.PREDTRACE_SIDECAR_TLS_CA),
        ("cert", env.PREDTRACE_SIDECAR_TLS_CERT),
        ("key", env.PREDTRACE_SIDECAR_TLS_KEY),
    ],
)
def test_an_unreadable_sidecar_tls_file_fails_from_env_naming_the_variable(
    tmp_path: Path, missing: str, variable: str
) -> None:
    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"{name}.pem"
        if name != missing:
            files[name].write_bytes(b"-----BEGIN X-----\n")
    environ = {
        env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:4555",
        env.PREDTRACE_SIDECAR_TLS_CA: str(files["ca"]),
        env.PREDTRACE_SIDECAR_TLS_CERT: str(files["cert"]),
        env.PREDTRACE_SIDECAR_TLS_KEY: str(files["key"]),
    }
    with pytest.raises(ConfigError) as info:
        MiddlewareConfig.from_env(environ)
    message = str(info.value)
    assert message.startswith(f"{variable}: "), message
    assert f"{missing}.pem" in message


def test_readable_sidecar_tls_files_pass_and_direct_mode_does_not_read_them(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    config = MiddlewareConfig.from_env(
        {env.PREDTRACE_SIDECAR_TARGET: "127.0.0.1:4555", env.PREDTRACE_SIDECAR_TLS_CA: str(ca)}
    )
    assert config.sidecar_tls_ca == str(ca)
    config = MiddlewareConfig(
        collector_url="http://127.0.0.1:8700", sidecar_tls_ca=str(tmp_path / "unused.pem")
    )
    assert config.collector_url


# -- end to end: an event of the middleware and the sidecar's identity agree ---------------


async def _infer(request: Request) -> Response:
    await request.body()
    return JSONResponse({"model_name": "churn", "model_version": "3", "outputs": []})


@pytest.mark.parametrize(
    "environ",
    [
        K8S,
        {
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=svc-o,k8s.namespace.name=ns2,"
            "k8s.pod.name=pod-o,k8s.node.name=node-o,container.image.id=sha256:" + "d" * 64,
        },
    ],
)
async def test_a_middleware_event_and_the_sidecar_agree_on_the_deployment(
    environ: dict[str, str],
) -> None:
    events = InMemoryExporter()
    app = Starlette(routes=[Route("/v2/models/churn/infer", _infer, methods=["POST"])])
    runtime = instrument_app(app, MiddlewareConfig.from_env(environ, exporter=events))
    try:
        response = await call_asgi(app, "POST", "/v2/models/churn/infer", b'{"inputs": []}')
        assert response.status == 200
        assert runtime.force_flush(5)
    finally:
        runtime.shutdown(2)
    (event,) = events.events
    sidecar = DeploymentConfig.from_env(environ)
    direct: dict[str, Any] = {name: getattr(event.deployment, name) for name in DEPLOYMENT_FIELDS}
    assert direct == dataclasses.asdict(sidecar)
    # Through the sidecar an event of an uninstrumented producer gets the same identity,
    # and the collector keys both under one deployment id.
    through_sidecar = DeploymentEnricher(sidecar)(PredictionEvent("p-1"))
    assert deployment_key(event) == deployment_key(through_sidecar)
    assert deployment_key(event) == f"{sidecar.namespace}/{sidecar.service}"


def test_values_are_stripped_and_a_blank_one_is_unset_on_both_sides() -> None:
    # Padded values were stripped by the middleware before the shared chain;
    # a changed deployment key after an upgrade would split one deployment.
    environ = {
        "PREDTRACE_SERVICE_NAME": "  ",
        "OTEL_SERVICE_NAME": "svc\n",
        "PREDTRACE_K8S_NAMESPACE": " ns1 ",
        "PREDTRACE_DEPLOYMENT_ID": "\tprod-1 ",
    }
    config = _from_env(environ)
    assert (config.service, config.namespace, config.deployment_id) == ("svc", "ns1", "prod-1")
    assert _middleware_deployment(config) == _sidecar_deployment(environ)


def test_a_disabled_middleware_reads_and_refuses_no_deployment() -> None:
    environ = {"PREDTRACE_ENABLED": "false", "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=a%00b"}
    config = MiddlewareConfig.from_env(environ)
    assert not config.enabled and config.pod == ""

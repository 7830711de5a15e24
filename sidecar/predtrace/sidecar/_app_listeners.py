"""The sidecar's listeners: gRPC server options, TLS, and the addresses they bind.

SidecarApp (``_app``) -> **listeners**. Every gRPC listener of the sidecar
(its API, the OTLP receiver, OIP proxies) takes the same message size limits
and keepalive, and the same TLS credentials; the OTLP/HTTP listener takes
the matching ``ssl`` context. An address that cannot be bound fails the
start with the flag it came from.
"""

from __future__ import annotations

import ssl

import grpc

from predtrace.sidecar._config import SidecarConfig, join_hostport, parse_hostport
from predtrace.sidecar._errors import ConfigError


def grpc_server_options(config: SidecarConfig) -> list[tuple[str, int]]:
    """Message size limits and keepalive for every gRPC listener of the sidecar.

    The server pings a connection with calls in flight every
    ``keepalive_time`` and closes it when a ping goes unanswered for
    ``keepalive_timeout``: a producer that vanished (an edge device losing
    its link) frees its streams instead of holding them open. A dead peer
    is cut off by ``grpc.http2.ping_timeout_ms`` (a minute in gRPC core
    by default), not by the keepalive timeout alone, so both are set.
    ``SO_REUSEPORT`` (on by default in gRPC) is off: with it, a second
    sidecar, or a second listener of this one, bound the same port and the
    kernel split producers between them.
    """
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", round(config.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout * 1000)),
        ("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


def tls(config: SidecarConfig) -> tuple[grpc.ServerCredentials | None, ssl.SSLContext | None]:
    """gRPC credentials and the HTTP listener's TLS context; client certs required with a CA.

    Raises:
        ConfigError: a certificate, key or CA cannot be read or loaded.
    """
    files = config.tls_files()
    if files is None:
        return None, None
    chain, key, client_ca = files
    credentials = grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
        if client_ca is not None:
            context.load_verify_locations(cadata=client_ca.decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED
    except ssl.SSLError as exc:
        raise ConfigError(f"cannot load the TLS certificate, key or client CA: {exc}") from None
    return credentials, context


def bind(
    server: grpc.aio.Server,
    listen: str,
    what: str,
    credentials: grpc.ServerCredentials | None = None,
) -> str:
    """Add a port to ``server`` for ``listen`` (from flag ``what``); the address bound.

    Raises:
        OSError: the address is in use or unusable.
    """
    host, port = parse_hostport(listen, what)
    address = join_hostport(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # what current grpcio raises where it used to return 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {listen} ({what}): the address is in use or unusable")
    return join_hostport(host, bound)


def next_port(listen: str) -> str:
    """The OTLP/HTTP address by default: the port after ``--otlp-listen``'s (0 stays 0)."""
    host, port = parse_hostport(listen, "--otlp-listen")
    return join_hostport(host, port + 1 if port else 0)

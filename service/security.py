"""Authentication and transport security for the gRPC server (the gateway forwards).

- **API keys.** With keys configured (`ANOMALY_API_KEYS`, a JSON list, and/or
  `ANOMALY_API_KEYS_FILE`, one key per line), every call must carry one in the `x-api-key`
  metadata entry (or `authorization: Bearer <key>`); otherwise `UNAUTHENTICATED`. Keys are
  compared in constant time and never logged or echoed. Health checks and reflection stay
  open, so orchestrators can probe without a key. The gateway passes the caller's
  `X-API-Key` / `Authorization` header through; it holds no key of its own.
- **TLS / mutual TLS.** `ANOMALY_TLS_CERT_FILE` + `ANOMALY_TLS_KEY_FILE` serve gRPC over
  TLS; adding `ANOMALY_TLS_CLIENT_CA_FILE` requires client certificates signed by that CA.
  The gateway reaches a TLS server with `ANOMALY_GRPC_TLS_CA_FILE` (and its own client
  certificate, `ANOMALY_GRPC_CLIENT_CERT_FILE` / `…_KEY_FILE`, for mTLS), and serves HTTPS
  with `ANOMALY_HTTPS_CERT_FILE` / `ANOMALY_HTTPS_KEY_FILE`.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from anomaly.channel import channel_credentials
from service.settings import Settings

__all__ = ["ApiKeyInterceptor", "channel_credentials", "exposure_warning", "load_api_keys",
           "server_credentials"]

# Health, reflection and the Open Inference Protocol's liveness and readiness: open to
# orchestrators without a key, and not counted against the concurrency cap.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/inference.GRPCInferenceService/ServerLive",
                 "/inference.GRPCInferenceService/ServerReady")
API_KEY_HEADER = "x-api-key"


def load_api_keys(settings: Settings) -> list[bytes]:
    """The configured keys (from the setting and the file), as bytes; empty = no auth."""
    keys = [k.get_secret_value() for k in settings.api_keys]
    if settings.api_keys_file:
        keys += [line.strip() for line in Path(settings.api_keys_file).read_text().splitlines()
                 if line.strip() and not line.startswith("#")]
    return [k.encode() for k in keys]


def presented_key(metadata: tuple | None) -> bytes:
    """The key a call carries (`x-api-key`, or `authorization: Bearer …`), or b""."""
    for key, value in metadata or ():
        if key == API_KEY_HEADER:
            return value.encode() if isinstance(value, str) else value
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip().encode()
    return b""


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key (`UNAUTHENTICATED`), except health and reflection."""

    def __init__(self, keys: list[bytes]) -> None:
        self._keys = keys

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                f"missing or invalid API key: send it in the '{API_KEY_HEADER}' metadata")

        async def deny_stream(request_iterator: object, context: grpc.aio.ServicerContext) -> None:
            await deny(None, context)

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny_stream)

    def _valid(self, key: bytes) -> bool:
        ok = False
        for k in self._keys:  # no early exit: the time taken does not depend on which key matched
            ok |= hmac.compare_digest(k, key)
        return ok and bool(key)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass through keyed and open calls; answer the rest with UNAUTHENTICATED."""
        key = presented_key(details.invocation_metadata)
        if details.method.startswith(OPEN_SERVICES) or self._valid(key):
            return await continuation(details)
        return self._deny_stream if details.method.endswith("/ScoreStream") else self._deny_unary


def is_loopback(host: str) -> bool:
    """Whether binding `host` (an address or name) listens on loopback only."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, has_keys: bool) -> str | None:
    """The start-up warning for a server reachable beyond this machine with no API keys."""
    if has_keys or is_loopback(host):
        return None
    return (f"binding {host} beyond loopback with no API keys: anyone who can reach this port can score "
            "images and read model details; set ANOMALY_API_KEYS or ANOMALY_API_KEYS_FILE")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and, with a client CA, mutual TLS) credentials for the server, or None."""
    if not settings.tls_cert_file:
        return None
    if not settings.tls_key_file:
        raise ValueError("ANOMALY_TLS_CERT_FILE is set but ANOMALY_TLS_KEY_FILE is not")
    pair = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

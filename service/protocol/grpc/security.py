"""Authentication and transport security for the gRPC server (the gateway forwards).

- **API keys and roles.** With keys configured (`ANOMALY_API_KEYS`, a JSON list, and/or
  `ANOMALY_API_KEYS_FILE`, one entry per line; the format and the roles are in
  `service.keys`), every call must carry one in the `x-api-key` metadata entry (or
  `authorization: Bearer <key>`); otherwise `UNAUTHENTICATED`. A key whose role does not
  allow the call (`METHOD_ROLES`: `score` scores and reads metadata, `operate` also sends
  feedback, `admin` also controls models and reads statistics) gets `PERMISSION_DENIED`
  (HTTP 403). Both are decided before the call takes an admission slot. Keys are compared
  in constant time and never logged or echoed; their names are what logs and feedback rows
  show. Health checks and reflection stay open, so orchestrators can probe without a key.
  A refused call is answered as soon as it starts, before its request message arrives (a
  client that sends headers and never a message cannot hold the call open).
  The gateway passes the caller's `X-API-Key` / `Authorization` header through; it holds
  no key of its own. Without keys there is no authentication and every caller may make
  every call (a warning at start-up when that is beyond loopback).
- **TLS / mutual TLS.** `ANOMALY_TLS_CERT_FILE` + `ANOMALY_TLS_KEY_FILE` serve gRPC over
  TLS; adding `ANOMALY_TLS_CLIENT_CA_FILE` requires client certificates signed by that CA.
  The gateway reaches a TLS server with `ANOMALY_GRPC_TLS_CA_FILE` (and its own client
  certificate, `ANOMALY_GRPC_CLIENT_CERT_FILE` / `…_KEY_FILE`, for mTLS), and serves HTTPS
  with `ANOMALY_HTTPS_CERT_FILE` / `ANOMALY_HTTPS_KEY_FILE`.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from anomaly.channel import channel_credentials
from service.keys import ApiKey, Role, allows, check_unique, parse_entry, parse_file
from service.protocol.grpc.admission import refusing
from service.settings import Settings

__all__ = ["ApiKeyInterceptor", "METHOD_ROLES", "caller", "channel_credentials", "exposure_warning",
           "load_api_keys", "server_credentials"]

# Health, reflection and the Open Inference Protocol's liveness and readiness: open to
# orchestrators without a key.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.", "/inference.GRPCInferenceService/ServerLive",
                 "/inference.GRPCInferenceService/ServerReady")
API_KEY_HEADER = "x-api-key"
_V1, _V2 = "/anomaly.v1.AnomalyDetection/", "/inference.GRPCInferenceService/"
# The role each call needs (a method not listed needs `admin`).
METHOD_ROLES: dict[str, Role] = {
    **{_V1 + m: "score" for m in ("Score", "ScoreStream", "ListModels", "GetModel")},
    **{_V1 + m: "operate" for m in ("Feedback", "ListReviews", "GetEvidence", "GetQuality",
                                   "GetPromotion")},
    **{_V2 + m: "score" for m in ("ModelInfer", "ModelMetadata", "ModelReady", "ServerMetadata")},
    **{_V2 + m: "admin" for m in ("ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
                                  "RepositoryModelUnload")},
}
STREAMING = {_V1 + "ScoreStream"}  # the calls among ours that stream requests and answers
log = logging.getLogger(__name__)


def load_api_keys(settings: Settings) -> list[ApiKey]:
    """The configured keys (from the setting and the file); empty = no auth.

    Raises:
        ValueError: a malformed entry in the file, or two keys with the same secret or name.
    """
    keys = [parse_entry(entry) for entry in settings.api_keys]
    if settings.api_keys_file:
        keys += parse_file(Path(settings.api_keys_file).read_text())
    return check_unique(keys)


def describe_keys(keys: list[ApiKey]) -> str:
    """The start-up line about the keys: names and roles, never a secret."""
    listed = ", ".join(f"{k.name} ({k.granted}{'' if k.role else ', no role given'})" for k in keys)
    bare = sum(1 for k in keys if k.role is None)
    note = (f"; {bare} key(s) named no role and may only score and read metadata (role score): give a key "
            "another role as 'role:name:key'") if bare else ""
    return f"API keys required ({len(keys)}: {listed}){note}; health and reflection stay open"


def presented_key(metadata: tuple | None) -> bytes:
    """The key a call carries (`x-api-key`, or `authorization: Bearer …`), or b""."""
    for key, value in metadata or ():
        if key == API_KEY_HEADER:
            return value.encode() if isinstance(value, str) else value
        if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
            return value[7:].strip().encode()
    return b""


def needed_role(method: str) -> Role:
    """The role a call to `method` (`/package.Service/Method`) needs."""
    return METHOD_ROLES.get(method, "admin")


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid key (`UNAUTHENTICATED`) and calls the key's role does
    not allow (`PERMISSION_DENIED`), except health and reflection; before any slot is taken."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [(k.key.get_secret_value().encode(), k) for k in keys]

    def identify(self, metadata: tuple | None) -> ApiKey | None:
        """The key a call's metadata carries, if it is one of ours."""
        presented = presented_key(metadata)
        found = None
        for secret, key in self._keys:  # no early exit: the time taken does not depend on which matched
            if hmac.compare_digest(secret, presented):
                found = key
        return found if presented else None

    @staticmethod
    def _deny(method: str, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
        """Refuse at once, without waiting for a request message that may never come
        (`admission.refusing`)."""
        return refusing("stream_stream" if method in STREAMING else "unary_unary", code, message)

    def refusal(self, method: str, metadata: tuple | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a call to `method` (`/package.Service/Method`) carrying `metadata` is refused
        (its status and message), or None when it may run."""
        if method.startswith(OPEN_SERVICES):
            return None
        key = self.identify(metadata)
        if key is None:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    f"missing or invalid API key: send it in the '{API_KEY_HEADER}' metadata")
        needed = needed_role(method)
        if not allows(key.granted, needed):
            log.warning("API key %r (role %s) refused %s, which needs the role %s", key.name, key.granted,
                        method, needed)
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"the API key {key.name!r} has the role {key.granted}; "
                    f"{method.rsplit('/', 1)[-1]} needs the role {needed} (roles: score ⊂ operate ⊂ admin)")
        return None

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass through open calls and calls whose key allows them; refuse the rest."""
        refused = self.refusal(details.method, details.invocation_metadata)
        if refused is not None:
            return self._deny(details.method, *refused)
        return await continuation(details)


def _peer_host(peer: str) -> str:
    """The address of a gRPC peer string without its scheme and port (`ipv4:10.0.0.5:4242` →
    `10.0.0.5`, `ipv6:[::1]:4242` → `::1`)."""
    scheme, sep, rest = peer.partition(":")
    if not sep:
        return peer
    if scheme == "ipv6" and rest.startswith("["):
        return rest[1:].partition("]")[0]
    if scheme == "ipv4":
        return rest.rpartition(":")[0] or rest
    return rest


def caller(keys: ApiKeyInterceptor | None, context: grpc.aio.ServicerContext) -> str:
    """Who makes a call, as feedback rows record it: the name of its API key, or without
    keys `anonymous@<peer address>` (the gateway's address for calls through the gateway)."""
    if keys is not None:
        key = keys.identify(tuple(context.invocation_metadata() or ()))
        if key is not None:
            return key.name
    try:
        peer = context.peer()
    except Exception:  # a context that cannot say
        peer = ""
    return f"anonymous@{_peer_host(peer or 'unknown')}"


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
            "images, read model details, send feedback and load or unload model versions; set "
            "ANOMALY_API_KEYS or ANOMALY_API_KEYS_FILE")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and, with a client CA, mutual TLS) credentials for the server, or None."""
    if not settings.tls_cert_file:
        return None
    if not settings.tls_key_file:
        raise ValueError("ANOMALY_TLS_CERT_FILE is set but ANOMALY_TLS_KEY_FILE is not")
    pair = (Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

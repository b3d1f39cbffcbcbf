"""The serve image's HEALTHCHECK: exit 0 when what the container runs is healthy, 1 when not.

The image runs either `anomaly serve` (the gRPC server) or `anomaly gateway` (HTTP); which one
is read from the container's first process (`/proc/1/cmdline`, `--port` there included):

- `serve`: asks the server's `grpc.health.v1` service (`SERVICE`, first argument; default ""
  = SERVING once a model serves, the readiness docker-compose's `service_healthy` waits for;
  "liveness" = the process answers, whether or not a model serves yet). With TLS
  (`ANOMALY_TLS_CERT_FILE`), it trusts `ANOMALY_GRPC_TLS_CA_FILE` (else the server's own
  certificate) and presents `ANOMALY_GRPC_CLIENT_CERT_FILE`/`_KEY_FILE` if set, as the gateway
  does; the server certificate must then name `localhost`.
- `gateway`: `GET /healthz` on its HTTP port.

Ports and TLS come from the same `ANOMALY_*` settings the processes read (`service.settings`).
"""

from __future__ import annotations

import sys
from pathlib import Path


def _command() -> list[str]:
    try:
        return Path("/proc/1/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def check_server(port: int, service: str, config) -> str:  # type: ignore[no-untyped-def]
    """The server's health status name (SERVING, NOT_SERVING …); raises grpc.RpcError."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from anomaly.channel import grpc_channel

    tls = (None, None, None)
    options = None
    if config.tls_cert_file:
        tls = (config.grpc_tls_ca_file or config.tls_cert_file, config.grpc_client_cert_file,
               config.grpc_client_key_file)
        options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc_channel(f"127.0.0.1:{port}", aio=False, tls=tls, options=options) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=3.0)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def check_gateway(port: int, config) -> str:  # type: ignore[no-untyped-def]
    """The gateway's `/healthz` answer; raises httpx.HTTPError."""
    import httpx

    scheme = "https" if config.https_cert_file else "http"
    reply = httpx.get(f"{scheme}://127.0.0.1:{port}/healthz", timeout=3.0, verify=False)
    reply.raise_for_status()
    return "SERVING"


def main(argv: list[str]) -> int:
    """Check; print one line; 0 healthy, 1 not."""
    from service.settings import Settings

    try:
        config = Settings()
    except Exception as exc:  # settings the process itself would refuse: unhealthy, in one line
        print(f"unhealthy: the settings cannot be read: {str(exc).splitlines()[0] if str(exc) else exc!r}")
        return 1
    args = _command()
    port = _option(args, "--port")
    what = "gateway" if "gateway" in args else "gRPC server"
    try:
        if what == "gateway":
            status = check_gateway(int(port or config.http_port), config)
        else:
            status = check_server(int(port or config.grpc_port), argv[0] if argv else "", config)
    except Exception as exc:  # any failure is "unhealthy", said in one line
        print(f"{what} unhealthy: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return 1
    print(f"{what}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

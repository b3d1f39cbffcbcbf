"""The HTTP API in the gRPC server's own process (`ANOMALY_HTTP_IN_PROCESS`).

The gateway's routes (`service.protocol.rest`) build a request message and call a backend
(`service.protocol.rest.forwarding.Backend`). Run as its own process the gateway's backend
is a gRPC connection; here it is `PlaneBackend`, which calls the server's own handlers on
the data plane (the servicer methods that translate messages to data-plane calls and back)
with no serialisation, no HTTP/2, no emulated gRPC call and no second process, as KServe
serves REST and gRPC from one data plane. Each transport maps a failure once: the gRPC
server turns a `ServiceError` into its status (`service.errors.answering`), and this module
turns it into the HTTP answer of that status, from the gateway's one table
(`forwarding.problem`). An HTTP call is checked as a gRPC call is: its API key and role
(`ApiKeyInterceptor.refusal`), then a slot of the concurrent-call limit (`Admission`).

`serve_http` runs the FastAPI app with uvicorn on the server's event loop until asked to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from service import metrics
from service.errors import ServiceError, internal_error
from service.protocol.grpc.admission import Admission
from service.protocol.grpc.security import ApiKeyInterceptor
from service.protocol.rest.forwarding import Metadata, problem

if TYPE_CHECKING:
    from service.protocol.grpc.server import GrpcServer

log = logging.getLogger(__name__)


class Aborted(Exception):
    """A handler ended its call with a status (`Call.abort`)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class Call:
    """What a handler reads of the call it answers: the time left before its deadline, the
    caller's metadata (whose key names the sender of feedback) and the peer."""

    def __init__(self, timeout: float | None, metadata: Metadata) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._metadata = tuple(metadata)

    def time_remaining(self) -> float | None:  # noqa: D102
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:  # noqa: D102
        return self._metadata

    def peer(self) -> str:  # noqa: D102
        return "in-process"

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        """End the call with `code` (a handler that answers a status itself: health's Check)."""
        raise Aborted(code, details)


class PlaneBackend:
    """One service's handlers called in this process (`forwarding.Backend`).

    Args:
        service: full service name, e.g. `anomaly.v1.AnomalyDetection` (what keys' roles and
            admission name a method by: `/<service>/<method>`).
        handlers: the servicer whose `async def Method(request, context)` answers.
        keys: the server's key check (None: no keys configured, or an open service).
        admission: the server's call limits (None: uncapped).
    """

    def __init__(self, service: str, handlers: object, keys: ApiKeyInterceptor | None = None,
                 admission: Admission | None = None) -> None:
        self.service, self.handlers, self.keys, self.admission = service, handlers, keys, admission

    async def call(self, method: str, message: object, timeout: float | None, metadata: Metadata) -> object:
        """Check the caller, take a slot, run the handler; a failure raises its `Problem`."""
        full = f"/{self.service}/{method}"
        refused = self.keys.refusal(full, tuple(metadata)) if self.keys is not None else None
        if refused is not None:
            raise problem(*refused)
        pool = self.admission.unary_pool(full) if self.admission is not None else None
        slot = pool.take() if pool is not None else None
        if pool is not None and slot is None:
            metrics.ADMISSION_REFUSALS.labels(pool.name).inc()
            raise problem(grpc.StatusCode.RESOURCE_EXHAUSTED, pool.message())
        # The handler itself, without the gRPC transport's own error translation (`answering`).
        handler = inspect.unwrap(getattr(type(self.handlers), method))
        started = time.monotonic()
        try:
            return await asyncio.wait_for(handler(self.handlers, message, Call(timeout, metadata)), timeout)
        except ServiceError as exc:
            raise problem(exc.code, exc.message) from None
        except Aborted as exc:
            raise problem(exc.code, exc.details) from None
        except asyncio.TimeoutError as exc:
            if timeout is not None and time.monotonic() - started >= timeout:  # the call's deadline
                raise problem(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
            error = internal_error(exc, getattr(message, "request_id", "") or getattr(message, "id", ""))
            raise problem(error.code, error.message) from None
        except Exception as exc:
            error = internal_error(exc, getattr(message, "request_id", "") or getattr(message, "id", ""))
            raise problem(error.code, error.message) from None
        finally:
            if slot is not None:
                slot.release()


@dataclass(frozen=True)
class LocalBackends:
    """The in-process server's services, as the gateway's routes call them."""

    v1: PlaneBackend
    v2: PlaneBackend
    health: PlaneBackend


def local_backends(server: GrpcServer) -> LocalBackends:
    """`server`'s anomaly.v1, Open Inference Protocol and health handlers, each checked by its
    keys and limits as the gRPC server checks them (health: neither, as over gRPC)."""
    from service.protocol.grpc import oip
    from service.protocol.grpc.server import HEALTH_SERVICE, SERVICE_NAME

    return LocalBackends(PlaneBackend(SERVICE_NAME, server.servicer, server.keyring, server.admission),
                         PlaneBackend(oip.SERVICE_NAME, server.v2_servicer, server.keyring, server.admission),
                         PlaneBackend(HEALTH_SERVICE, server.health))


class _EmbeddedServer:
    """uvicorn's server without its signal handling (the gRPC server owns SIGTERM/SIGINT)."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self.server = Server(config)
        self.task: asyncio.Task | None = None

    async def start(self, sockets: list | None = None) -> None:
        self.task = asyncio.get_running_loop().create_task(self._serve(sockets))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # re-raises why it could not start
                raise RuntimeError("the in-process HTTP server stopped while starting")
            await asyncio.sleep(0.02)

    async def _serve(self, sockets: list | None) -> None:
        try:
            await self.server.serve(sockets)
        except SystemExit:
            # uvicorn's answer to a port it cannot bind (it logged why). Left as it is, SystemExit
            # leaves the event loop at once, past every cleanup: the gRPC server is never stopped
            # and the interpreter crashes on exit with its threads still running.
            raise OSError(f"the HTTP API could not listen on {self.server.config.host}:"
                          f"{self.server.config.port} (in use, or not an address of this host; see the "
                          "log line above)") from None

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await self.task


async def serve_http(app: Any, host: str, port: int, *, log_level: str = "info", grace_s: float = 5.0,
                     tls: dict[str, str] | None = None, reuse_port: bool = False) -> _EmbeddedServer:
    """Start `app` on `host:port` in this event loop; returns the handle to `stop()`.
    `reuse_port`: bind with SO_REUSEPORT (the children of `service.processes` share it)."""
    import socket

    import uvicorn

    # log_config None: uvicorn's start-up and access lines go through the project's format
    # (service.logs), JSON included, rather than uvicorn's own plain-text handlers.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), lifespan="on",
                            timeout_graceful_shutdown=int(grace_s), log_config=None, **(tls or {}))
    sockets = None
    if reuse_port:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sockets = [sock]
    server = _EmbeddedServer(config)
    await server.start(sockets)
    log.info("HTTP API in-process on %s:%d", host, port)
    return server

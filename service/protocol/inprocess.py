"""The HTTP API in the gRPC server's own process (`ANOMALY_HTTP_IN_PROCESS`).

The gateway (`service.protocol.rest.gateway`) is a translator: each route builds a proto message, calls a
gRPC method and maps the answer or the status to JSON. Run as its own process it reaches
the server over a gRPC connection; here the same routes call the server's servicers
directly, with no serialisation, no HTTP/2 and no second process, as KServe serves REST
and gRPC from one process. What a call goes through is unchanged: the same interceptors
in the same order (API keys, the concurrent-call limit), the same servicer methods, and
errors raised as the `grpc.aio.AioRpcError` the gateway already maps to problem+json.

`LocalStub` stands in for a generated `…Stub` on a `grpc.aio` channel: `await
stub.Score(message, timeout=…, metadata=…)`. `serve_http` runs the FastAPI app with
uvicorn on the server's event loop until asked to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc

log = logging.getLogger(__name__)


class _CallDetails(grpc.HandlerCallDetails):
    """What interceptors read of a call: its full method name and metadata."""

    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class LocalContext:
    """The part of `grpc.aio.ServicerContext` the servicers and interceptors use."""

    def __init__(self, timeout: float | None, metadata: tuple[tuple[str, str], ...]) -> None:
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._metadata = metadata
        self._code = grpc.StatusCode.OK
        self._details = ""

    def time_remaining(self) -> float | None:  # noqa: D102
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:  # noqa: D102
        return self._metadata

    def peer(self) -> str:  # noqa: D102
        return "in-process"

    def set_code(self, code: grpc.StatusCode) -> None:  # noqa: D102
        self._code = code

    def set_details(self, details: str) -> None:  # noqa: D102
        self._details = details

    def cancelled(self) -> bool:  # noqa: D102
        return False

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence = ()) -> None:
        """End the call with `code`, as the gateway sees a remote call end."""
        raise rpc_error(code, details)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error a `grpc.aio` stub raises for a call that ended with `code`."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class LocalStub:
    """Calls `servicer`'s unary methods in-process, through `interceptors` (outermost first).

    Args:
        service: full service name, e.g. `anomaly.v1.AnomalyDetection` (interceptors match
            on `/<service>/<method>`).
        servicer: the object whose `async def Method(request, context)` answers.
        interceptors: `grpc.aio.ServerInterceptor`s, in the server's order.
    """

    def __init__(self, service: str, servicer: object, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()
                 ) -> None:
        self.service = service
        self.servicer = servicer
        self.interceptors = list(interceptors)

    def __getattr__(self, method: str) -> Callable[..., Awaitable[Any]]:
        if method.startswith("_") or not hasattr(self.servicer, method):
            raise AttributeError(method)

        async def call(request: object, timeout: float | None = None,
                       metadata: Sequence[tuple[str, str]] | None = None) -> object:
            return await self._call(method, request, timeout, tuple(metadata or ()))

        return call

    async def _handler(self, method: str, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def run(i: int, d: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            if i == len(self.interceptors):
                return grpc.unary_unary_rpc_method_handler(getattr(self.servicer, method))
            return await self.interceptors[i].intercept_service(lambda nxt: run(i + 1, nxt), d)

        return await run(0, details)

    async def _call(self, method: str, request: object, timeout: float | None,
                    metadata: tuple[tuple[str, str], ...]) -> object:
        details = _CallDetails(f"/{self.service}/{method}", metadata)
        handler = await self._handler(method, details)
        context = LocalContext(timeout, metadata)
        try:
            return await asyncio.wait_for(handler.unary_unary(request, context), timeout)
        except asyncio.TimeoutError:
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None


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

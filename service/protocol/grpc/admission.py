"""Admission of gRPC calls: separate caps for unary calls, streams and the open long-lived
calls, so that no kind of call can starve another.

Every call falls into one pool:

- **calls**: unary `anomaly.v1` and Open Inference Protocol calls (`Score`, `ModelInfer`,
  metadata, feedback, model control), at most `max_concurrent_rpcs` at once;
- **streams**: `ScoreStream` (and any other streaming call of ours), at most `max_streams`;
- **watch**: health `Watch` and server reflection, open to callers without a key, at most
  `max_watch_streams`;
- **uncapped**: health `Check` and V2 `ServerLive` / `ServerReady`: short, and always
  answered, so probes and orchestrators keep working under any load.

A call beyond its pool's cap gets RESOURCE_EXHAUSTED at once, before its message is read,
naming the setting. A call's slot is taken when it is admitted and given back when its
handler ends, or, for a call that never reaches its handler (a client gone before its
message arrived), when gRPC lets go of the call: no such call keeps a slot.

**Half-open calls.** gRPC runs a unary handler only once the request message has arrived,
but counts the call (against its own `maximum_concurrent_rpcs`) from its headers. So no
answer here waits for a message: a refusal is a handler that streams its requests
(`refusing`), which gRPC runs as soon as the call starts, and an admitted call that sends
one request (every unary call, health `Check` and `Watch` included) is served by a
request-streaming twin of its handler that reads the message itself, within
`request_read_timeout_s` or the call's own deadline if sooner; a call whose message is not
there by then ends with DEADLINE_EXCEEDED and gives its slot back, one that closes with no
message or with one that cannot be parsed gets INVALID_ARGUMENT. The unary form of each
handler stays for in-process calls (`service.protocol.inprocess`), which hand the message over.

This interceptor runs after the API-key check (`service.protocol.grpc.security`): a call without a valid
key, or whose key lacks the role, is refused (at once, by `refusing`) before it takes a
slot. gRPC's own `maximum_concurrent_rpcs` stays as a backstop well above the sum of these
caps (`grpc_backstop`), so ours always refuse first and health checks still answer while
half-open calls, each held for at most the read timeout, stay below it.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from service import metrics
from service.settings import Settings

UNCAPPED = ("/grpc.health.v1.Health/Check", "/inference.GRPCInferenceService/ServerLive",
            "/inference.GRPCInferenceService/ServerReady")
WATCH = ("/grpc.health.v1.Health/Watch", "/grpc.reflection.")
# Calls above our caps: health checks, refusals, calls not yet admitted, and half-open calls
# (headers, no message yet: each holds ~22 KB of server memory for at most the read timeout,
# so this many cost ~90 MB at worst).
BACKSTOP_HEADROOM = 4096
STREAMING_TWIN = {"unary_unary": "stream_unary", "unary_stream": "stream_stream"}


def grpc_backstop(settings: Settings) -> int:
    """The cap of gRPC itself on open calls: above the sum of the pools' caps, so that ours
    refuse first and short calls (health checks, refusals, half-open calls until their read
    timeout) still find room."""
    pools = settings.max_concurrent_rpcs + settings.max_streams + settings.max_watch_streams
    return pools + BACKSTOP_HEADROOM


@dataclass
class Pool:
    """Calls of one kind open at once, and the cap."""

    name: str  # the metric label
    limit: int
    setting: str  # the environment variable that sets `limit`
    what: str  # how refusals name the calls
    open: int = 0
    # Slots are given back from the event loop, or from whichever thread collects a call's `Slot`.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def full(self) -> bool:
        """Whether a call would be refused now."""
        return self.open >= self.limit

    def take(self) -> Slot | None:
        """A slot for one call, or None when the pool is full."""
        with self.lock:
            if self.open >= self.limit:
                return None
            self.open += 1
        return Slot(self)

    def message(self) -> str:
        """Why a call is refused."""
        return f"server at its limit of {self.limit} {self.what} ({self.setting}); retry later"


class Slot:
    """One admitted call's place in its pool, given back once: when its handler ends, or when
    the call is dropped without reaching its handler (this object is collected)."""

    __slots__ = ("held", "pool")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.held = True

    def release(self) -> None:
        """Give the place back (again: no effect)."""
        with self.pool.lock:
            if self.held:
                self.held = False
                self.pool.open -= 1

    def __del__(self) -> None:  # noqa: D105
        self.release()


def _kind(handler: grpc.RpcMethodHandler) -> str:
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        if getattr(handler, kind) is not None:
            return kind
    return ""


def refusing(kind: str, code: grpc.StatusCode, message: str,
             count: Callable[[], None] | None = None) -> grpc.RpcMethodHandler:
    """A handler that ends a call of `kind` with `code` and `message` as soon as the call
    starts, never waiting for its request message: a unary kind is answered by its
    request-streaming twin, which gRPC runs at once (the unary form stays for in-process
    calls). `count` is called once per refusal (a metric)."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        if count is not None:
            count()
        await context.abort(code, message)

    twin = STREAMING_TWIN.get(kind, kind)
    return getattr(grpc, f"{twin}_rpc_method_handler")(refuse)._replace(**{kind: refuse})


class Admission(grpc.aio.ServerInterceptor):
    """Counts calls by pool and refuses those beyond their pool's cap (see the module
    docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.calls = Pool("concurrent_rpcs", settings.max_concurrent_rpcs, "ANOMALY_MAX_CONCURRENT_RPCS",
                          "concurrent calls")
        self.streams = Pool("streams", settings.max_streams, "ANOMALY_MAX_STREAMS", "open streams")
        self.watch = Pool("watch_streams", settings.max_watch_streams, "ANOMALY_MAX_WATCH_STREAMS",
                          "open health-watch and reflection streams")
        self.read_timeout = settings.request_read_timeout_s

    def pool(self, method: str, handler: grpc.RpcMethodHandler) -> Pool | None:
        """The pool a call belongs to; None for the uncapped ones."""
        if method.startswith(UNCAPPED):
            return None
        if method.startswith(WATCH):
            return self.watch
        return self.calls if _kind(handler) == "unary_unary" else self.streams

    def unary_pool(self, method: str) -> Pool | None:
        """The pool of a unary call to `method` (an in-process HTTP call); None if uncapped."""
        return None if method.startswith(UNCAPPED) else self.calls

    @staticmethod
    def _refusal(kind: str, pool: Pool) -> grpc.RpcMethodHandler:
        return refusing(kind, grpc.StatusCode.RESOURCE_EXHAUSTED, pool.message(),
                        metrics.ADMISSION_REFUSALS.labels(pool.name).inc)

    async def _first_message(self, context: grpc.aio.ServicerContext,
                             deserializer: Callable[[bytes], object] | None) -> object:
        """The call's one request message, read within the read timeout (or the call's
        deadline, if sooner); otherwise the call ends (DEADLINE_EXCEEDED, or INVALID_ARGUMENT
        for no message or one that cannot be parsed)."""
        remaining = context.time_remaining()
        limit = self.read_timeout if remaining is None else min(self.read_timeout, remaining)
        try:
            raw = await asyncio.wait_for(context.read(), limit)
        except asyncio.TimeoutError:
            metrics.ADMISSION_REFUSALS.labels("request_read_timeout").inc()
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no request message within {limit:.3g} s of the call's start (the call's "
                                f"deadline, or ANOMALY_REQUEST_READ_TIMEOUT_S={self.read_timeout:g})")
        if raw is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the call ended without a request message; a unary call sends exactly one")
        if deserializer is None:
            return raw
        try:
            return deserializer(raw)
        except Exception:  # protobuf's DecodeError, or whatever another deserializer raises
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request message could not be parsed")

    @staticmethod
    def _holding(kind: str, handler: grpc.RpcMethodHandler, slot: Slot | None) -> grpc.RpcMethodHandler:
        """`handler`, giving `slot` (if any) back when it ends (only this closure refers to the
        slot, so a call dropped before its handler runs gives it back when gRPC drops the
        handler)."""
        inner = getattr(handler, kind)
        if slot is None:
            return handler
        if inspect.isasyncgenfunction(inner):
            async def stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator:
                try:
                    async for response in inner(request, context):
                        yield response
                finally:
                    slot.release()

            return handler._replace(**{kind: stream})

        async def call(request: object, context: grpc.aio.ServicerContext) -> object:
            try:
                return await inner(request, context)
            finally:
                slot.release()

        return handler._replace(**{kind: call})

    def _admitted(self, kind: str, handler: grpc.RpcMethodHandler,
                  slot: Slot | None) -> grpc.RpcMethodHandler:
        """`handler` holding `slot`; a call that sends one request is served by the
        request-streaming twin, which reads the message within the read timeout (see the
        module docstring), beside the unary form for in-process calls."""
        held = self._holding(kind, handler, slot)
        twin = STREAMING_TWIN.get(kind)
        if twin is None:  # the call streams its requests: its handler runs at once anyway
            return held
        inner, deserializer = getattr(held, kind), handler.request_deserializer

        def release() -> None:
            if slot is not None:
                slot.release()

        if inspect.isasyncgenfunction(inner):
            async def streamed(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
                try:
                    request = await self._first_message(context, deserializer)
                    async for response in inner(request, context):
                        yield response
                finally:
                    release()
        else:  # a coroutine: a unary answer, or a server stream written with `context.write`
            async def streamed(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> object:
                try:
                    return await inner(await self._first_message(context, deserializer), context)
                finally:
                    release()

        return held._replace(request_streaming=True, request_deserializer=None, **{twin: streamed})

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Refuse the call when its pool is full; otherwise let it hold a slot while it runs."""
        handler = await continuation(details)
        kind = _kind(handler) if handler is not None else ""
        if not kind:
            return handler
        pool = self.pool(details.method, handler)
        slot = None if pool is None else pool.take()  # before the message is read
        if pool is not None and slot is None:
            return self._refusal(kind, pool)
        return self._admitted(kind, handler, slot)

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
handler ends, or, for a call that never reaches its handler (a malformed message, a client
gone before its message arrived), when gRPC lets go of the call: no such call keeps a slot.

This interceptor runs after the API-key check (`service.security`): a call without a valid
key, or whose key lacks the role, is refused before it takes a slot. gRPC's own
`maximum_concurrent_rpcs` stays as a backstop above the sum of these caps
(`grpc_backstop`), so ours always refuse first and health checks still answer.
"""

from __future__ import annotations

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
BACKSTOP_HEADROOM = 1024  # short calls above our caps: health checks, refusals, calls not yet admitted


def grpc_backstop(settings: Settings) -> int:
    """The cap of gRPC itself on open calls: above the sum of the pools' caps, so that ours
    refuse first and short calls (health checks, refusals) still find room."""
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


class Admission(grpc.aio.ServerInterceptor):
    """Counts calls by pool and refuses those beyond their pool's cap (see the module
    docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.calls = Pool("concurrent_rpcs", settings.max_concurrent_rpcs, "ANOMALY_MAX_CONCURRENT_RPCS",
                          "concurrent calls")
        self.streams = Pool("streams", settings.max_streams, "ANOMALY_MAX_STREAMS", "open streams")
        self.watch = Pool("watch_streams", settings.max_watch_streams, "ANOMALY_MAX_WATCH_STREAMS",
                          "open health-watch and reflection streams")

    def pool(self, method: str, handler: grpc.RpcMethodHandler) -> Pool | None:
        """The pool a call belongs to; None for the uncapped ones."""
        if method.startswith(UNCAPPED):
            return None
        if method.startswith(WATCH):
            return self.watch
        return self.calls if _kind(handler) == "unary_unary" else self.streams

    @staticmethod
    def _refusal(kind: str, pool: Pool) -> grpc.RpcMethodHandler:
        async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
            metrics.ADMISSION_REFUSALS.labels(pool.name).inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, pool.message())

        return getattr(grpc, f"{kind}_rpc_method_handler")(refuse)

    @staticmethod
    def _holding(kind: str, handler: grpc.RpcMethodHandler, slot: Slot) -> grpc.RpcMethodHandler:
        """`handler`, giving `slot` back when it ends (only this closure refers to the slot,
        so a call dropped before its handler runs gives it back when gRPC drops the handler)."""
        inner = getattr(handler, kind)

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

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Refuse the call when its pool is full; otherwise let it hold a slot while it runs."""
        handler = await continuation(details)
        kind = _kind(handler) if handler is not None else ""
        pool = self.pool(details.method, handler) if kind else None
        if pool is None:
            return handler
        slot = pool.take()  # before the message is read
        if slot is None:
            return self._refusal(kind, pool)
        return self._holding(kind, handler, slot)

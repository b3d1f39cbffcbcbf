"""Half-open gRPC calls never starve the server, on real servers on loopback.

A half-open call sends its headers and never its request message. gRPC's own cap on open
calls (`maximum_concurrent_rpcs`, the backstop) counts such calls from their headers, and a
unary handler only runs once the message has arrived. So, before the fix:

- with API keys on, ~1100 of them (unkeyed `Score`s, or health `Check`s, which need no key)
  filled the backstop (16 + 8 + 16 + 1024) and every real `Score` and `Check` got
  RESOURCE_EXHAUSTED "Concurrent RPC limit exceeded!" for as long as the attacker liked;
- without keys, 16 of them held every unary admission slot (taken when a call starts) with
  no server-side time limit, and scoring was refused while they stayed open.

Now a call refused by the key check or by admission is answered at once, before its message,
and a call that does not deliver its message within `ANOMALY_REQUEST_READ_TIMEOUT_S` (or its
own deadline, if sooner) ends with DEADLINE_EXCEEDED and gives its slot back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import start_server

KEY = "half-open-key-83c1"
SCORE, CHECK = "/anomaly.v1.AnomalyDetection/Score", "/grpc.health.v1.Health/Check"
OLD_BACKSTOP = 16 + 8 + 16 + 1024  # gRPC's own cap with the default caps, before the fix
UNARY_CAP = 16  # the default ANOMALY_MAX_CONCURRENT_RPCS


class HalfOpenCalls:
    """Calls that send their headers and never a request message (a `stream_unary` call, to a
    unary method, whose request iterator never yields), held open from their own event loop
    in a thread, over a few connections, until closed; records how and when each ended.

    Args:
        target: the server.
        calls: (method, metadata) of each call to open.
        timeout: each call's own deadline.
    """

    def __init__(self, target: str, calls: list[tuple[str, tuple]], timeout: float = 120.0,
                 connections: int = 4) -> None:
        self.target, self.calls, self.timeout, self.connections = target, calls, timeout, connections
        self.ended: list[tuple[str, grpc.StatusCode, str, float]] = []  # method, code, details, seconds
        self._opened = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._hold(),), daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.started = 0.0

    async def _hold(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
        channels = [grpc.aio.insecure_channel(self.target, options=options) for _ in range(self.connections)]
        for channel in channels:
            await channel.channel_ready()

        async def never() -> object:
            await asyncio.Event().wait()
            yield b""

        async def one(channel: grpc.aio.Channel, method: str, metadata: tuple) -> None:
            call = channel.stream_unary(method)(never(), timeout=self.timeout, metadata=metadata)
            try:
                await call
                code, details = grpc.StatusCode.OK, ""
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except asyncio.CancelledError:
                call.cancel()
                return
            self.ended.append((method, code, details, time.monotonic() - self.started))

        self.started = time.monotonic()
        tasks = [asyncio.create_task(one(channels[i % len(channels)], method, metadata))
                 for i, (method, metadata) in enumerate(self.calls)]
        self._opened.set()
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()

    def __enter__(self) -> HalfOpenCalls:
        self._thread.start()
        assert self._opened.wait(30)
        time.sleep(1.5)  # every call's headers at the server
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def still_open(self) -> int:
        """Calls not ended yet."""
        return len(self.calls) - len(self.ended)

    def codes(self, method: str) -> Counter:
        """How the calls to `method` ended so far."""
        return Counter(code for m, code, _, _ in list(self.ended) if m == method)


def _answer(call, *args, **kwargs) -> object:  # type: ignore[no-untyped-def]
    """The call's answer, or the error it ended with."""
    try:
        return call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc


@pytest.fixture(scope="module")
def keyed_server(store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work = tmp_path_factory.mktemp("half-open-keyed")
    env = {"ANOMALY_API_KEYS": f'["{KEY}"]', "ANOMALY_REQUEST_READ_TIMEOUT_S": "8"}
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    yield target, work / "server.log"
    assert child.stop() == 0, (work / "server.log").read_text()[-3000:]


def test_half_open_calls_beyond_the_old_backstop_leave_scoring_and_health_answering(
        keyed_server: tuple[str, Path], good_and_defect) -> None:
    """1100 half-open calls (550 unkeyed `Score`s, 550 `Check`s): the unkeyed ones are
    refused at once, and `Score` and `Check` answer while the `Check`s are held; those end
    with DEADLINE_EXCEEDED after the read timeout."""
    target, _ = keyed_server
    image = good_and_defect[0][0].read_bytes()
    n = 550
    attack = [(SCORE, ())] * n + [(CHECK, ())] * n
    assert len(attack) > OLD_BACKSTOP
    with grpc.insecure_channel(target) as ch, HalfOpenCalls(target, attack) as half:
        stub, health = pb_grpc.AnomalyDetectionStub(ch), health_pb2_grpc.HealthStub(ch)
        keyed = (("x-api-key", KEY),)
        scored = _answer(stub.Score, pb.ScoreRequest(encoded=image), timeout=30, metadata=keyed)
        checked = _answer(health.Check, health_pb2.HealthCheckRequest(), timeout=10)
        refused_at_once = half.codes(SCORE)
        checks_held = n - sum(half.codes(CHECK).values())
        assert isinstance(scored, pb.ScoreResponse), scored
        assert isinstance(checked, health_pb2.HealthCheckResponse), checked
        assert checked.status == health_pb2.HealthCheckResponse.SERVING
        # The unkeyed calls were answered without waiting for a message that never comes.
        assert refused_at_once == {grpc.StatusCode.UNAUTHENTICATED: n}, refused_at_once
        assert checks_held == n  # the Checks are still within their read timeout
        # The half-open Checks end by themselves after the read timeout (8 s).
        wait_for(lambda: half.still_open() == 0, timeout=30, what="the half-open calls to end")
    checks = [(code, details, at) for m, code, details, at in half.ended if m == CHECK]
    assert Counter(code for code, _, _ in checks) == {grpc.StatusCode.DEADLINE_EXCEEDED: n}
    assert all("ANOMALY_REQUEST_READ_TIMEOUT_S" in details for _, details, _ in checks), checks[0]
    assert all(7.0 < at < 25.0 for _, _, at in checks), sorted(at for _, _, at in checks)[::100]


@pytest.fixture(scope="module")
def open_server(store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("half-open")
    env = {"ANOMALY_REQUEST_READ_TIMEOUT_S": "3"}
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    yield target
    assert child.stop() == 0, (work / "server.log").read_text()[-3000:]


def test_half_open_calls_give_their_slots_back_after_the_read_timeout(open_server: str,
                                                                      good_and_defect) -> None:
    """Without keys: 20 half-open `Score`s. 16 take every unary slot, the 4 beyond are refused
    at once; the 16 end after the read timeout (3 s) and scoring answers again, while the
    attacker still holds its calls open."""
    image = good_and_defect[0][0].read_bytes()
    attack = [(SCORE, ())] * (UNARY_CAP + 4)
    with grpc.insecure_channel(open_server) as ch, HalfOpenCalls(open_server, attack) as half:
        stub, health = pb_grpc.AnomalyDetectionStub(ch), health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        refused_at_once = half.codes(SCORE)
        # Scoring is answered again once the read timeout has ended the half-open calls.
        start = time.monotonic()

        def scored() -> bool:
            answer = _answer(stub.Score, pb.ScoreRequest(encoded=image), timeout=30)
            return isinstance(answer, pb.ScoreResponse)

        wait_for(scored, timeout=20, what="Score to answer while the half-open calls are held")
        recovered = time.monotonic() - start
        assert refused_at_once == {grpc.StatusCode.RESOURCE_EXHAUSTED: 4}, refused_at_once
        assert recovered < 5.0, recovered
        assert half.codes(SCORE) == {grpc.StatusCode.RESOURCE_EXHAUSTED: 4,
                                     grpc.StatusCode.DEADLINE_EXCEEDED: UNARY_CAP}, half.ended

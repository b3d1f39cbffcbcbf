"""The paths a benchmark drives (`Target`): bare ONNX Runtime in this process, and served
paths driven by asyncio clients (gRPC `Score` with PNG bytes or raw pixels, `ScoreStream`,
HTTP `POST /v1/score`). Each returns one `loadtests.timing.Phase` per phase.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from loadtests.timing import BARE, Phase, time_batch1, time_batches

GRPC_OFF, GRPC_RAW, GRPC_STREAM, GRPC_ON, GRPC_ONE, GRPC_PROCS, HTTP, HTTP_IN, V2_GRPC = (
    "gRPC (batching off)", "gRPC raw pixels (batching off)", "gRPC ScoreStream (batching off)",
    "gRPC (batching on)", "gRPC (1 worker: latency setting)", "gRPC (2 processes, 8 connections)",
    "HTTP gateway", "HTTP in-process", "V2 gRPC ModelInfer (batching off)")
GRPC_TRACED = "gRPC (batching off, tracing on)"
GRPC_EVIDENCE = "gRPC (batching off, evidence on)"


class Target:
    """A path under test: `latency` and `saturate` each return one `Phase`. `server_pids`:
    the processes serving it (their CPU, descendants included, is measured at saturation)."""

    name: str
    server_pids: tuple[int, ...] = ()

    async def latency(self, seconds: float, max_requests: int) -> Phase:  # noqa: D102
        raise NotImplementedError

    async def saturate(self, seconds: float, concurrency: int, max_requests: int) -> Phase:  # noqa: D102
        raise NotImplementedError


class ClientTarget(Target):
    """A served path driven by asyncio clients: `call(i)` sends payload number `i`.

    Every failed request is counted; a phase with failures raises (not a result).
    """

    def __init__(self, name: str, call: Callable[[int], Awaitable[object]]) -> None:
        self.name = name
        self.call = call
        self.warm = False

    async def _drive(self, concurrency: int, seconds: float, max_requests: int) -> Phase:
        if not self.warm:
            for i in range(8):
                await self.call(i)
            self.warm = True
        lats: list[float] = []
        failures: list[BaseException] = []
        stop = time.perf_counter() + seconds
        counter = iter(range(max_requests))

        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > stop:
                    return
                s = time.perf_counter()
                try:
                    await self.call(i)
                    lats.append(time.perf_counter() - s)
                except Exception as exc:  # counted, reported
                    failures.append(exc)

        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if failures:
            raise RuntimeError(f"{self.name}: {len(failures)} failed requests, e.g. {failures[0]!r}")
        return Phase(lats, wall, len(lats), cpu)

    async def latency(self, seconds: float, max_requests: int) -> Phase:  # noqa: D102
        return await self._drive(1, seconds, max_requests)

    async def saturate(self, seconds: float, concurrency: int, max_requests: int) -> Phase:  # noqa: D102
        return await self._drive(concurrency, seconds, max_requests)


class BareOrt(Target):
    """`OnnxModel.run` in this process, on preprocessed inputs, from plain threads.

    `models` maps intra-op thread counts to sessions of the same model file: the probe tries
    both one thread per call (what the server runs by default) and all cores per call.
    """

    name = BARE

    def __init__(self, models: dict[int, Any], inputs: list[np.ndarray],
                 extra_configs: tuple[tuple[int, int, int], ...] = ()) -> None:
        self.models = models
        self.inputs = inputs
        self.config = (1, 1, max(models))  # (batch, caller threads, intra-op threads); see probe
        self.extra_configs = extra_configs  # more (batch, threads, intra) to probe (GPU batches)
        for model in models.values():
            model.warmup((1, 8))

    def _threaded(self, batch: int, threads: int, intra: int, seconds: float) -> Phase:
        return time_batches(self.models[intra], self.inputs, batch, threads, seconds)

    def probe(self, seconds: float, concurrency: int) -> dict[tuple[int, int, int], float]:
        """Try batch 1 from one caller thread per core and from `concurrency` threads (each
        call on one ORT thread, and on all cores), batch 1 from one thread on all cores, and
        batch 8 from one thread; keep the fastest for saturation (the strongest baseline).
        Returns images/s per (batch, caller threads, intra-op threads)."""
        from service.settings import usable_cores

        cores = usable_cores()
        one, most = min(self.models), max(self.models)
        configs = list(dict.fromkeys([(1, cores, one), (1, concurrency, one), (1, 1, most),
                                      (1, cores, most), (8, 1, most), *self.extra_configs]))
        speeds = {c: self._threaded(*c, seconds).images_per_s for c in configs}
        self.config = max(speeds, key=speeds.__getitem__)
        return speeds

    async def latency(self, seconds: float, max_requests: int) -> Phase:
        """One caller, batch 1, the session with the most intra-op threads (the fastest alone)."""
        return await asyncio.to_thread(time_batch1, self.models[max(self.models)], self.inputs,
                                       seconds, max_requests)

    async def saturate(self, seconds: float, concurrency: int, max_requests: int) -> Phase:  # noqa: D102
        return await asyncio.to_thread(self._threaded, *self.config, seconds)


def grpc_target(name: str, channel, images: list[bytes], *, raw: bool = False) -> ClientTarget:  # noqa: ANN001
    """A `Score` client over an open `grpc.aio` channel (or a list of them, used in turn:
    one connection each); PNG bytes, or decoded `RawImage`s."""
    from anomaly.v1 import anomaly_pb2 as pb
    from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

    stubs = [pb_grpc.AnomalyDetectionStub(c) for c in (channel if isinstance(channel, list) else [channel])]
    if raw:
        from service.runtime.imaging import decode_image

        arrays = [decode_image(b) for b in images]
        reqs = [pb.ScoreRequest(raw=pb.RawImage(data=a.tobytes(), width=a.shape[1],
                                                height=a.shape[0], channels=3)) for a in arrays]
    else:
        reqs = [pb.ScoreRequest(encoded=b) for b in images]

    async def call(i: int) -> object:
        return await stubs[i % len(stubs)].Score(reqs[i % len(reqs)], timeout=30)

    return ClientTarget(name, call)


def v2_target(name: str, channel, images: list[bytes], model: str) -> ClientTarget:  # noqa: ANN001
    """An Open Inference Protocol `ModelInfer` client over an open `grpc.aio` channel: one PNG
    per request as a BYTES [1] tensor in raw form (what tritonclient sends)."""
    from anomaly.oip import inference_pb2 as v2
    from anomaly.oip import inference_pb2_grpc as v2_grpc
    from anomaly.oip.tensors import serialize_bytes

    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    reqs = []
    for image in images:
        request = v2.ModelInferRequest(model_name=model, raw_input_contents=[serialize_bytes([image])])
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        reqs.append(request)

    async def call(i: int) -> object:
        return await stub.ModelInfer(reqs[i % len(reqs)], timeout=30)

    return ClientTarget(name, call)


class StreamTarget(Target):
    """`ScoreStream` over an open `grpc.aio` channel with PNG bytes: bidirectional streams, each
    keeping up to `window` images in flight. Batch-1 latency is one stream in lock-step (send,
    wait for the answer, send the next: a camera that needs each verdict); saturation is two
    streams sharing `concurrency` images in flight. A failed stream fails the phase."""

    name = GRPC_STREAM

    def __init__(self, channel, images: list[bytes]) -> None:  # noqa: ANN001
        from anomaly.v1 import anomaly_pb2 as pb
        from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

        self.stub = pb_grpc.AnomalyDetectionStub(channel)
        self.reqs = [pb.ScoreRequest(encoded=b) for b in images]
        self.warm = False

    async def _stream(self, window: int, stop: float, counter: Any, lats: list[float]) -> None:
        call = self.stub.ScoreStream(timeout=max(0.0, stop - time.perf_counter()) + 30)
        sent: deque[float] = deque()
        slots = asyncio.Semaphore(window)

        async def write() -> None:
            for i in counter:
                if time.perf_counter() > stop:
                    break
                await slots.acquire()
                sent.append(time.perf_counter())
                await call.write(self.reqs[i % len(self.reqs)])
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            async for _ in call:  # answers come in request order
                lats.append(time.perf_counter() - sent.popleft())
                slots.release()
        finally:
            writer.cancel()

    async def _drive(self, streams: int, window: int, seconds: float, max_requests: int) -> Phase:
        if not self.warm:
            await self._stream(1, time.perf_counter() + 60, iter(range(8)), [])
            self.warm = True
        lats: list[float] = []
        counter = iter(range(max_requests))  # shared: the request cap holds across streams
        stop = time.perf_counter() + seconds
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(self._stream(window, stop, counter, lats) for _ in range(streams)))
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        return Phase(lats, wall, len(lats), cpu)

    async def latency(self, seconds: float, max_requests: int) -> Phase:  # noqa: D102
        return await self._drive(1, 1, seconds, max_requests)

    async def saturate(self, seconds: float, concurrency: int, max_requests: int) -> Phase:  # noqa: D102
        return await self._drive(2, max(1, concurrency // 2), seconds, max_requests)


def http_target(http, images: list[bytes], name: str = HTTP) -> ClientTarget:  # noqa: ANN001
    """`POST /v1/score` with the raw image body through an `httpx.AsyncClient` (the gateway,
    or the server's in-process HTTP API)."""

    async def call(i: int) -> object:
        r = await http.post("/v1/score", content=images[i % len(images)],
                            headers={"content-type": "image/png"})
        r.raise_for_status()
        return r

    return ClientTarget(name, call)

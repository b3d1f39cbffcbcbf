"""Serving benchmark: bare ONNX Runtime vs the gRPC server vs the HTTP gateway, same model,
same machine, one run; prints throughput and p50/p99 and their ratios to bare ORT.

- bare ORT: `InferenceSession.run` on preprocessed tensors (no decoding), batch-1 latency
  and saturation (the best of `concurrency` threads at batch 1 and one thread at batch 8);
- gRPC: the real server as a child process, batching on and off, driven by asyncio
  clients sending PNG bytes (decoding is part of what a server does), and, batching on,
  decoded pixels (`RawImage`, as a line camera would send);
- HTTP: the real gateway in front of the batching server.

Loopback only; every phase is bounded by a request count and a time limit.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Result:
    """One measured configuration."""

    name: str
    mode: str  # "batch-1 latency" | "saturation"
    images_per_s: float
    p50_ms: float
    p99_ms: float
    n: int
    client_cores: float = float("nan")  # CPU the load generator itself used (served paths)


def _summary(name: str, mode: str, latencies_s: list[float], wall_s: float, images: int,
             client_cpu_s: float = float("nan")) -> Result:
    lat = sorted(latencies_s)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    return Result(name, mode, images / wall_s, 1e3 * statistics.median(lat), 1e3 * p99, images,
                  client_cpu_s / wall_s)


def bench_bare_ort(model, inputs: list[np.ndarray], *, seconds: float, concurrency: int) -> list[Result]:
    """Bare `InferenceSession.run`: batch-1 latency, then saturation."""
    model.warmup((1, 8))
    lat = []
    t_end = time.perf_counter() + seconds
    i = 0
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        s = time.perf_counter()
        model.run(inputs[i % len(inputs)][None])
        lat.append(time.perf_counter() - s)
        i += 1
    out = [_summary("bare ORT", "batch-1 latency", lat, time.perf_counter() - t0, i)]

    def threaded(batch: int, threads: int) -> Result:
        lats: list[float] = []
        count = [0]
        lock = threading.Lock()
        stop = time.perf_counter() + seconds
        x = np.stack([inputs[k % len(inputs)] for k in range(batch)])

        def work() -> None:
            while time.perf_counter() < stop:
                s = time.perf_counter()
                model.run(x)
                with lock:
                    lats.append(time.perf_counter() - s)
                    count[0] += batch

        t0 = time.perf_counter()
        ts = [threading.Thread(target=work) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return _summary(f"bare ORT (b={batch}, {threads} thr)", "saturation", lats,
                        time.perf_counter() - t0, count[0])

    candidates = [threaded(1, concurrency), threaded(8, 1)]
    best = max(candidates, key=lambda r: r.images_per_s)
    best.name = "bare ORT"
    best.mode = f"saturation ({'b=8' if best is candidates[1] else f'b=1 x{concurrency}'})"
    return out + [best]


async def _drive(call, payloads: list, *, concurrency: int, seconds: float, max_requests: int,
                 ) -> tuple[list[float], float, int, float]:
    lats: list[float] = []
    failures = 0
    stop = time.perf_counter() + seconds
    counter = iter(range(max_requests))

    async def worker() -> None:
        nonlocal failures
        for i in counter:
            if time.perf_counter() > stop:
                return
            s = time.perf_counter()
            try:
                await call(payloads[i % len(payloads)])
                lats.append(time.perf_counter() - s)
            except Exception:  # counted, reported
                failures += 1

    t0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lats, time.perf_counter() - t0, failures, time.process_time() - cpu0


async def _latency_and_saturation(name: str, call, payloads: list, *, seconds: float,  # noqa: ANN001
                                   concurrency: int, max_requests: int) -> list[Result]:
    """Warm up, then batch-1 latency (one client) and saturation (`concurrency` clients).

    Raises:
        RuntimeError: if any request failed (a benchmark with failures is not a result).
    """
    for p in payloads[:8]:
        await call(p)
    out = []
    for mode, conc in (("batch-1 latency", 1), ("saturation", concurrency)):
        lats, wall, failed, cpu = await _drive(call, payloads, concurrency=conc, seconds=seconds,
                                               max_requests=max_requests)
        if failed:
            raise RuntimeError(f"{name}: {failed} failed requests")
        out.append(_summary(name, mode, lats, wall, len(lats), cpu))
    return out


def bench_grpc(target: str, images: list[bytes], name: str, *, seconds: float, concurrency: int,
               max_requests: int, raw: bool = False) -> list[Result]:
    """Batch-1 latency (one client, sequential) and saturation (`concurrency` clients).

    With `raw`, images are sent as decoded pixels (`RawImage`) instead of PNG bytes.
    """
    import grpc
    from anomaly.v1 import anomaly_pb2 as pb
    from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

    async def run() -> list[Result]:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            if raw:
                from service.imaging import decode_image

                arrays = [decode_image(b) for b in images]
                reqs = [pb.ScoreRequest(raw=pb.RawImage(data=a.tobytes(), width=a.shape[1],
                                                        height=a.shape[0], channels=3))
                        for a in arrays]
            else:
                reqs = [pb.ScoreRequest(encoded=b) for b in images]

            async def call(req):  # noqa: ANN001, ANN202
                return await stub.Score(req, timeout=30)

            return await _latency_and_saturation(name, call, reqs, seconds=seconds,
                                                 concurrency=concurrency, max_requests=max_requests)

    return asyncio.run(run())


def bench_http(base: str, images: list[bytes], *, seconds: float, concurrency: int,
               max_requests: int) -> list[Result]:
    """Same as `bench_grpc`, through the HTTP gateway (raw image bodies)."""
    import httpx

    async def run() -> list[Result]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
            async def call(body: bytes):  # noqa: ANN202
                r = await http.post("/v1/score", content=body, headers={"content-type": "image/png"})
                r.raise_for_status()

            return await _latency_and_saturation("HTTP gateway", call, images, seconds=seconds,
                                                 concurrency=concurrency, max_requests=max_requests)

    return asyncio.run(run())


def render(results: list[Result], *, model: str, images: int, concurrency: int, seconds: float) -> str:
    """Markdown table with ratios to bare ORT (same mode)."""
    base = {r.mode.split(" (")[0]: r for r in results if r.name == "bare ORT"}
    grpc_sat = next((r for r in results if r.name == "gRPC (batching on)" and r.mode == "saturation"), None)
    lines = [
        f"Model: `{model}`; {images} real PNG images from the sample data; {concurrency} concurrent "
        f"clients at saturation; {seconds:.0f} s per phase. Machine: {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPU cores, {platform.processor() or platform.platform()}.",
        "Client and server share the machine's cores (loopback).",
        "",
        "| path | mode | images/s | p50 ms | p99 ms | images/s ÷ bare ORT | images/s ÷ gRPC "
        "| load-generator CPU (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ref = base.get(r.mode.split(" (")[0])
        ratio = f"{r.images_per_s / ref.images_per_s:.2f}" if ref else "-"
        vs_grpc = (f"{r.images_per_s / grpc_sat.images_per_s:.2f}"
                   if grpc_sat and r.name == "HTTP gateway" and r.mode == "saturation" else "")
        cores = "" if r.client_cores != r.client_cores else f"{r.client_cores:.2f}"  # NaN → blank
        lines.append(f"| {r.name} | {r.mode} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | "
                     f"{r.p99_ms:.1f} | {ratio} | {vs_grpc} | {cores} |")
    return "\n".join(lines) + "\n"


def run_benchmark(tracking_uri: str, model_name: str, alias: str, image_dir: Path, *,
                  seconds: float = 10.0, concurrency: int = 8, max_requests: int = 5000,
                  out: Path | None = None) -> list[Result]:
    """The whole benchmark; returns the results and (optionally) writes Markdown to `out`."""
    from service.imaging import decode_image
    from service.launch import start_gateway, start_server
    from service.repository import ModelRepository, ModelSpec
    from service.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    repository = ModelRepository(Settings(tracking_uri=tracking_uri, cache_dir=work / "cache"))
    loaded = repository.get(ModelSpec(model_name, alias))  # the same download/load path as serving
    model, metadata, version = loaded.model, loaded.metadata, loaded.version
    files = sorted(p for p in Path(image_dir).rglob("*.png") if "ground_truth" not in p.parts)[:64]
    if not files:
        raise ValueError(f"no PNG images under {image_dir}")
    images = [p.read_bytes() for p in files]
    inputs = [model.prepare(decode_image(b)) for b in images]
    results = bench_bare_ort(model, inputs, seconds=seconds, concurrency=concurrency)
    del model, loaded, repository
    kw = {"seconds": seconds, "concurrency": concurrency, "max_requests": max_requests}
    for label, env in (("gRPC (batching on)", {}), ("gRPC (batching off)", {"ANOMALY_MAX_BATCH_SIZE": "1"})):
        server, target = start_server(tracking_uri, work / f"{label}.log", model=model_name, alias=alias,
                                      cache_dir=work / "cache", env={**env, "ANOMALY_LOG_LEVEL": "WARNING"})
        try:
            results += bench_grpc(target, images, label, **kw)
            if label == "gRPC (batching on)":
                results += bench_grpc(target, images, "gRPC raw pixels (batching on)", raw=True, **kw)
                gateway, base = start_gateway(target, work / "gateway.log",
                                              env={"ANOMALY_LOG_LEVEL": "WARNING"})
                try:
                    results += bench_http(base, images, **kw)
                finally:
                    gateway.stop()
        finally:
            server.stop()
    if out is not None:
        text = render(results, model=f"{model_name}/{version} ({metadata.architecture}-{metadata.variant})",
                      images=len(images), concurrency=concurrency, seconds=seconds)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# Serving benchmarks\n\nProduced by `anomaly bench` (loadtests/bench.py).\n\n" + text)
    return results

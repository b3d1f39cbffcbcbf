"""Serving benchmark: the same model through bare ONNX Runtime, this project's gRPC server
and HTTP gateway, and (optionally) peer servers, measured in one run, interleaved.

Paths:
- bare ORT: `InferenceSession.run` on preprocessed tensors (no decoding), in-process;
  saturation uses the best of a few thread/batch/intra-op configurations, probed first;
  batch-1 latency uses all cores per call (the fastest alone);
- gRPC: the real server as a child process, batching off (the CPU default) and on, driven
  by asyncio clients sending PNG bytes (decoding is part of what a server does), and
  decoded pixels (`RawImage`, as a line camera would send); `ScoreStream` with PNG bytes;
  and the low-latency setting (`ANOMALY_WORKERS=1`: one call at a time on all cores);
- HTTP: the real gateway in front of the batching-off server;
- peers (`loadtests.peers`): stock `mlflow models serve` on the registered version and a
  KServe `ModelServer`, when asked for.

Execution providers: `providers` (e.g. CUDA) applies to bare ORT and every server alike, so
the ratios compare like with like; bare ORT is then also probed at the batching server's
batch size (GPUs want batches). The report names the provider that actually ran (after
ONNX Runtime's fallback) and the GPU.

Shared machines are noisy, so the paths are measured in `rounds` interleaved rounds (each
path once per round, batch-1 latency then saturation) and every ratio is the median of the
per-round ratios to bare ORT in the same round. Loopback only; every phase is bounded by a
request count and a time limit.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import tempfile
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

LATENCY, SATURATION = "batch-1 latency", "saturation"
BARE = "bare ORT"
GRPC_OFF, GRPC_RAW, GRPC_STREAM, GRPC_ON, GRPC_ONE, HTTP = (
    "gRPC (batching off)", "gRPC raw pixels (batching off)", "gRPC ScoreStream (batching off)",
    "gRPC (batching on)", "gRPC (1 worker: latency setting)", "HTTP gateway")


@dataclass
class Phase:
    """What one path did in one phase of one round."""

    latencies_s: list[float]
    wall_s: float
    images: int
    client_cpu_s: float = float("nan")

    @property
    def images_per_s(self) -> float:  # noqa: D102
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class Result:
    """One path in one mode, over all rounds."""

    name: str
    mode: str  # LATENCY | SATURATION
    images_per_s: float  # median over rounds
    p50_ms: float  # over all rounds' latencies
    p99_ms: float
    n: int
    client_cores: float = float("nan")  # CPU the load generator itself used (served paths)
    ratio: float = float("nan")  # median over rounds of images/s ÷ bare ORT's in that round
    ratio_range: tuple[float, float] = (float("nan"), float("nan"))
    per_round: list[float] = field(default_factory=list)
    detail: str = ""


class Target:
    """A path under test: `latency` and `saturate` each return one `Phase`."""

    name: str

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


def time_batches(model: Any, inputs: list[np.ndarray], batch: int, threads: int,
                 seconds: float) -> Phase:
    """`model.run` on one batch of `inputs` from `threads` caller threads for `seconds`
    (each thread makes at least one call)."""
    lats: list[float] = []
    count = [0]
    lock = threading.Lock()
    stop = time.perf_counter() + seconds
    x = np.stack([inputs[k % len(inputs)] for k in range(batch)])

    def work() -> None:
        while True:
            s = time.perf_counter()
            model.run(x)
            with lock:
                lats.append(time.perf_counter() - s)
                count[0] += batch
            if time.perf_counter() >= stop:
                break

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return Phase(lats, time.perf_counter() - t0, count[0])


def time_batch1(model: Any, inputs: list[np.ndarray], seconds: float, max_calls: int) -> Phase:
    """Batch-1 `model.run` calls, one after another, cycling through `inputs`, for `seconds`
    or `max_calls` (at least one call)."""
    lats: list[float] = []
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while not lats or (time.perf_counter() < t_end and len(lats) < max_calls):
        s = time.perf_counter()
        model.run(inputs[len(lats) % len(inputs)][None])
        lats.append(time.perf_counter() - s)
    return Phase(lats, time.perf_counter() - t0, len(lats))


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
    """A `Score` client over an open `grpc.aio` channel; PNG bytes, or decoded `RawImage`s."""
    from anomaly.v1 import anomaly_pb2 as pb
    from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

    stub = pb_grpc.AnomalyDetectionStub(channel)
    if raw:
        from service.imaging import decode_image

        arrays = [decode_image(b) for b in images]
        reqs = [pb.ScoreRequest(raw=pb.RawImage(data=a.tobytes(), width=a.shape[1],
                                                height=a.shape[0], channels=3)) for a in arrays]
    else:
        reqs = [pb.ScoreRequest(encoded=b) for b in images]

    async def call(i: int) -> object:
        return await stub.Score(reqs[i % len(reqs)], timeout=30)

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


def http_target(http, images: list[bytes]) -> ClientTarget:  # noqa: ANN001
    """`POST /v1/score` with the raw image body through an `httpx.AsyncClient`."""

    async def call(i: int) -> object:
        r = await http.post("/v1/score", content=images[i % len(images)],
                            headers={"content-type": "image/png"})
        r.raise_for_status()
        return r

    return ClientTarget(HTTP, call)


def summarize(phases: dict[tuple[str, str], list[Phase]], details: dict[str, str] | None = None,
              ) -> list[Result]:
    """Per (path, mode): median images/s, pooled p50/p99, median per-round ratio to bare ORT."""
    out = []
    for (name, mode), runs in phases.items():
        lat = sorted(x for p in runs for x in p.latencies_s)
        if not lat:
            continue
        bare = phases.get((BARE, mode), [])
        ratios = [p.images_per_s / b.images_per_s for p, b in zip(runs, bare, strict=False)
                  if b.images_per_s > 0]
        cpu = [p.client_cpu_s / p.wall_s for p in runs if p.client_cpu_s == p.client_cpu_s]
        out.append(Result(
            name, mode, statistics.median(p.images_per_s for p in runs), 1e3 * statistics.median(lat),
            1e3 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], len(lat),
            statistics.median(cpu) if cpu else float("nan"),
            statistics.median(ratios) if ratios else float("nan"),
            (min(ratios), max(ratios)) if ratios else (float("nan"), float("nan")),
            [p.images_per_s for p in runs], (details or {}).get(name, "")))
    return out


async def measure(targets: list[Target], *, rounds: int, seconds: float, concurrency: int,
                  max_requests: int, progress: Callable[[str], None] = lambda _: None,
                  ) -> dict[tuple[str, str], list[Phase]]:
    """`rounds` rounds; in each, every target's batch-1 latency then saturation, in turn."""
    phases: dict[tuple[str, str], list[Phase]] = {}
    for r in range(rounds):
        for t in targets:
            progress(f"round {r + 1}/{rounds}: {t.name}")
            phases.setdefault((t.name, LATENCY), []).append(await t.latency(seconds, max_requests))
            phases.setdefault((t.name, SATURATION), []).append(
                await t.saturate(seconds, concurrency, max_requests))
    return phases


def machine_line(provider: str) -> str:
    """"Machine: …" for a report: architecture, cores, OS, Python, and (when a GPU provider
    runs) the GPU and driver from nvidia-smi; then the execution provider."""
    from service.settings import usable_cores

    line = (f"Machine: {platform.machine()}, {usable_cores()} CPU cores, "
            f"{platform.platform()}, Python {platform.python_version()}")
    if provider != "CPUExecutionProvider":
        import subprocess

        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout
            name, _, driver = gpus.split("\n")[0].partition(",")
            line += f", GPU: {name.strip()} (driver {driver.strip()})"
        except (OSError, subprocess.SubprocessError):
            line += ", GPU: unknown (no nvidia-smi)"
    return f"{line}. Execution provider: {provider}."


def _fmt(x: float, spec: str = ".2f") -> str:
    return "" if x != x else format(x, spec)  # NaN → blank


def render(results: list[Result], *, model: str, images: int, concurrency: int, seconds: float,
           rounds: int, command: str = "", skipped: list[str] | None = None,
           provider: str = "CPUExecutionProvider") -> str:
    """Markdown: the machine, the command, and one table with ratios to bare ORT."""
    by = {(r.name, r.mode): r for r in results}
    grpc_sat = by.get((GRPC_OFF, SATURATION))
    lines = [
        f"Model: `{model}`; {images} real PNG images from the sample data; {concurrency} concurrent "
        f"clients at saturation; {rounds} interleaved rounds of {seconds:g} s per path and mode. "
        f"{machine_line(provider)} Clients and servers share the machine's cores (loopback).",
        "",
    ]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        "| path | mode | images/s | p50 ms | p99 ms | ÷ bare ORT (median of rounds) | range over rounds "
        "| HTTP ÷ gRPC | load-generator CPU (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        vs_grpc = ""
        if r.name == HTTP and r.mode == SATURATION and grpc_sat:
            vs = [a / b for a, b in zip(r.per_round, grpc_sat.per_round, strict=False) if b > 0]
            vs_grpc = _fmt(statistics.median(vs)) if vs else ""
        span = "" if r.name == BARE else f"{_fmt(r.ratio_range[0])}–{_fmt(r.ratio_range[1])}"
        name = f"{r.name} ({r.detail})" if r.detail and r.mode == SATURATION else r.name
        lines.append(f"| {name} | {r.mode} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | {r.p99_ms:.1f} | "
                     f"{_fmt(r.ratio)} | {span} | {vs_grpc} | {_fmt(r.client_cores)} |")
    if skipped:
        lines += ["", "Peers not measured:", *skipped]
    return "\n".join(lines) + "\n"


def load_images(image_dir: Path, limit: int = 64) -> list[bytes]:
    """Up to `limit` real PNG images (no ground-truth masks) under `image_dir`.

    Raises:
        ValueError: there are none.
    """
    files = sorted(p for p in Path(image_dir).rglob("*.png") if "ground_truth" not in p.parts)[:limit]
    if not files:
        raise ValueError(f"no PNG images under {image_dir}")
    return [p.read_bytes() for p in files]


def run_benchmark(tracking_uri: str, model_name: str, alias: str, image_dir: Path, *,
                  seconds: float = 5.0, rounds: int = 3, concurrency: int = 8,
                  max_requests: int = 5000, peers: tuple[str, ...] = (), out: Path | None = None,
                  command: str = "", progress: Callable[[str], None] = lambda _: None,
                  providers: tuple[str, ...] = (), max_batch_size: int = 8,
                  ) -> list[Result]:
    """The whole benchmark; returns the results and (optionally) writes Markdown to `out`.

    Args:
        tracking_uri: MLflow store holding the model.
        model_name: registered model.
        alias: the alias whose version is measured.
        image_dir: folder of real PNG images (the first 64 are used).
        seconds: length of each phase (path × mode × round).
        rounds: interleaved rounds; ratios are the median of the per-round ratios.
        concurrency: concurrent clients (and bare-ORT threads tried) at saturation.
        max_requests: cap on requests per phase.
        peers: any of `loadtests.peers.PEERS` ("mlflow", "kserve") to measure beside ours.
        out: Markdown file whose `bench` section receives the table.
        command: the command line, written into the report.
        progress: called with a line before each phase.
        providers: ONNX Runtime execution providers for bare ORT and every server (empty = CPU).
        max_batch_size: largest batch of the batching-on server; bare ORT is probed at this
            batch too, from as many threads as that server runs batches.
    """
    import grpc
    import httpx

    from loadtests import peers as peer_servers
    from service.engine import OnnxModel
    from service.imaging import decode_image
    from service.launch import start_gateway, start_server
    from service.repository import ModelRepository, ModelSpec, provider_options
    from service.settings import Settings, usable_cores

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    chosen = {"providers": list(providers)} if providers else {}
    settings = Settings(tracking_uri=tracking_uri, cache_dir=work / "cache", **chosen)
    batching = Settings(max_batch_size=max_batch_size, **chosen)  # what the batching-on server runs
    repository = ModelRepository(settings)
    loaded = repository.get(ModelSpec(model_name, alias))  # the same download/load path as serving
    model, metadata, version = loaded.model, loaded.metadata, loaded.version
    images = load_images(image_dir)
    inputs = [model.prepare(decode_image(b)) for b in images]
    cores = usable_cores()
    per_batch = (max_batch_size, batching.batch_workers, batching.intra_op_threads)
    bare = BareOrt({n: OnnxModel(model.path, metadata, intra_op_threads=n, providers=settings.providers,
                                 provider_options=provider_options(settings))
                    for n in {1, cores, per_batch[2]}},
                   inputs, extra_configs=((max_batch_size, 1, cores), per_batch))
    progress("probing bare ORT configurations")
    speeds = bare.probe(seconds, concurrency)
    details = {BARE: "b={} x{} callers x{} ORT threads; probed ".format(*bare.config)
                     + ", ".join(f"b={b} x{t}x{i}: {v:.1f}" for (b, t, i), v in speeds.items())}
    quiet = {"ANOMALY_LOG_LEVEL": "WARNING"}
    if providers:
        quiet["ANOMALY_PROVIDERS"] = json.dumps(list(providers))
    children = []

    async def run_all() -> dict[tuple[str, str], list[Phase]]:
        opts = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with (grpc.aio.insecure_channel(addresses["off"], options=opts) as off,
                    grpc.aio.insecure_channel(addresses["on"], options=opts) as on,
                    grpc.aio.insecure_channel(addresses["one"], options=opts) as one,
                    httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http):
            paths: list[Target] = [bare, grpc_target(GRPC_OFF, off, images),
                                   grpc_target(GRPC_RAW, off, images, raw=True),
                                   StreamTarget(off, images), grpc_target(GRPC_ON, on, images),
                                   grpc_target(GRPC_ONE, one, images), http_target(http, images)]
            async with peer_servers.started(peers, tracking_uri, model_name, version, inputs, images,
                                            work, concurrency) as peer_targets:
                return await measure(paths + peer_targets, rounds=rounds, seconds=seconds,
                                     concurrency=concurrency, max_requests=max_requests,
                                     progress=progress)

    try:
        addresses: dict[str, str] = {}
        servers = {"off": {"ANOMALY_MAX_BATCH_SIZE": "1"},
                   "on": {"ANOMALY_MAX_BATCH_SIZE": str(max_batch_size)},
                   "one": {"ANOMALY_MAX_BATCH_SIZE": "1", "ANOMALY_WORKERS": "1"}}
        for key, env in servers.items():
            progress(f"starting gRPC server ({key}: {env})")
            child, addresses[key] = start_server(
                tracking_uri, work / f"server-{key}.log", model=model_name, alias=alias,
                cache_dir=work / "cache", env={**quiet, **env})
            children.append(child)
        child, base = start_gateway(addresses["off"], work / "gateway.log", env=quiet)
        children.append(child)
        phases = asyncio.run(run_all())
    finally:
        for child in reversed(children):
            child.stop()
    results = summarize(phases, details)
    if out is not None:
        text = render(results, model=f"{model_name}/{version} ({metadata.architecture}-{metadata.variant})",
                      images=len(images), concurrency=concurrency, seconds=seconds, rounds=rounds,
                      command=command, skipped=peer_servers.status_lines(), provider=model.provider)
        write_report(out, text)
        try:
            plot(results, out.with_suffix(".png"), f"{model_name}/{version}: same model, one run, "
                 f"{rounds} interleaved rounds")
        except ImportError:  # a serve-only install has no matplotlib: the table is the result
            pass
    return results


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def plot(results: list[Result], path: Path, title: str) -> None:
    """Bar chart: images/s at saturation and p50 at batch 1, one bar per path (log scale, so
    the slow peers stay visible). Needs matplotlib (the `train` extra has it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in results if r.mode == SATURATION]
    by = {(r.name, r.mode): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    for ax, mode, attr, label in ((axes[0], SATURATION, "images_per_s", "images/s at saturation"),
                                  (axes[1], LATENCY, "p50_ms", "p50 ms at batch 1")):
        values = [getattr(by[(n, mode)], attr) for n in names]
        colors = ["#888888" if n == BARE else "#1f77b4" if n.startswith(("gRPC", "HTTP")) else "#d62728"
                  for n in names]
        ax.barh(names, values, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        for y, v in enumerate(values):
            ax.annotate(f"{v:.1f}", (v, y), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path, table: str, markers: tuple[str, str] = (BEGIN, END),
                 heading: str = "# Serving benchmarks\n\nProduced by `anomaly bench` (loadtests/bench.py).",
                 ) -> None:
    """Put the generated part between the `markers` (`bench:begin/end`) of `out`, keeping
    the hand-written reading around it; a file without them gets the block appended (a new
    file: after `heading`)."""
    begin, end = markers
    block = f"{begin}\n{table.rstrip()}\n{end}"
    text = out.read_text() if out.exists() else ""
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        text = head + block + rest.partition(end)[2]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text else f"{heading}\n\n{block}\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)

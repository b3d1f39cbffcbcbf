"""Serving benchmark: the same model through bare ONNX Runtime, this project's gRPC server
and HTTP gateway, and (optionally) peer servers, measured in one run, interleaved.

Paths:
- bare ORT: `InferenceSession.run` on preprocessed tensors (no decoding), in-process;
  saturation uses the best of a few thread/batch/intra-op configurations, probed first
  (with every server and peer already up, as during the rounds);
  batch-1 latency uses all cores per call (the fastest alone);
- gRPC: the real server as a child process, batching off (the CPU default) and on, driven
  by asyncio clients sending PNG bytes (decoding is part of what a server does), and
  decoded pixels (`RawImage`, as a line camera would send); `ScoreStream` with PNG bytes;
  and the low-latency setting (`ANOMALY_WORKERS=1`: one call at a time on all cores);
- HTTP: the real gateway in front of the batching-off server, and the HTTP API the server
  answers from its own process (`ANOMALY_HTTP_IN_PROCESS`);
- peers (`loadtests.peers`): stock `mlflow models serve` on the registered version, a
  KServe `ModelServer` (V1 REST and V2 gRPC) and MLServer's MLflow runtime (V2 REST and
  gRPC), when asked for;
- a second image set (`camera_dir`, e.g. 1920×1200 JPEGs from `anomaly sample-data
  --camera`), where decoding dominates: the paths that receive encoded images (ours and
  KServe's) again, named `<path> [<W>×<H> JPEG]`.

Every served path's saturation phase also measures the CPU its server processes used
(their descendants included: the peers' worker processes), reported per image.

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
import contextlib
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from loadtests.report import plot, render, write_report
from loadtests.targets import (
    GRPC_EVIDENCE,
    GRPC_OFF,
    GRPC_ON,
    GRPC_ONE,
    GRPC_PROCS,
    GRPC_RAW,
    GRPC_TRACED,
    HTTP,
    HTTP_IN,
    V2_GRPC,
    BareOrt,
    StreamTarget,
    Target,
    grpc_target,
    http_target,
    v2_target,
)
from loadtests.timing import BARE, Phase, Result, measure, summarize


def load_images(image_dir: Path, limit: int = 64) -> list[bytes]:
    """Up to `limit` real images (PNG, JPEG …; no ground-truth masks) under `image_dir`.

    Raises:
        ValueError: there are none.
    """
    from anomaly.wire import IMAGE_SUFFIXES

    files = sorted(p for p in Path(image_dir).rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and "ground_truth" not in p.parts)[:limit]
    if not files:
        raise ValueError(f"no images under {image_dir}")
    return [p.read_bytes() for p in files]


def image_set_tag(images: list[bytes]) -> str:
    """`<W>×<H> <FORMAT>` of the first image, e.g. `1920×1200 JPEG`."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(images[0])) as im:
        return f"{im.width}×{im.height} {im.format}"


def run_benchmark(tracking_uri: str, model_name: str, alias: str, image_dir: Path, *,
                  seconds: float = 5.0, rounds: int = 3, concurrency: int = 8,
                  max_requests: int = 5000, peers: tuple[str, ...] = (), out: Path | None = None,
                  command: str = "", progress: Callable[[str], None] = lambda _: None,
                  providers: tuple[str, ...] = (), max_batch_size: int = 8,
                  camera_dir: Path | None = None) -> list[Result]:
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
        camera_dir: a second image set (e.g. camera-sized JPEGs) for the paths that decode.
    """
    import httpx

    from anomaly.channel import MESSAGE_OPTIONS, grpc_channel
    from loadtests import peers as peer_servers
    from loadtests.launch import free_port, start_gateway, start_server, wait_http_ready, wait_metric
    from loadtests.otlp_sink import OtlpSink
    from service.repository.model_repository import ModelRepository, ModelSpec
    from service.repository.version_cache import provider_options
    from service.runtime.engine import OnnxModel
    from service.settings import Settings, usable_cores

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    chosen = {"providers": list(providers)} if providers else {}
    settings = Settings(tracking_uri=tracking_uri, cache_dir=work / "cache", **chosen)
    batching = Settings(max_batch_size=max_batch_size, **chosen)  # what the batching-on server runs
    repository = ModelRepository(settings)
    loaded = repository.get(ModelSpec(model_name, alias))  # the same download/load path as serving
    model, metadata, version = loaded.model, loaded.metadata, loaded.version
    images = load_images(image_dir)
    camera = load_images(camera_dir, 16) if camera_dir is not None else []
    tag = image_set_tag(camera) if camera else ""
    inputs = [model.prepare_encoded(b) for b in images]
    cores = usable_cores()
    per_batch = (max_batch_size, batching.batch_workers, batching.intra_op_threads)
    bare = BareOrt({n: OnnxModel(model.path, metadata, intra_op_threads=n, providers=settings.providers,
                                 provider_options=provider_options(settings))
                    for n in {1, cores, per_batch[2]}},
                   inputs, extra_configs=((max_batch_size, 1, cores), per_batch))
    details: dict[str, str] = {}
    quiet = {"ANOMALY_LOG_LEVEL": "WARNING"}
    if providers:
        quiet["ANOMALY_PROVIDERS"] = json.dumps(list(providers))
    children = []
    sink = OtlpSink()  # the traced server's collector: counts the spans it is sent

    def served(target: Target, *keys: str) -> Target:
        target.server_pids = tuple(pids[k] for k in keys)
        return target

    async def run_all() -> dict[tuple[str, str], list[Phase]]:
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with (grpc_channel(addresses["off"], aio=True) as off,
                    grpc_channel(addresses["traced"], aio=True) as traced,
                    grpc_channel(addresses["evidence"], aio=True) as kept,
                    grpc_channel(addresses["on"], aio=True) as on,
                    grpc_channel(addresses["one"], aio=True) as one,
                    httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http,
                    httpx.AsyncClient(base_url=http_in, timeout=30, limits=limits) as inproc,
                    contextlib.AsyncExitStack() as stack):
            paths: list[Target] = [bare, served(grpc_target(GRPC_OFF, off, images), "off"),
                                   served(grpc_target(GRPC_RAW, off, images, raw=True), "off"),
                                   served(StreamTarget(off, images), "off"),
                                   served(grpc_target(GRPC_TRACED, traced, images), "traced"),
                                   served(grpc_target(GRPC_EVIDENCE, kept, images), "evidence"),
                                   served(grpc_target(GRPC_ON, on, images), "on"),
                                   served(grpc_target(GRPC_ONE, one, images), "one"),
                                   served(http_target(inproc, images, HTTP_IN), "in"),
                                   served(http_target(http, images), "off", "gateway"),
                                   served(v2_target(V2_GRPC, off, images, model_name), "off")]
            own = [*MESSAGE_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]  # 8 connections, 2 processes
            procs = [await stack.enter_async_context(grpc_channel(addresses["procs"], aio=True, options=own))
                     for _ in range(8)]
            paths.append(served(grpc_target(GRPC_PROCS, procs, images), "procs"))
            if camera:
                paths += [served(grpc_target(f"{GRPC_OFF} [{tag}]", off, camera), "off"),
                          served(http_target(inproc, camera, f"{HTTP_IN} [{tag}]"), "in"),
                          served(http_target(http, camera, f"{HTTP} [{tag}]"), "off", "gateway"),
                          served(v2_target(f"{V2_GRPC} [{tag}]", off, camera, model_name), "off")]
            model_dir = next(d for d in model.path.parents if (d / "MLmodel").is_file())
            async with peer_servers.started(peers, tracking_uri, model_name, version, inputs, images,
                                            work, concurrency, model_dir,
                                            {tag: camera} if camera else None) as peer_targets:
                # Probed with every server and peer up, idle, as they are during the rounds.
                progress("probing bare ORT configurations")
                speeds = await asyncio.to_thread(bare.probe, seconds, concurrency)
                details[BARE] = "b={} x{} callers x{} ORT threads; probed ".format(*bare.config) + ", ".join(
                    f"b={b} x{t}x{i}: {v:.1f}" for (b, t, i), v in speeds.items())
                return await measure(paths + peer_targets, rounds=rounds, seconds=seconds,
                                     concurrency=concurrency, max_requests=max_requests,
                                     progress=progress)

    try:
        addresses: dict[str, str] = {}
        pids: dict[str, int] = {}
        http_port, procs_metrics = free_port(), free_port()
        http_in = f"http://127.0.0.1:{http_port}"
        # Tracing on: every request's spans exported over OTLP/HTTP to a sink on loopback.
        servers = {"off": {"ANOMALY_MAX_BATCH_SIZE": "1"},
                   "traced": {"ANOMALY_MAX_BATCH_SIZE": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint},
                   # Evidence on: NG decisions and 1 % of OK ones kept (`service.inspection.evidence`).
                   "evidence": {"ANOMALY_MAX_BATCH_SIZE": "1", "ANOMALY_EVIDENCE": "true",
                                "ANOMALY_EVIDENCE_DIR": str(work / "evidence")},
                   "on": {"ANOMALY_MAX_BATCH_SIZE": str(max_batch_size)},
                   "one": {"ANOMALY_MAX_BATCH_SIZE": "1", "ANOMALY_WORKERS": "1"},
                   "in": {"ANOMALY_MAX_BATCH_SIZE": "1", "ANOMALY_HTTP_IN_PROCESS": "true",
                          "ANOMALY_HTTP_PORT": str(http_port)},
                   "procs": {"ANOMALY_MAX_BATCH_SIZE": "1", "ANOMALY_PROCESSES": "2",
                             "ANOMALY_METRICS_PORT": str(procs_metrics)}}
        for key, env in servers.items():
            progress(f"starting gRPC server ({key}: {env})")
            child, addresses[key] = start_server(
                tracking_uri, work / f"server-{key}.log", model=model_name, alias=alias, port=free_port(),
                cache_dir=work / "cache", env={**quiet, **env})
            children.append(child)
            pids[key] = child.pid
        wait_http_ready(f"{http_in}/readyz", 60)
        for i in range(2):  # every child of the 2-process server has its model loaded
            wait_metric(f"http://127.0.0.1:{procs_metrics + i}/metrics", "anomaly_model_info{", 120)
        child, base = start_gateway(addresses["off"], work / "gateway.log", env=quiet)
        children.append(child)
        pids["gateway"] = child.pid
        phases = asyncio.run(run_all())
    finally:
        for child in reversed(children):
            child.stop()
        sink.close()
    details[GRPC_TRACED] = f"{sink.received} spans exported to an OTLP/HTTP sink on loopback"
    kept = [json.loads(p.read_text())["reason"] for p in (work / "evidence").rglob("*.json")]
    answered = sum(p.images for (name, _), runs in phases.items() if name == GRPC_EVIDENCE for p in runs)
    details[GRPC_EVIDENCE] = (f"{kept.count('ng')} NG and {kept.count('ok_sample')} sampled OK parts kept "
                              f"as evidence, of {answered} answered")
    results = summarize(phases, details)
    if out is not None:
        text = render(results, model=f"{model_name}/{version} ({metadata.architecture}-{metadata.variant})",
                      images=len(images), concurrency=concurrency, seconds=seconds, rounds=rounds,
                      camera=f"{len(camera)} {tag} frames" if camera else "",
                      command=command, skipped=peer_servers.status_lines(), provider=model.provider)
        write_report(out, text)
        try:
            plot(results, out.with_suffix(".png"), f"{model_name}/{version}: same model, one run, "
                 f"{rounds} interleaved rounds")
        except ImportError:  # a serve-only install has no matplotlib: the table is the result
            pass
    return results

"""Execution-provider check: every registered version of a model, loaded through the serving
path (`ModelRepository` → `OnnxModel`) once on the CPU provider and once on the requested
providers (CUDA, TensorRT), then compared on the same real images.

For each version it reports the provider that actually runs after ONNX Runtime's fallback
(an unavailable or failing provider falls back, with a warning, and the table says so),
load + warm-up time (a TensorRT engine build shows here), batch-1 p50 latency, images/s at
the batching batch size from one caller, and how far the scores move from the CPU ones:
the largest |normalized-score difference| and how many OK/NG decisions change.

`anomaly providers-check` runs it; on a machine without a GPU every row falls back to CPU,
which is the fallback path checked by the tests.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- providers:begin -->", "<!-- providers:end -->"


@dataclass
class Timing:
    """One model on one provider."""

    provider: str
    load_s: float
    p50_ms: float
    images_per_s: float


@dataclass
class ProviderRow:
    """One version: the CPU reference, the requested providers, and how the scores compare."""

    version: str
    aliases: str
    variant: str
    requested: str
    cpu: Timing
    accel: Timing
    max_score_diff: float
    decisions_changed: int
    images: int

    @property
    def fell_back(self) -> bool:
        """True when the first requested provider is not the one that runs."""
        return self.accel.provider != self.requested.split(",")[0]


def _time(model, inputs: list[np.ndarray], batch: int, seconds: float) -> tuple[float, float]:  # noqa: ANN001
    """Batch-1 p50 (ms) for seconds/2, then images/s at `batch` from one caller for seconds/2
    (after a warm-up call at that batch: TensorRT may build an engine per shape)."""
    from loadtests.timing import time_batch1, time_batches

    p50_ms = 1e3 * statistics.median(time_batch1(model, inputs, seconds / 2, 5000).latencies_s)
    model.warmup((batch,))
    return p50_ms, time_batches(model, inputs, batch, 1, seconds / 2).images_per_s


def _decisions(model, inputs: list[np.ndarray], batch: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Normalized scores and OK/NG decisions for every input (global threshold)."""
    scores = np.concatenate([model.infer(np.stack(inputs[i:i + batch]))[0]
                             for i in range(0, len(inputs), batch)])
    decided = [model.decide(float(s), None, "") for s in scores]
    return (np.array([d.normalized_score for d in decided]),
            np.array([d.is_anomalous for d in decided]))


def check_providers(tracking_uri: str, model_name: str, image_dir: Path, providers: list[str], *,
                    versions: list[str] | None = None, batch: int = 8, seconds: float = 4.0,
                    trt_cache_dir: Path | None = None,
                    progress: Callable[[str], None] = lambda _: None) -> list[ProviderRow]:
    """Compare `providers` with the CPU provider on every (or the listed) version.

    Args:
        tracking_uri: MLflow store holding the model.
        model_name: registered model.
        image_dir: folder of real PNG images (the first 64 are used).
        providers: ONNX Runtime providers to check, in order of preference.
        versions: version numbers to check (default: all registered versions).
        batch: batch size for the throughput column and the score comparison.
        seconds: time per model and provider (half batch-1 latency, half throughput).
        trt_cache_dir: TensorRT engine cache folder (for the TensorRT provider).
        progress: called with a line before each version.
    """
    from loadtests.bench import load_images
    from service.repository.model_repository import ModelRepository
    from service.runtime.imaging import decode_image
    from service.settings import Settings

    cache = Path(tempfile.mkdtemp(prefix="providers-")) / "cache"
    cpu_repo = ModelRepository(Settings(tracking_uri=tracking_uri, cache_dir=cache,
                                        providers=["CPUExecutionProvider"], max_loaded_models=1))
    accel_repo = ModelRepository(Settings(tracking_uri=tracking_uri, cache_dir=cache, providers=providers,
                                          trt_engine_cache_dir=trt_cache_dir, max_loaded_models=1))
    found = cpu_repo.client.search_model_versions(f"name='{model_name}'")
    if not found:
        raise ValueError(f"no registered versions of {model_name!r} in {tracking_uri}")
    wanted = sorted((mv for mv in found if not versions or str(mv.version) in versions),
                    key=lambda mv: int(mv.version))
    if not wanted:
        have = ", ".join(sorted((str(mv.version) for mv in found), key=int))
        raise ValueError(f"{model_name!r} has no version {', '.join(versions or [])} (has {have})")
    images = [decode_image(b) for b in load_images(image_dir)]  # decoded once for every load
    rows = []
    for mv in wanted:
        version = str(mv.version)
        progress(f"version {version} ({', '.join(mv.aliases)})")
        timings, outcomes = [], []
        for repo in (cpu_repo, accel_repo):
            t0 = time.perf_counter()
            loaded = repo.load(model_name, version)
            load_s = time.perf_counter() - t0
            model = loaded.model
            inputs = [model.prepare(rgb) for rgb in images]
            p50, ips = _time(model, inputs, batch, seconds)
            timings.append(Timing(model.provider, load_s, p50, ips))
            outcomes.append(_decisions(model, inputs, batch))
        (cpu_scores, cpu_ng), (scores, ng) = outcomes
        rows.append(ProviderRow(version, ", ".join(sorted(mv.aliases)),
                                f"{loaded.metadata.architecture}-{loaded.metadata.variant}",
                                ",".join(providers), timings[0], timings[1],
                                float(np.abs(scores - cpu_scores).max()), int((ng != cpu_ng).sum()),
                                len(images)))
    return rows


def render(rows: list[ProviderRow], *, batch: int, command: str = "", machine: str = "") -> str:
    """Markdown: one row per version, the requested providers against the CPU provider."""
    lines = []
    if machine:
        lines += [machine, ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [
        f"| version | aliases | variant | runs on | load + warm-up s | batch-1 p50 ms (CPU) | batch-{batch} "
        "img/s (CPU) | speed-up at batch 1 / batch "
        f"{batch} | max \\|Δ normalized score\\| vs CPU | decisions changed |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        runs_on = r.accel.provider + (" (fell back)" if r.fell_back else "")
        lines.append(
            f"| {r.version} | {r.aliases} | {r.variant} | {runs_on} | {r.accel.load_s:.1f} "
            f"| {r.accel.p50_ms:.2f} ({r.cpu.p50_ms:.2f}) | {r.accel.images_per_s:.0f} "
            f"({r.cpu.images_per_s:.0f}) | {r.cpu.p50_ms / r.accel.p50_ms:.1f}× / "
            f"{r.accel.images_per_s / r.cpu.images_per_s:.1f}× | {r.max_score_diff:.2g} "
            f"| {r.decisions_changed} of {r.images} |")
    return "\n".join(lines) + "\n"

"""Evaluate an exported ONNX model through the serving engine (`service.runtime.engine.OnnxModel`).

"Evaluate what you serve": the test images are read as bytes, decoded and preprocessed
by `service.runtime.imaging`, and scored by the same ONNX Runtime session class the server runs.
From the results come the metrics logged to MLflow and the metadata the server needs:
per-category thresholds (F1-optimal on the test split, as anomalib's adaptive threshold),
score statistics for normalisation, and the anomaly-map display range.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import precision_recall_curve

from registry.data.mvtec import Sample
from registry.metrics import aupro, auroc
from service.runtime.engine import OnnxModel
from service.runtime.metadata import GLOBAL, ModelMetadata, ScoreStats

log = logging.getLogger(__name__)


@dataclass
class EvalReport:
    """Metrics and calibration of one model on one test split."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    image_stats: dict[str, ScoreStats] = field(default_factory=dict)
    map_range: tuple[float, float] = (0.0, 1.0)
    latency_ms_p50: float = 0.0
    images_per_s_b8: float = 0.0
    scores: np.ndarray | None = None  # raw image score of each test sample, in order

    @property
    def image_auroc(self) -> float:
        """Mean image AUROC over categories."""
        return self.metrics["image_auroc"]

    @property
    def pixel_auroc(self) -> float:
        """Mean pixel AUROC over categories."""
        return self.metrics["pixel_auroc"]

    @property
    def aupro(self) -> float:
        """Mean AUPRO (FPR ≤ 0.3) over categories."""
        return self.metrics["aupro"]


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises F1 (anomalib's F1AdaptiveThreshold)."""
    if labels.min() == labels.max():  # one class only: put it just above the good scores
        return float(scores.max()) * 1.0001
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def _mask(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if sample.mask_path is None:
        return np.zeros((h, w), dtype=bool)
    m = Image.open(sample.mask_path).convert("L").resize((w, h), Image.NEAREST)
    return np.asarray(m) > 127


def score_samples(model: OnnxModel, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Score each sample at batch 1 through the engine, as the server would.

    Returns:
        scores `(N,)`, anomaly maps `(N, H, W)` and per-image inference times in ms.
    """
    scores, maps, times = [], [], []
    for s in samples:
        x = model.prepare_encoded(s.path.read_bytes())[None]
        t0 = time.perf_counter()
        score, amap = model.infer(x)
        times.append((time.perf_counter() - t0) * 1e3)
        scores.append(score[0])
        maps.append(amap[0])
    return np.asarray(scores, dtype=np.float64), np.stack(maps), times


def batch_throughput(model: OnnxModel, images: np.ndarray, batch_size: int = 8,
                     seconds: float = 2.0, rounds: int = 3) -> float:
    """Images/s of `model.infer` on batches of `batch_size` prepared images: one warm-up
    run, then the best of `rounds` timed rounds sharing `seconds`."""
    batch = np.concatenate([images] * (batch_size // len(images) + 1))[:batch_size]
    model.infer(batch)
    best = 0.0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / rounds:
            model.infer(batch)
            n += batch_size
        best = max(best, n / (time.perf_counter() - t0))
    return best


def interleaved_p50_ms(models: dict[str, OnnxModel], inputs: dict[str, np.ndarray], rounds: int = 6,
                       calls: int = 15) -> dict[str, float]:
    """Batch-1 latency of several models timed side by side: in each round every model
    makes `calls` calls in turn (the order rotating from round to round), and each model's
    p50 is taken over all its calls. Whatever else the machine does meanwhile (another
    job, clock changes) falls on every model alike, unlike timing one build after another.

    Args:
        models: label → model.
        inputs: label → that model's prepared inputs `(N, 3, H, W)` (tiled: `(N, T, 3, H, W)`).
        rounds: interleaved rounds.
        calls: calls per model and round.
    """
    labels = list(models)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for label, model in models.items():
        model.infer(inputs[label][:1])
    for r in range(rounds):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            model, xs = models[label], inputs[label]
            for i in range(calls):
                t0 = time.perf_counter()
                model.infer(xs[i % len(xs)][None])
                times[label].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def evaluate(onnx_path: Path | str, metadata: ModelMetadata, samples: list[Sample],
             providers: list[str] | None = None) -> EvalReport:
    """Score the test split through the serving engine and compute metrics + calibration.

    Args:
        onnx_path: exported model.
        metadata: its metadata (thresholds/statistics may be empty; they are computed here).
        samples: test samples with labels and masks.
        providers: ONNX Runtime execution providers.

    Returns:
        An `EvalReport` (metrics keys: `image_auroc`, `pixel_auroc`, `aupro` (FPR ≤ 0.3),
        the same per category as `<metric>/<cat>`, `latency_ms_p50` (batch 1) and
        `images_per_s_b8` (throughput at batch 8)).
    """
    model = OnnxModel(onnx_path, metadata, providers=providers)
    model.warmup()
    scores, maps, times = score_samples(model, samples)
    labels = np.array([s.label for s in samples])
    cats = np.array([s.category for s in samples])
    report = EvalReport(latency_ms_p50=float(np.median(times)), scores=scores)
    for cat in sorted(set(cats)):
        sel = cats == cat
        masks = np.stack([_mask(s, metadata.map_size) for s in np.array(samples, dtype=object)[sel]])
        report.per_category[cat] = {
            "image_auroc": auroc(labels[sel], scores[sel]),
            "pixel_auroc": auroc(masks, maps[sel]),
            "aupro": aupro(masks, maps[sel]),
        }
        for key, value in report.per_category[cat].items():
            report.metrics[f"{key}/{cat}"] = value
        report.image_stats[cat] = ScoreStats(
            threshold=f1_threshold(labels[sel], scores[sel]),
            min=float(scores[sel].min()), max=float(scores[sel].max()))
    report.image_stats[GLOBAL] = ScoreStats(
        threshold=f1_threshold(labels, scores), min=float(scores.min()), max=float(scores.max()))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        report.metrics[key] = float(np.nanmean([v[key] for v in report.per_category.values()]))
    report.metrics["latency_ms_p50"] = report.latency_ms_p50
    first = [model.prepare_encoded(s.path.read_bytes())
             for s in samples[:8]]
    report.images_per_s_b8 = report.metrics["images_per_s_b8"] = batch_throughput(model, np.stack(first))
    good_maps = maps[labels == 0]
    lo = float(np.percentile(good_maps, 50)) if len(good_maps) else float(maps.min())
    hi = float(np.percentile(maps, 99.9))
    report.map_range = (lo, max(hi, lo + 1e-9))
    log.info("evaluated %s: image AUROC %.3f, pixel AUROC %.3f", Path(onnx_path).name,
             report.image_auroc, report.pixel_auroc)
    return report

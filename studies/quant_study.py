"""`anomaly quant-study`: the variants table, the PTQ calibration study and the plot.

Reads what the demo registered (every `<arch>-<variant>` alias of the store), times the
variants of each architecture side by side (interleaved, one run), then, for each
architecture's FP32 version, quantizes it with every calibration (real / random-normal
data × MinMax / Entropy / Percentile) and evaluates each through the serving engine.
Writes the "Variants" section of `docs/results.md` and a PNG of image AUROC against
latency per variant.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from anomaly.wire import DEFAULT_MODEL_NAME
from loadtests.report import replace_section
from registry.data.mvtec import load_test_split, load_train_split
from registry.evaluate import batch_throughput, evaluate
from registry.pipeline import calibration_images, calibration_label
from registry.variants import VARIANTS
from registry.variants.calibration import CalibrationAlgo, CalibrationData
from registry.variants.ptq import quantize_int8
from service.runtime.hardware import this_host
from service.settings import usable_cores

log = logging.getLogger(__name__)

HEADING = "## Variants: FP32, FP16, PTQ-INT8, QAT-INT8"


@dataclass
class VariantRow:
    """One registered (architecture, variant) version, from its tags and run metrics."""

    architecture: str
    variant: str
    version: str
    calibration: str
    image_auroc: float
    pixel_auroc: float
    latency_ms_p50: float
    images_per_s_b8: float
    model_mb: float
    peak_rss_mb: float


@dataclass
class CalibrationRow:
    """One PTQ calibration of one architecture."""

    architecture: str
    data: str
    method: str
    image_auroc: float
    pixel_auroc: float
    aupro: float
    latency_ms_p50: float
    images_per_s_b8: float
    seconds: float


def registered_variants(model_name: str, architectures: list[str]) -> list[VariantRow]:
    """The newest version of every `<arch>-<variant>` alias in the current MLflow store."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    rows = []
    for arch in architectures:
        for variant in VARIANTS:
            try:
                mv = client.get_model_version_by_alias(model_name, f"{arch}-{variant}")
            except MlflowException:
                continue
            tags = mv.tags
            metrics = client.get_run(mv.run_id).data.metrics if mv.run_id else {}
            rows.append(VariantRow(
                arch, variant, mv.version, tags.get("calibration", "none"),
                float(tags.get("image_auroc", "nan")), float(tags.get("pixel_auroc", "nan")),
                float(tags.get("latency_ms_p50", "nan")), float(metrics.get("images_per_s_b8", "nan")),
                float(tags.get("model_mb", "nan")), float(tags.get("peak_rss_mb", "nan"))))
    return rows


def calibration_study(data_root: Path, model_name: str, architectures: list[str],
                      n_images: int = 64) -> list[CalibrationRow]:
    """Quantize each architecture's registered FP32 version with every calibration."""
    import mlflow

    from service.repository.artifact import read_model_dir

    train_set, test_set = load_train_split(data_root), load_test_split(data_root)
    rows = []
    for arch in architectures:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}@{arch}-fp32",
                                                             dst_path=tmp))
            fp32_path, metadata = read_model_dir(local)
            for data in CalibrationData:
                reader = calibration_images(data, train_set, metadata, n_images)
                for algo in CalibrationAlgo:
                    t0 = time.perf_counter()
                    target = Path(tmp) / f"{data.value}-{algo.value}.onnx"
                    out = quantize_int8(fp32_path, target, reader, algo)
                    seconds = time.perf_counter() - t0
                    md = metadata.model_copy(update={"variant": "ptq-int8", "precision": "int8",
                                                     "calibration": calibration_label(data, algo)})
                    r = evaluate(out, md, test_set)
                    rows.append(CalibrationRow(arch, data.value, algo.value, r.image_auroc, r.pixel_auroc,
                                               r.aupro, r.latency_ms_p50, r.images_per_s_b8, seconds))
                    log.info("%s %s-%s: image AUROC %.3f", arch, data.value, algo.value, r.image_auroc)
    return rows


@dataclass
class SpeedRow:
    """Bare ONNX Runtime throughput of one variant, measured interleaved with the others."""

    architecture: str
    variant: str
    images_per_s_b1: float
    images_per_s_b8: float


def side_by_side_speed(model_name: str, architectures: list[str], rounds: int = 8,
                       seconds: float = 2.0) -> list[SpeedRow]:
    """Images/s at batch 1 and 8 of every registered variant, in interleaved rounds (best
    round kept), so the ratios between variants come from one run on the same machine state."""
    import mlflow
    import numpy as np

    from service.repository.artifact import read_model_dir
    from service.runtime.engine import OnnxModel

    rows = []
    for arch in architectures:
        with tempfile.TemporaryDirectory() as tmp:
            models = {}
            for variant in VARIANTS:
                try:
                    local = Path(mlflow.artifacts.download_artifacts(
                        f"models:/{model_name}@{arch}-{variant}", dst_path=str(Path(tmp) / variant)))
                except Exception:  # noqa: BLE001 - a missing alias just leaves the row out
                    continue
                models[variant] = OnnxModel(*read_model_dir(local))
            if not models:
                continue
            h, w = next(iter(models.values())).metadata.input_size
            batch = np.random.default_rng(0).random((8, 3, h, w), dtype=np.float32)
            best: dict[tuple[str, int], float] = {}
            for _ in range(rounds):
                for variant, model in models.items():
                    for b in (1, 8):
                        rate = batch_throughput(model, batch, b, seconds=seconds / 2, rounds=1)
                        best[(variant, b)] = max(best.get((variant, b), 0.0), rate)
            rows += [SpeedRow(arch, v, best[(v, 1)], best[(v, 8)]) for v in models]
    return rows


def plot(rows: list[VariantRow], path: Path) -> Path:
    """Image AUROC against batch-1 latency, one marker per variant, one colour per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"fp32": "o", "fp16": "s", "ptq-int8": "^", "qat-int8": "D"}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    archs = sorted({r.architecture for r in rows})
    colours = dict(zip(archs, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in rows:
        ax.scatter(r.latency_ms_p50, r.image_auroc, marker=markers.get(r.variant, "x"), s=60,
                   color=colours[r.architecture], edgecolor="black", linewidth=0.5)
        ax.annotate(f"{r.architecture} {r.variant}", (r.latency_ms_p50, r.image_auroc), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("ms / image, batch 1, p50 (ONNX Runtime CPU, 2 cores)")
    ax.set_ylabel("image AUROC (mean of 4 categories)")
    ax.set_title("Unified models and their variants on the sample data")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _ratio(num: float | None, den: float | None) -> float:
    return num / den if num is not None and den else float("nan")


def render(variants: list[VariantRow], calib: list[CalibrationRow], *, plot_name: str, command: str,
           seconds: float, n_images: int, speed: list[SpeedRow] | None = None) -> str:
    """The Markdown section."""
    fp32 = {r.architecture: r for r in variants if r.variant == "fp32"}
    lines = [HEADING, "",
             f"Produced by `{command}` in {seconds / 60:.1f} min on this machine "
             f"({this_host().describe()}, {usable_cores()} CPU cores) from the versions the "
             "demo registered; every number comes from the exported file evaluated through the "
             "serving engine.", "",
             "| architecture | variant | calibration | version | image AUROC | pixel AUROC "
             "| ms/image (b=1, p50) | × FP32 | images/s (b=8) | × FP32 | model MB | server peak RSS MB |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in variants:
        base = fp32.get(r.architecture)
        speed1 = _ratio(base.latency_ms_p50 if base else None, r.latency_ms_p50)
        speed8 = _ratio(r.images_per_s_b8, base.images_per_s_b8 if base else None)
        lines.append(f"| {r.architecture} | {r.variant} | {r.calibration} | {r.version} "
                     f"| {r.image_auroc:.3f} | {r.pixel_auroc:.3f} | {r.latency_ms_p50:.1f} | {speed1:.2f}× "
                     f"| {r.images_per_s_b8:.1f} | {speed8:.2f}× | {r.model_mb:.2f} | {r.peak_rss_mb:.0f} |")
    if speed:
        base_speed = {r.architecture: r for r in speed if r.variant == "fp32"}
        lines += ["", "### Speed, side by side", "",
                  "Bare `InferenceSession.run` of each registered variant, loaded together and timed in "
                  "interleaved rounds (best round), so the ratios come from one run:", "",
                  "| architecture | variant | images/s (b=1) | × FP32 | images/s (b=8) | × FP32 |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in speed:
            b = base_speed.get(r.architecture)
            x1 = _ratio(r.images_per_s_b1, b.images_per_s_b1 if b else None)
            x8 = _ratio(r.images_per_s_b8, b.images_per_s_b8 if b else None)
            lines.append(f"| {r.architecture} | {r.variant} | {r.images_per_s_b1:.1f} | {x1:.2f}× "
                         f"| {r.images_per_s_b8:.1f} | {x8:.2f}× |")
    lines += ["", f"![image AUROC vs latency per variant]({plot_name})", "",
              "### PTQ calibration study", "",
              "Each FP32 version quantized by `registry/variants/ptq.py` (QDQ, uint8 activations, "
              f"int8 per-channel weights, networks only) with {n_images} calibration images from each "
              "source: `real` = normal training images through the serving pre-processing, `random` = "
              "random-normal inputs (N(0, 1) after the graph's ImageNet normalisation).", "",
              "| architecture | data | method | image AUROC | Δ vs FP32 | pixel AUROC | AUPRO "
              "| ms/image (b=1) | images/s (b=8) | quantize s |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in calib:
        base = fp32.get(c.architecture)
        delta = c.image_auroc - base.image_auroc if base else float("nan")
        lines.append(f"| {c.architecture} | {c.data} | {c.method} | {c.image_auroc:.3f} "
                     f"| {delta:+.3f} | {c.pixel_auroc:.3f} | {c.aupro:.3f} | {c.latency_ms_p50:.1f} "
                     f"| {c.images_per_s_b8:.1f} | {c.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def run_and_write(home: Path, out: Path, architectures: list[str], command: str,
                  model_name: str = DEFAULT_MODEL_NAME,
                  n_images: int = 64) -> tuple[list[VariantRow], list[CalibrationRow], list[SpeedRow]]:
    """Everything `anomaly quant-study` does; returns the two tables."""
    t0 = time.perf_counter()
    variants = registered_variants(model_name, architectures)
    if not variants:
        raise LookupError(f"no <arch>-<variant> aliases of {model_name!r} in this store: "
                          "run `make demo` first")
    speed = side_by_side_speed(model_name, architectures)
    calib = calibration_study(home / "data", model_name, architectures, n_images)
    png = plot(variants, out.parent / "variants.png")
    section = render(variants, calib, plot_name=png.name, command=command,
                     seconds=time.perf_counter() - t0, n_images=n_images, speed=speed)
    replace_section(out, HEADING, section)
    return variants, calib, speed


"""Unified vs one-class: the seed paper's first finding, reproduced on any dataset.

For each architecture, train one unified model on all categories and one model per
category on the same data and settings; evaluate every model through the serving
engine; log each setup to MLflow; write a Markdown report (`docs/results.md`).
"""

from __future__ import annotations

import logging
import math
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from loadtests.report import replace_section
from registry.architectures import DEFAULT_EPOCHS, ModelConfig, extra_for
from registry.data.mvtec import discover_categories
from registry.pipeline import BuildResult, build_variant_fp32
from registry.train import TrainConfig

log = logging.getLogger(__name__)

METRICS = ("image_auroc", "pixel_auroc", "aupro")
EXPERIMENT = "unified-vs-one-class"


@dataclass
class SetupResult:
    """One (architecture, setup) row: per-category metrics and costs."""

    architecture: str
    setup: str  # "unified" or "one-class"
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    n_models: int = 0
    total_mb: float = 0.0
    train_seconds: float = 0.0
    latency_ms_p50: float = 0.0
    epochs: int = 0

    def mean(self, metric: str) -> float:
        """Mean of `metric` over categories (NaNs ignored)."""
        vals = [m[metric] for m in self.per_category.values() if not math.isnan(m[metric])]
        return sum(vals) / len(vals) if vals else float("nan")


def _absorb(row: SetupResult, build: BuildResult) -> None:
    row.per_category.update(build.report.per_category)
    row.n_models += 1
    row.total_mb += build.model_mb
    row.train_seconds += build.train.seconds
    row.latency_ms_p50 = max(row.latency_ms_p50, build.report.latency_ms_p50)


def _log_mlflow(row: SetupResult, params: dict[str, object]) -> None:
    import mlflow

    from registry.mlflow_registry import ensure_experiment

    ensure_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"{row.architecture}-{row.setup}"):
        mlflow.set_tags({"architecture": row.architecture, "setup": row.setup})
        mlflow.log_params(params)
        metrics = {f"{k}/{cat}": v for cat, m in row.per_category.items() for k, v in m.items()}
        metrics.update({k: row.mean(k) for k in METRICS})
        metrics.update({"n_models": row.n_models, "total_mb": row.total_mb,
                        "train_seconds": row.train_seconds})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if not math.isnan(v)})


def unified_vs_one_class(
    data_root: Path | str,
    work_dir: Path | str,
    architectures: list[str],
    model_config: ModelConfig,
    train_config: TrainConfig,
    categories: list[str] | None = None,
    log_to_mlflow: bool = True,
) -> list[SetupResult]:
    """Train and evaluate unified and one-class models for each architecture."""
    cats = categories or discover_categories(data_root)
    work_dir = Path(work_dir)
    rows: list[SetupResult] = []
    base_config, base_train = model_config, train_config
    for arch in architectures:
        model_config = replace(base_config, extra=extra_for(arch, base_config.extra))
        train_config = replace(base_train, epochs=base_train.epochs or DEFAULT_EPOCHS.get(arch, 30))
        unified = SetupResult(arch, "unified")
        _absorb(unified, build_variant_fp32(
            data_root, work_dir / arch / "unified", architecture=arch, model_config=model_config,
            train_config=train_config, categories=cats, register=False, show_progress=False))
        one_class = SetupResult(arch, "one-class")
        for cat in cats:
            _absorb(one_class, build_variant_fp32(
                data_root, work_dir / arch / cat, architecture=arch, model_config=model_config,
                train_config=train_config, categories=[cat], register=False, show_progress=False))
        for row in (unified, one_class):
            log.info("%s %s: image AUROC %.3f pixel AUROC %.3f AUPRO %.3f", arch, row.setup,
                     row.mean("image_auroc"), row.mean("pixel_auroc"), row.mean("aupro"))
            row.epochs = train_config.epochs
            if log_to_mlflow:
                _log_mlflow(row, {"data": str(data_root), "epochs": train_config.epochs,
                                  "input_size": "x".join(map(str, model_config.input_size)),
                                  "backbone": model_config.backbone, "categories": ",".join(cats)})
            rows.append(row)
    return rows


def render_markdown(rows: list[SetupResult], *, data: str, input_size: int,
                    command: str, seconds: float) -> str:
    """The `docs/results.md` section for a comparison run."""
    cats = sorted({c for r in rows for c in r.per_category})
    lines = [
        "## Unified vs one-class (FP32)",
        "",
        f"Data: `{data}` ({len(cats)} categories: {', '.join(cats)}); input {input_size}²; "
        "the same epochs for the unified and the one-class models of an architecture; "
        "backbone EfficientNet-Lite0 (bundled ImageNet weights).",
        f"Machine: {platform.machine()}, {_cpu_count()} CPU cores, Python {platform.python_version()}. "
        f"Produced by `{command}` in {seconds / 60:.1f} min.",
        "Every model is evaluated from its exported ONNX file through the serving engine.",
        "",
        "| architecture | setup | epochs | models | image AUROC | pixel AUROC | AUPRO (FPR≤0.3) "
        "| total MB | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.architecture} | {r.setup} | {r.epochs} | {r.n_models} | "
                     f"{r.mean('image_auroc'):.3f} | "
                     f"{r.mean('pixel_auroc'):.3f} | {r.mean('aupro'):.3f} | {r.total_mb:.1f} | "
                     f"{r.train_seconds:.0f} |")
    lines += ["", "Per category (image AUROC / pixel AUROC / AUPRO):", "",
              "| architecture | setup | " + " | ".join(cats) + " |",
              "|---|---|" + "---:|" * len(cats)]
    for r in rows:
        cells = []
        for c in cats:
            m = r.per_category.get(c)
            cells.append(f"{m['image_auroc']:.3f} / {m['pixel_auroc']:.3f} / {m['aupro']:.3f}" if m else "-")
        lines.append(f"| {r.architecture} | {r.setup} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_and_write(data_root: Path, work_dir: Path, out: Path, architectures: list[str],
                  model_config: ModelConfig, train_config: TrainConfig, command: str,
                  categories: list[str] | None = None) -> list[SetupResult]:
    """Run the comparison and write (replace) the report section in `out`."""
    t0 = time.perf_counter()
    rows = unified_vs_one_class(data_root, work_dir, architectures, model_config, train_config,
                                categories)
    section = render_markdown(rows, data=str(data_root),
                              input_size=model_config.input_size[0], command=command,
                              seconds=time.perf_counter() - t0)
    replace_section(out, "## Unified vs one-class (FP32)", section)
    return rows

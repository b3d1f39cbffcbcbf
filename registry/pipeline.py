"""The build pipeline for one architecture: train → export ONNX → evaluate through the
serving engine → log and register in MLflow.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from registry.architectures import ModelConfig, build_model
from registry.data.mvtec import fingerprint, load_test_split, load_train_split
from registry.evaluate import EvalReport, evaluate
from registry.export import INPUT_NAME, OUTPUT_NAMES, export_onnx
from registry.mlflow_registry import DEFAULT_MODEL_NAME, RegisteredVersion, log_and_register
from registry.train import TrainConfig, TrainResult, train_model
from service.metadata import ModelMetadata

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    """Everything one pipeline run produced."""

    architecture: str
    variant: str
    onnx_path: Path
    metadata: ModelMetadata
    report: EvalReport
    train: TrainResult
    registered: RegisteredVersion | None

    @property
    def model_mb(self) -> float:
        """Size of the ONNX file in MB."""
        return self.onnx_path.stat().st_size / 1e6


def build_variant_fp32(
    data_root: Path | str,
    work_dir: Path | str,
    *,
    architecture: str = "stfpm",
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    categories: list[str] | None = None,
    register: bool = True,
    model_name: str = DEFAULT_MODEL_NAME,
    aliases: tuple[str, ...] = (),
    artifact_root: Path | str | None = None,
    show_progress: bool = True,
) -> BuildResult:
    """Train one unified model over all categories and register its FP32 variant.

    Args:
        data_root: MVTec-AD-layout dataset.
        work_dir: where the ONNX file and metadata are written.
        architecture: name in `registry.architectures.ARCHITECTURES`.
        model_config: input size, backbone, architecture extras.
        train_config: epochs, batch size, learning rate, seed.
        categories: subset of categories (default: all).
        register: log to MLflow (the current tracking URI) and register a version.
        model_name: registered model name.
        aliases: extra aliases for the new version (besides `<arch>-fp32`).
        artifact_root: artifact folder if the MLflow experiment must be created.
        show_progress: progress bar while training.
    """
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    work_dir = Path(work_dir)
    train_set = load_train_split(data_root, categories)
    test_set = load_test_split(data_root, categories)
    cats = sorted({s.category for s in train_set})
    log.info("training %s (%s) on %d images of %d categories", architecture,
             "unified" if len(cats) > 1 else "one-class", len(train_set), len(cats))
    model = build_model(architecture, model_config)
    result = train_model(model, train_set, train_config, show_progress=show_progress)
    onnx_path = export_onnx(model, work_dir / f"{architecture}-fp32.onnx")
    h, w = model_config.input_size
    provisional = ModelMetadata(
        architecture=architecture, variant="fp32", precision="fp32",
        input_name=INPUT_NAME, map_output=OUTPUT_NAMES[0], score_output=OUTPUT_NAMES[1],
        input_height=h, input_width=w, categories=cats, image_stats={},
        dataset=fingerprint(train_set + test_set), backbone=model_config.backbone,
    )
    report = evaluate(onnx_path, provisional, test_set)
    metadata = provisional.model_copy(update={"image_stats": report.image_stats,
                                              "map_range": report.map_range})
    metadata.save(work_dir)
    registered = None
    if register:
        params = {"architecture": architecture, "data": str(data_root), "categories": ",".join(cats),
                  **{f"train.{k}": v for k, v in asdict(train_config).items()},
                  "input_size": f"{h}x{w}", "backbone": model_config.backbone,
                  "score_margin_fraction": model_config.score_margin_fraction,
                  "n_train": result.n_train, "n_val": result.n_val, "best_epoch": result.best_epoch,
                  "torch_threads": os.cpu_count()}
        metrics = {**report.metrics, "train_seconds": result.seconds,
                   "best_val_loss": result.best_val_loss,
                   "model_mb": onnx_path.stat().st_size / 1e6}
        registered = log_and_register(onnx_path, metadata, params=params, metrics=metrics,
                                      history=result.history, model_name=model_name,
                                      aliases=aliases, artifact_root=artifact_root)
    return BuildResult(architecture, "fp32", onnx_path, metadata, report, result, registered)

"""The build pipeline for one architecture: train → export ONNX → evaluate through the
serving engine → log and register in MLflow; then the FP16, PTQ-INT8 and QAT-INT8
variants of that model, each evaluated and registered the same way.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anomaly.wire import DEFAULT_MODEL_NAME
from registry.architectures import AnomalyModel, ModelConfig, build_model
from registry.checkpoint import TORCH_ARTIFACTS, check_reproduces, load_checkpoint, save_checkpoint
from registry.data.mvtec import Sample, fingerprint, load_test_split, load_train_split
from registry.evaluate import EvalReport, evaluate
from registry.export import INPUT_NAME, OUTPUT_NAMES, export_onnx
from registry.mlflow_registry import RegisteredVersion, choose_reference_set, log_and_register
from registry.train import TrainConfig, TrainResult, train_model
from registry.variants import PRECISION
from registry.variants.calibration import (
    ArrayReader,
    CalibrationAlgo,
    CalibrationData,
    random_normal_images,
    real_images,
)
from registry.variants.fp16 import convert_fp16
from registry.variants.graph import census
from registry.variants.ptq import DEFAULT_SCHEME, quantize_int8
from registry.variants.qat import QATConfig, learned_overrides, qat_finetune, range_summary
from service.runtime.engine import OnnxModel
from service.runtime.metadata import ModelMetadata
from service.runtime.tiling import Tiling

log = logging.getLogger(__name__)

# The PTQ calibration the demo registers; `anomaly quant-study` compares all of them.
DEFAULT_CALIBRATION: tuple[CalibrationData, CalibrationAlgo] = (CalibrationData.real, CalibrationAlgo.minmax)
CALIBRATION_IMAGES = 64
VARIANTS = ("fp32", "fp16", "ptq-int8", "qat-int8")


@dataclass
class BuildResult:
    """Everything one (architecture, variant) build produced."""

    architecture: str
    variant: str
    onnx_path: Path
    metadata: ModelMetadata
    report: EvalReport
    train: TrainResult | None
    registered: RegisteredVersion | None
    model: AnomalyModel | None = field(default=None, repr=False)  # the trained torch model (fp32)
    seconds: float = 0.0  # build time of this variant (training included)

    @property
    def model_mb(self) -> float:
        """Size of the ONNX file in MB."""
        return self.onnx_path.stat().st_size / 1e6

    @property
    def label(self) -> str:
        """`<arch>-<variant>` (also the alias)."""
        return f"{self.architecture}-{self.variant}"


def calibration_label(data: CalibrationData, algo: CalibrationAlgo) -> str:
    """The `calibration` tag value, e.g. `real-minmax`."""
    return f"{data.value}-{algo.value}"


def finish_build(
    onnx_path: Path,
    base: ModelMetadata,
    test_set: list[Sample],
    *,
    variant: str,
    calibration: str = "",
    register: bool = True,
    params: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    history: list[dict[str, float]] | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    aliases: tuple[str, ...] = (),
    artifact_root: Path | str | None = None,
    checkpoint: Path | None = None,
) -> tuple[ModelMetadata, EvalReport, RegisteredVersion | None]:
    """Evaluate a built ONNX file through the serving engine, write its metadata beside it
    and (optionally) register it as a version with the DESIGN tags."""
    provisional = base.model_copy(update={"variant": variant, "precision": PRECISION[variant],
                                          "calibration": calibration, "image_stats": {}})
    report = evaluate(onnx_path, provisional, test_set)
    metadata = provisional.model_copy(update={"image_stats": report.image_stats,
                                              "map_range": report.map_range})
    metadata.save(onnx_path.parent)
    registered = None
    if register:
        assert report.scores is not None
        reference = choose_reference_set(test_set, report.scores, metadata)
        all_metrics = {**report.metrics, **(metrics or {}), "model_mb": onnx_path.stat().st_size / 1e6}
        registered = log_and_register(onnx_path, metadata, params={**(params or {}), "variant": variant,
                                                                   "calibration": calibration or "none"},
                                      metrics=all_metrics, history=history, model_name=model_name,
                                      aliases=aliases, artifact_root=artifact_root, reference=reference,
                                      checkpoint=checkpoint)
    return metadata, report, registered


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
    tiling: Tiling | None = None,
) -> BuildResult:
    """Train one unified model over all categories and register its FP32 variant.

    Args:
        data_root: MVTec-AD-layout dataset.
        work_dir: the ONNX file and metadata go to `<work_dir>/<arch>-fp32/`.
        architecture: name in `registry.architectures.ARCHITECTURES`.
        model_config: input size, backbone, architecture extras.
        train_config: epochs, batch size, learning rate, seed.
        categories: subset of categories (default: all).
        register: log to MLflow (the current tracking URI) and register a version.
        model_name: registered model name.
        aliases: extra aliases for the new version (besides `<arch>-fp32`).
        artifact_root: artifact folder if the MLflow experiment must be created.
        show_progress: progress bar while training.
        tiling: score large images as tiles of the input size (`service.runtime.tiling`): trained
            on those tiles, evaluated and served stitched; its score margin is the model's.

    Returns:
        The build, with the trained torch model in `.model` (for `build_variants`); the
        registered version carries it too (`torch/` artifacts, see `registry.checkpoint`).
    """
    t0 = time.perf_counter()
    model_config = model_config or ModelConfig()
    train_config = train_config or TrainConfig()
    train_set = load_train_split(data_root, categories)
    test_set = load_test_split(data_root, categories)
    cats = sorted({s.category for s in train_set})
    log.info("training %s (%s) on %d images of %d categories", architecture,
             "unified" if len(cats) > 1 else "one-class", len(train_set), len(cats))
    model = build_model(architecture, model_config)
    if tiling is not None:
        tiling = tiling.model_copy(update={"score_margin": model.score_margin})
    result = train_model(model, train_set, train_config, show_progress=show_progress, tiling=tiling)
    onnx_path = export_onnx(model, Path(work_dir) / f"{architecture}-fp32" / "model.onnx")
    h, w = model_config.input_size
    base = ModelMetadata(
        architecture=architecture, input_name=INPUT_NAME, map_output=OUTPUT_NAMES[0],
        score_output=OUTPUT_NAMES[1], input_height=h, input_width=w, categories=cats, image_stats={},
        dataset=fingerprint(train_set + test_set), backbone=model_config.backbone, tiling=tiling,
    )
    params = {"architecture": architecture, "data": str(Path(data_root).resolve()),
              "categories": ",".join(cats),
              **{f"train.{k}": v for k, v in asdict(train_config).items()},
              "input_size": f"{h}x{w}", "backbone": model_config.backbone,
              **{f"option.{k}": json.dumps(v) for k, v in model_config.extra.items()},
              "score_margin_fraction": model_config.score_margin_fraction,
              "n_train": result.n_train, "n_val": result.n_val, "best_epoch": result.best_epoch,
              "torch_threads": os.cpu_count()}
    metadata, report, registered = finish_build(
        onnx_path, base, test_set, variant="fp32", register=register, params=params,
        metrics={"train_seconds": result.seconds, "best_val_loss": result.best_val_loss},
        history=result.history, model_name=model_name, aliases=aliases, artifact_root=artifact_root,
        checkpoint=save_checkpoint(model, onnx_path.parent / TORCH_ARTIFACTS))
    return BuildResult(architecture, "fp32", onnx_path, metadata, report, result, registered,
                       model=model, seconds=time.perf_counter() - t0)


def calibration_images(data: CalibrationData, train_set: list[Sample], metadata: ModelMetadata,
                       n: int = CALIBRATION_IMAGES, seed: int = 0) -> ArrayReader:
    """Calibration inputs from `data` for a model described by `metadata`."""
    if data is CalibrationData.real:
        arr = real_images(train_set, metadata.input_size, n, seed, metadata.tiling)
    else:
        arr = random_normal_images(metadata.input_size, n, metadata.mean, metadata.std, seed)
    return ArrayReader(arr, metadata.input_name)


def build_variants(
    fp32: BuildResult,
    data_root: Path | str,
    work_dir: Path | str,
    *,
    variants: tuple[str, ...] = ("fp16", "ptq-int8", "qat-int8"),
    calibration: tuple[CalibrationData, CalibrationAlgo] = DEFAULT_CALIBRATION,
    qat_config: QATConfig | None = None,
    categories: list[str] | None = None,
    register: bool = True,
    model_name: str = DEFAULT_MODEL_NAME,
    artifact_root: Path | str | None = None,
    show_progress: bool = True,
) -> list[BuildResult]:
    """Build, evaluate and register the FP16 / PTQ-INT8 / QAT-INT8 variants of an FP32 build.

    Args:
        fp32: the FP32 build (its `.model` is needed for `qat-int8`).
        data_root: the dataset the FP32 model was trained on.
        work_dir: each variant goes to `<work_dir>/<arch>-<variant>/model.onnx`.
        variants: which to build, in order.
        calibration: (data, method) of the PTQ variant.
        qat_config: fine-tuning schedule of QAT.
        categories: subset of categories (default: all).
        register: log to MLflow and register each variant as a version.
        model_name: registered model name.
        artifact_root: artifact folder if the MLflow experiment must be created.
        show_progress: progress bar while fine-tuning (QAT).
    """
    work_dir = Path(work_dir)
    train_set = load_train_split(data_root, categories)
    test_set = load_test_split(data_root, categories)
    arch = fp32.architecture
    parent = {"parent_version": fp32.registered.version if fp32.registered else "",
              "architecture": arch, "categories": ",".join(fp32.metadata.categories),
              "input_size": f"{fp32.metadata.input_height}x{fp32.metadata.input_width}",
              "backbone": fp32.metadata.backbone}
    common = {"register": register, "model_name": model_name, "artifact_root": artifact_root}
    out: list[BuildResult] = []
    for variant in variants:
        t0 = time.perf_counter()
        path = work_dir / f"{arch}-{variant}" / "model.onnx"
        train_result: TrainResult | None = None
        params: dict[str, Any] = dict(parent)
        calib = ""
        if variant == "fp16":
            convert_fp16(fp32.onnx_path, path)
        elif variant == "ptq-int8":
            data, algo = calibration
            calib = calibration_label(data, algo)
            quantize_int8(fp32.onnx_path, path, calibration_images(data, train_set, fp32.metadata), algo,
                          scheme=DEFAULT_SCHEME)
            params.update(calibration_images=CALIBRATION_IMAGES, activations="uint8",
                          weights="int8 per-channel", int8_scheme=DEFAULT_SCHEME,
                          int8_weight_preparation="clip+bias-correction")
        elif variant == "qat-int8":
            if fp32.model is None:
                raise ValueError("qat-int8 needs the trained torch model (BuildResult.model)")
            cfg = qat_config or QATConfig()
            model = copy.deepcopy(fp32.model)
            train_result, state = qat_finetune(model, train_set, cfg, show_progress=show_progress,
                                               tiling=fp32.metadata.tiling)
            float_path = export_onnx(model, work_dir / f"{arch}-qat-fp32" / "model.onnx")
            overrides = learned_overrides(float_path, state) if cfg.ranges == "learned" else {}
            log.info("QAT ranges: %s", range_summary(overrides))
            calib = calibration_label(CalibrationData.real, CalibrationAlgo.minmax)
            if overrides:
                calib = "learned+" + calib
            quantize_int8(float_path, path,
                          calibration_images(CalibrationData.real, train_set, fp32.metadata),
                          CalibrationAlgo.minmax, scheme=cfg.scheme, tensor_overrides=overrides,
                          weight_preparation=False)
            params.update(int8_scheme=cfg.scheme)
            params.update({f"qat.{k}": v for k, v in asdict(cfg).items()},
                          bn_folded=state["bn_folded"], learned_ranges=len(overrides))
        else:
            raise ValueError(f"unknown variant {variant!r}")
        g = census(path)
        metrics = {"int8_weight_fraction": g.int8_weight_fraction}
        if train_result is not None:
            metrics["train_seconds"] = train_result.seconds
        metadata, report, registered = finish_build(
            path, fp32.metadata, test_set, variant=variant, calibration=calib, params=params,
            metrics=metrics, history=train_result.history if train_result else None, **common)
        out.append(BuildResult(arch, variant, path, metadata, report, train_result, registered,
                               seconds=time.perf_counter() - t0))
        log.info("%s-%s: image AUROC %.3f (fp32 %.3f), %.1f MB", arch, variant, report.image_auroc,
                 fp32.report.image_auroc, g.file_mb)
    return out


def build_architecture(
    data_root: Path | str,
    work_dir: Path | str,
    *,
    architecture: str,
    variants: tuple[str, ...] = VARIANTS,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    qat_config: QATConfig | None = None,
    calibration: tuple[CalibrationData, CalibrationAlgo] = DEFAULT_CALIBRATION,
    categories: list[str] | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    aliases: tuple[str, ...] = (),
    artifact_root: Path | str | None = None,
    show_progress: bool = True,
    on_build: Callable[[BuildResult], None] | None = None,
    tiling: Tiling | None = None,
) -> list[BuildResult]:
    """Train one architecture and build and register `variants` of it (FP32 first).

    The FP32 version is always built and registered, whether listed or not: every other
    variant derives from it, and it carries the torch model (`anomaly variants --from`).
    `on_build` is called after each registered build (progress reporting).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    fp32 = build_variant_fp32(data_root, work_dir, architecture=architecture, model_config=model_config,
                              train_config=train_config, categories=categories, model_name=model_name,
                              aliases=aliases, artifact_root=artifact_root, show_progress=show_progress,
                              tiling=tiling)
    if on_build:
        on_build(fp32)
    builds = [fp32]
    for variant in (v for v in variants if v != "fp32"):
        built = build_variants(fp32, data_root, work_dir, variants=(variant,), calibration=calibration,
                               qat_config=qat_config, categories=categories, model_name=model_name,
                               artifact_root=artifact_root, show_progress=show_progress)
        builds += built
        if on_build:
            on_build(built[0])
    fp32.model = None  # free the torch model
    return builds


def resolve_version(model_uri: str) -> Any:
    """The `ModelVersion` behind `models:/<name>/<version>` or `models:/<name>@<alias>`.

    Raises:
        ValueError: not such a URI.
        mlflow.exceptions.MlflowException: no such model, version or alias.
    """
    from mlflow import MlflowClient

    prefix = "models:/"
    rest = model_uri[len(prefix):] if model_uri.startswith(prefix) else ""
    client = MlflowClient()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return client.get_model_version_by_alias(name, alias)
    name, _, version = rest.rpartition("/")
    if not name or not version.isdigit():
        raise ValueError(f"{model_uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    return client.get_model_version(name, version)


def fp32_from_registry(
    model_uri: str,
    data_root: Path | str | None,
    work_dir: Path | str,
    *,
    categories: list[str] | None = None,
) -> tuple[BuildResult, Path]:
    """The registered FP32 version `model_uri` as a build to derive variants from: its
    ONNX file, metadata and torch model downloaded, and re-evaluated on `data_root` (the
    dataset it was trained on, by default the path its run recorded; a dataset with other
    contents is reported in the log). Returns the build and the dataset used.

    Raises:
        ValueError: not an FP32 version, no dataset, or registered without its torch model.
    """
    import mlflow
    import mlflow.artifacts
    from mlflow import MlflowClient

    from service.repository.artifact import read_model_dir

    mv = resolve_version(model_uri)
    tags = dict(mv.tags or {})
    if tags.get("variant") != "fp32":
        raise ValueError(f"{model_uri} is a {tags.get('variant', 'untagged')} version: variants are "
                         "built from an FP32 version")
    if data_root is None:
        recorded = mlflow.get_run(mv.run_id).data.params.get("data")
        if not recorded:
            raise ValueError(f"the run of {model_uri} recorded no dataset path: pass the dataset")
        data_root = recorded
    data_root = Path(data_root)
    dest = Path(work_dir) / f"{tags.get('architecture', 'model')}-fp32-v{mv.version}"
    source = MlflowClient().get_model_version_download_uri(mv.name, mv.version)
    onnx_path, metadata = read_model_dir(Path(mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(dest / "model"))))
    try:
        torch_dir = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=TORCH_ARTIFACTS,
                                                        dst_path=str(dest))
    except Exception as exc:  # MlflowException / OSError: nothing logged under torch/
        raise ValueError(f"{model_uri} was registered without its torch model (no `{TORCH_ARTIFACTS}/` "
                         "artifacts in its run; versions built before `anomaly build` existed lack "
                         "it): train it again with `anomaly build`") from exc
    model = load_checkpoint(torch_dir)
    test_set = load_test_split(data_root, categories or metadata.categories)
    check_reproduces(model, OnnxModel(onnx_path, metadata), [s.path.read_bytes() for s in test_set[:4]])
    seen = fingerprint(load_train_split(data_root, categories or metadata.categories) + test_set)
    if metadata.dataset and seen != metadata.dataset:
        log.warning("%s was trained on dataset %s; %s is %s (variants are calibrated and evaluated "
                    "on the data given)", model_uri, metadata.dataset, data_root, seen)
    report = evaluate(onnx_path, metadata, test_set)
    registered = RegisteredVersion(mv.name, str(mv.version), str(mv.run_id), ())
    return BuildResult(metadata.architecture, "fp32", onnx_path, metadata, report, None, registered,
                       model=model), data_root

"""`anomaly sample-data`, `anomaly train`, `anomaly build`, `anomaly variants`: the registry
side (the `train` extra; torch is imported only when a command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from anomaly.wire import DEFAULT_MODEL_NAME
from cli.common import fail, json_object, settings, split_csv

if TYPE_CHECKING:
    from registry.pipeline import BuildResult

# Options `train`, `build` and `variants` share.
Data = Annotated[Path, typer.Option(help="dataset root in MVTec AD layout")]
Categories = Annotated[str, typer.Option(help="comma-separated subset (default: all)")]
WorkDir = Annotated[Path, typer.Option(help="where ONNX files are written")]
TrackingUri = Annotated[str | None, typer.Option(
    help="MLflow URI (default: ANOMALY_TRACKING_URI); an embedded sqlite:///DIR/mlflow.db keeps its "
         "artifacts in DIR/mlartifacts")]
ModelName = Annotated[str, typer.Option(help="registered model name")]
BatchSize = Annotated[int, typer.Option(help="batch size")]
Lr = Annotated[float, typer.Option(help="learning rate (Adam)")]
InputSize = Annotated[int, typer.Option(help="square input side (multiple of 32)")]
Backbone = Annotated[str, typer.Option(help="efficientnet_lite0 | resnet18 | wide_resnet50_2")]
BackboneWeights = Annotated[Path | None, typer.Option(
    help="torchvision/lukemelas state-dict file (required for the ResNets)")]
Seed = Annotated[int, typer.Option(help="random seed")]
Variants = Annotated[str, typer.Option(help="comma-separated: fp32, fp16, ptq-int8, qat-int8")]
Calibration = Annotated[str, typer.Option(
    help="PTQ calibration <data>-<method>: data real|random, method minmax|entropy|percentile")]
QatEpochs = Annotated[int, typer.Option(help="QAT fine-tuning epochs (0 = 3, 2 for us)")]
Options = Annotated[str, typer.Option(
    help='architecture options over the defaults, a JSON object; each architecture takes the keys '
         'it reads, a key none reads is an error (e.g. \'{"teacher": "distilled"}\' for us, '
         '\'{"level_combine": "sum"}\' for rd)')]


def _extras(architectures: list[str], options: str) -> dict[str, dict[str, object]]:
    """Each architecture's `ModelConfig.extra`: its CPU-budget defaults, then `--options`."""
    from registry.architectures import extra_for, split_options

    try:
        own = split_options(architectures, json_object(options, "--options"))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--options") from None
    return {a: extra_for(a, own[a]) for a in architectures}


def sample_data_cmd(
    out: Annotated[Path, typer.Argument(help="output folder (MVTec AD layout)")],
    seed: Seed = 0,
    n_train: Annotated[int, typer.Option(help="good training images per category")] = 40,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 256,
    family: Annotated[int, typer.Option(
        help="1: brick, coffee, grass, gravel with scratch/patch/stain; 2: coins, ihc, moon with "
             "crack/warp/smudge")] = 1,
    highres: Annotated[bool, typer.Option(
        help="write the 2048² gravel_2k category (defects of a few pixels, for tiling) instead")] = False,
    camera: Annotated[int, typer.Option(
        help="write this many 1920×1200 JPEG frames (the benchmark's camera-sized set) instead")] = 0,
) -> None:
    """Write a sample dataset generated from scikit-image's bundled photos."""
    from registry.data.sample import (
        HighResSpec,
        SampleSpec,
        make_camera_frames,
        make_highres_category,
        make_sample_dataset,
    )

    def done(category: str) -> None:
        typer.echo(f"wrote {category}")

    if camera:
        typer.echo(f"wrote {len(make_camera_frames(out, camera, seed=seed))} camera frames under {out}")
        return
    if highres:
        make_highres_category(out, HighResSpec(seed=seed), progress=done)
        return
    try:
        make_sample_dataset(out, spec=SampleSpec(image_size=size, n_train=n_train, seed=seed, family=family),
                            progress=done)
    except ValueError as exc:
        raise fail(str(exc), 2) from exc


def _open_store(tracking_uri: str | None) -> Path | None:
    """Point MLflow at the configured store; the artifact root of an embedded one."""
    from registry.mlflow_registry import use_store
    from service.logs import configure_logging

    configure_logging("INFO")
    return use_store(settings(tracking_uri=tracking_uri).tracking_uri)


def _calibration(value: str):  # noqa: ANN202 (torch-side types are imported lazily)
    from registry.variants.calibration import CalibrationAlgo, CalibrationData

    data, _, method = value.partition("-")
    try:
        return CalibrationData(data), CalibrationAlgo(method)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected <real|random>-<minmax|entropy|percentile>",
                                 param_hint="--calibration") from None


def _variants(value: str) -> tuple[str, ...]:
    from registry.pipeline import VARIANTS

    chosen = tuple(split_csv(value))
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise typer.BadParameter(f"unknown variant(s) {', '.join(unknown) or '(none)'}; choose from "
                                 f"{', '.join(VARIANTS)}", param_hint="--variants")
    return chosen


def _end_table(builds: list[BuildResult], data: Path) -> None:
    from rich.console import Console

    from studies.demo import MAX_WIDTH, comparison_tables

    console = Console(width=MAX_WIDTH)
    for table in comparison_tables(builds, None, {}, data_name=str(data)):
        console.print(table)


def build_cmd(
    data: Data,
    architectures: Annotated[str, typer.Option("--arch", help="comma-separated: stfpm, rd, us")] = "stfpm",
    variants: Variants = "fp32,fp16,ptq-int8,qat-int8",
    calibration: Calibration = "real-minmax",
    categories: Categories = "",
    epochs: Annotated[int, typer.Option(help="training epochs (0 = per architecture: 40 stfpm, "
                                              "30 rd, 20 us)")] = 0,
    qat_epochs: QatEpochs = 0,
    batch_size: BatchSize = 8,
    lr: Lr = 3e-3,
    input_size: InputSize = 256,
    backbone: Backbone = "efficientnet_lite0",
    backbone_weights: BackboneWeights = None,
    tile_image_size: Annotated[int, typer.Option(
        help="tiling for large images: the working side each image is resized to, then cut into "
             "input-size tiles (0 = no tiling: the whole image is resized to the input size)")] = 0,
    tile_stride: Annotated[int, typer.Option(
        help="pixels between tiles (0 = input size − 2 × score margin: every pixel lies inside some "
             "tile's interior)")] = 0,
    options: Options = "",
    seed: Seed = 0,
    work_dir: WorkDir = Path("runs"),
    tracking_uri: TrackingUri = None,
    model_name: ModelName = DEFAULT_MODEL_NAME,
) -> None:
    """Train each architecture on DATA and build, evaluate (through the serving engine) and
    register each variant as a version (alias `<arch>-<variant>`); the FP32 version is always
    registered, with the trained torch model, so that `anomaly variants --from` can add
    variants later. Ends with the comparison table."""
    from registry.architectures import ARCHITECTURES, DEFAULT_EPOCHS, DEFAULT_QAT_EPOCHS, ModelConfig
    from registry.data.mvtec import DatasetLayoutError
    from registry.pipeline import build_architecture
    from registry.train import TrainConfig
    from registry.variants.qat import QATConfig

    archs = split_csv(architectures)
    if not archs or any(a not in ARCHITECTURES for a in archs):
        raise typer.BadParameter(f"choose from {', '.join(ARCHITECTURES)}", param_hint="--arch")
    if input_size % 32:
        raise typer.BadParameter("must be a multiple of 32", param_hint="--input-size")
    chosen, calib = _variants(variants), _calibration(calibration)
    extras = _extras(archs, options)
    tiling = None
    if tile_image_size:
        from service.runtime.tiling import Tiling

        if tile_image_size < input_size or not 0 <= tile_stride <= input_size:
            raise typer.BadParameter(f"the working size must be at least the input size ({input_size}) and "
                                     "the stride at most the input size", param_hint="--tile-image-size")
        margin = round(input_size * ModelConfig().score_margin_fraction)
        tiling = Tiling(image_height=tile_image_size, image_width=tile_image_size,
                        stride=tile_stride or Tiling.full_coverage_stride(input_size, margin))
    artifact_root = _open_store(tracking_uri)
    steps = len(archs) * len(set(chosen) | {"fp32"})
    done: list[BuildResult] = []

    def report(build: BuildResult) -> None:
        done.append(build)
        typer.echo(f"[{len(done)}/{steps}] {build.label}: image AUROC {build.report.image_auroc:.3f}, "
                   f"{build.report.latency_ms_p50:.1f} ms/image → "
                   f"{build.registered.uri if build.registered else '-'}", err=True)

    try:
        for arch in archs:
            build_architecture(
                data, work_dir, architecture=arch, variants=chosen,
                model_config=ModelConfig(
                    input_size=(input_size, input_size), backbone=backbone,
                    backbone_weights=str(backbone_weights) if backbone_weights else None,
                    extra=extras[arch]),
                train_config=TrainConfig(epochs=epochs or DEFAULT_EPOCHS[arch], batch_size=batch_size, lr=lr,
                                         seed=seed),
                qat_config=QATConfig(epochs=qat_epochs or DEFAULT_QAT_EPOCHS.get(arch, 3), seed=seed),
                calibration=calib, categories=split_csv(categories) or None, model_name=model_name,
                artifact_root=artifact_root, on_build=report, tiling=tiling)
    except (DatasetLayoutError, ValueError) as exc:
        raise fail(str(exc), 2) from exc
    _end_table(done, data)


def variants_cmd(
    source: Annotated[str, typer.Option("--from", help="a registered FP32 version: models:/<name>/<N> "
                                                       "or models:/<name>@<alias>")],
    data: Annotated[Path | None, typer.Option(
        help="the dataset it was trained on (default: the path its run recorded)")] = None,
    variants: Variants = "fp16,ptq-int8,qat-int8",
    calibration: Calibration = "real-minmax",
    qat_epochs: QatEpochs = 0,
    seed: Seed = 0,
    work_dir: WorkDir = Path("runs"),
    tracking_uri: TrackingUri = None,
) -> None:
    """Build, evaluate and register variants of a registered FP32 version (from the torch
    model logged with it), each a new version of the same registered model."""
    from mlflow.exceptions import MlflowException

    from registry.architectures import DEFAULT_QAT_EPOCHS
    from registry.data.mvtec import DatasetLayoutError
    from registry.pipeline import build_variants, fp32_from_registry
    from registry.variants.qat import QATConfig

    chosen = tuple(v for v in _variants(variants) if v != "fp32")
    calib = _calibration(calibration)
    artifact_root = _open_store(tracking_uri)
    try:
        fp32, data = fp32_from_registry(source, data, work_dir)
        arch = fp32.architecture
        builds = build_variants(
            fp32, data, work_dir, variants=chosen, calibration=calib,
            qat_config=QATConfig(epochs=qat_epochs or DEFAULT_QAT_EPOCHS.get(arch, 3), seed=seed),
            categories=fp32.metadata.categories,
            model_name=fp32.registered.name if fp32.registered else DEFAULT_MODEL_NAME,
            artifact_root=artifact_root)
    except (DatasetLayoutError, ValueError, MlflowException) as exc:
        raise fail(str(exc), 2) from exc
    _end_table([fp32, *builds], data)


def train_cmd(
    data: Data,
    architecture: Annotated[str, typer.Option("--arch", help="architecture")] = "stfpm",
    categories: Categories = "",
    epochs: Annotated[int, typer.Option(help="training epochs")] = 20,
    batch_size: BatchSize = 8,
    lr: Lr = 3e-3,
    input_size: InputSize = 256,
    backbone: Backbone = "efficientnet_lite0",
    backbone_weights: BackboneWeights = None,
    options: Options = "",
    seed: Seed = 0,
    work_dir: WorkDir = Path("runs"),
    tracking_uri: TrackingUri = None,
    model_name: ModelName = DEFAULT_MODEL_NAME,
    alias: Annotated[list[str] | None, typer.Option(help="extra alias(es) for the new version")] = None,
) -> None:
    """Train one unified model, export, evaluate through the engine, register its FP32
    version in MLflow (with the torch model; `anomaly build` adds the other variants)."""
    from registry.architectures import ARCHITECTURES, ModelConfig
    from registry.data.mvtec import DatasetLayoutError
    from registry.pipeline import build_variant_fp32
    from registry.train import TrainConfig

    if architecture not in ARCHITECTURES:
        raise typer.BadParameter(f"choose from {', '.join(ARCHITECTURES)}", param_hint="--arch")
    if input_size % 32:
        raise typer.BadParameter("must be a multiple of 32", param_hint="--input-size")
    extra = _extras([architecture], options)[architecture]
    artifact_root = _open_store(tracking_uri)
    try:
        result = build_variant_fp32(
            data, work_dir, architecture=architecture,
            model_config=ModelConfig(input_size=(input_size, input_size), backbone=backbone,
                                     backbone_weights=str(backbone_weights) if backbone_weights else None,
                                     extra=extra),
            train_config=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
            categories=split_csv(categories) or None, model_name=model_name, aliases=tuple(alias or ()),
            artifact_root=artifact_root)
    except (DatasetLayoutError, ValueError) as exc:
        raise fail(str(exc), 2) from exc
    reg = result.registered
    typer.echo(f"image AUROC {result.report.image_auroc:.3f}  pixel AUROC "
               f"{result.report.pixel_auroc:.3f}  registered {reg.uri if reg else '-'} "
               f"aliases {', '.join(reg.aliases) if reg else '-'}")


COMMANDS = {"sample-data": sample_data_cmd, "train": train_cmd, "build": build_cmd, "variants": variants_cmd}

"""`anomaly sample-data`, `anomaly train`: the registry side (the `train` extra; torch is
imported only when a command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anomaly.wire import DEFAULT_MODEL_NAME
from cli.common import fail, settings, split_csv


def sample_data_cmd(
    out: Annotated[Path, typer.Argument(help="output folder (MVTec AD layout)")],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    n_train: Annotated[int, typer.Option(help="good training images per category")] = 40,
    size: Annotated[int, typer.Option(help="image side in pixels")] = 256,
) -> None:
    """Write the sample dataset generated from scikit-image's bundled photos."""
    from registry.data.sample import SampleSpec, make_sample_dataset

    make_sample_dataset(out, spec=SampleSpec(image_size=size, n_train=n_train, seed=seed),
                        progress=lambda c: typer.echo(f"wrote {c}"))


def train_cmd(
    data: Annotated[Path, typer.Option(help="dataset root in MVTec AD layout")],
    architecture: Annotated[str, typer.Option("--arch", help="architecture")] = "stfpm",
    categories: Annotated[str, typer.Option(help="comma-separated subset (default: all)")] = "",
    epochs: Annotated[int, typer.Option(help="training epochs")] = 20,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 8,
    lr: Annotated[float, typer.Option(help="learning rate (Adam)")] = 3e-3,
    input_size: Annotated[int, typer.Option(help="square input side (multiple of 32)")] = 256,
    backbone: Annotated[str, typer.Option(help="efficientnet_lite0 | resnet18 | wide_resnet50_2")]
    = "efficientnet_lite0",
    backbone_weights: Annotated[Path | None, typer.Option(
        help="torchvision/lukemelas state-dict file (required for the ResNets)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    work_dir: Annotated[Path, typer.Option(help="where ONNX files are written")] = Path("runs"),
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow URI (default: ANOMALY_TRACKING_URI)")
                            ] = None,
    model_name: Annotated[str, typer.Option(help="registered model name")] = DEFAULT_MODEL_NAME,
    alias: Annotated[list[str] | None, typer.Option(help="extra alias(es) for the new version")] = None,
) -> None:
    """Train one unified model, export, evaluate through the engine, register in MLflow."""
    import mlflow

    from registry.architectures import ModelConfig
    from registry.data.mvtec import DatasetLayoutError
    from registry.mlflow_registry import local_artifact_root
    from registry.pipeline import build_variant_fp32
    from registry.train import TrainConfig
    from service.logs import configure_logging

    configure_logging("INFO")
    if input_size % 32:
        raise typer.BadParameter("must be a multiple of 32", param_hint="--input-size")
    uri = settings(tracking_uri=tracking_uri).tracking_uri
    mlflow.set_tracking_uri(uri)
    try:
        result = build_variant_fp32(
            data, work_dir, architecture=architecture,
            model_config=ModelConfig(input_size=(input_size, input_size), backbone=backbone,
                                     backbone_weights=str(backbone_weights) if backbone_weights else None),
            train_config=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
            categories=split_csv(categories) or None, model_name=model_name, aliases=tuple(alias or ()),
            artifact_root=local_artifact_root(uri))
    except (DatasetLayoutError, ValueError) as exc:
        raise fail(str(exc), 2) from exc
    reg = result.registered
    typer.echo(f"image AUROC {result.report.image_auroc:.3f}  pixel AUROC "
               f"{result.report.pixel_auroc:.3f}  registered {reg.uri if reg else '-'} "
               f"aliases {', '.join(reg.aliases) if reg else '-'}")


COMMANDS = {"sample-data": sample_data_cmd, "train": train_cmd}

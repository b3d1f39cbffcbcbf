"""`anomaly sample-data`, `anomaly train`, `anomaly demo`: the registry side (needs the
`train` extra; torch is imported only when a command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Training, export, evaluation and registration.")


@app.command("sample-data")
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


@app.command("train")
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
    tracking_uri: Annotated[str, typer.Option(help="MLflow URI (default: embedded SQLite in .demo)")] = "",
    model_name: Annotated[str, typer.Option(help="registered model name")] = "anomaly-detector",
    alias: Annotated[list[str] | None, typer.Option(help="extra alias(es) for the new version")] = None,
) -> None:
    """Train one unified model, export, evaluate through the engine, register in MLflow."""
    import mlflow

    from registry.architectures import ModelConfig
    from registry.data.mvtec import DatasetLayoutError
    from registry.mlflow_registry import embedded_tracking_uri
    from registry.pipeline import build_variant_fp32
    from registry.train import TrainConfig
    from service.logs import configure_logging

    configure_logging("INFO")
    if input_size % 32:
        raise typer.BadParameter("must be a multiple of 32", param_hint="--input-size")
    uri = tracking_uri or embedded_tracking_uri(Path(".demo"))
    mlflow.set_tracking_uri(uri)
    try:
        result = build_variant_fp32(
            data, work_dir, architecture=architecture,
            model_config=ModelConfig(input_size=(input_size, input_size), backbone=backbone,
                                     backbone_weights=str(backbone_weights) if backbone_weights else None),
            train_config=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed),
            categories=[c for c in categories.split(",") if c] or None,
            model_name=model_name, aliases=tuple(alias or ()),
            artifact_root=Path(".demo/mlartifacts") if not tracking_uri else None,
        )
    except (DatasetLayoutError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    reg = result.registered
    typer.echo(f"image AUROC {result.report.image_auroc:.3f}  pixel AUROC "
               f"{result.report.pixel_auroc:.3f}  registered {reg.uri if reg else '-'} "
               f"aliases {', '.join(reg.aliases) if reg else '-'}")


@app.command("compare")
def compare_cmd(
    data: Annotated[Path, typer.Option(help="dataset root in MVTec AD layout")] = Path(".demo/data"),
    architectures: Annotated[str, typer.Option("--arch", help="comma-separated")] = "stfpm,rd,us",
    categories: Annotated[str, typer.Option(help="comma-separated subset (default: all)")] = "",
    epochs: Annotated[int, typer.Option(help="epochs for every model (0 = per-architecture defaults)")] = 0,
    input_size: Annotated[int, typer.Option(help="square input side")] = 256,
    out: Annotated[Path, typer.Option(help="Markdown report to (re)write")] = Path("docs/results.md"),
    work_dir: Annotated[Path, typer.Option(help="where ONNX files are written")] = Path("runs/compare"),
    tracking_uri: Annotated[str, typer.Option(help="MLflow URI (default: embedded SQLite in .demo)")] = "",
) -> None:
    """Unified vs one-class for each architecture → MLflow metrics + docs/results.md."""
    import shlex
    import sys

    import mlflow

    from registry.architectures import ModelConfig
    from registry.compare import run_and_write
    from registry.mlflow_registry import embedded_tracking_uri
    from registry.train import TrainConfig
    from service.logs import configure_logging

    configure_logging("INFO")
    mlflow.set_tracking_uri(tracking_uri or embedded_tracking_uri(Path(".demo")))
    rows = run_and_write(
        data, work_dir, out, [a for a in architectures.split(",") if a],
        ModelConfig(input_size=(input_size, input_size)), TrainConfig(epochs=epochs),
        command="anomaly " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        categories=[c for c in categories.split(",") if c] or None)
    for r in rows:
        typer.echo(f"{r.architecture:6s} {r.setup:9s} models={r.n_models} image AUROC "
                   f"{r.mean('image_auroc'):.3f} pixel AUROC {r.mean('pixel_auroc'):.3f} "
                   f"AUPRO {r.mean('aupro'):.3f}")
    typer.echo(f"wrote {out}")


@app.command("quant-study")
def quant_study_cmd(
    home: Annotated[Path, typer.Option(help="the demo folder (data + MLflow store)")] = Path(".demo"),
    architectures: Annotated[str, typer.Option("--arch", help="comma-separated")] = "stfpm,rd,us",
    images: Annotated[int, typer.Option(help="calibration images per source")] = 64,
    out: Annotated[Path, typer.Option(help="Markdown report to update")] = Path("docs/results.md"),
    tracking_uri: Annotated[str, typer.Option(help="MLflow URI (default: embedded SQLite in --home)")] = "",
) -> None:
    """Variants table + PTQ calibration study (data × method) + AUROC-vs-latency plot."""
    import shlex
    import sys

    import mlflow

    from registry.mlflow_registry import embedded_tracking_uri
    from registry.quant_study import run_and_write
    from service.logs import configure_logging

    configure_logging("INFO")
    mlflow.set_tracking_uri(tracking_uri or embedded_tracking_uri(home))
    try:
        variants, calib, speed = run_and_write(home, out, [a for a in architectures.split(",") if a],
                                        command="anomaly " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
                                        n_images=images)
    except LookupError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc
    for c in calib:
        typer.echo(f"{c.architecture:6s} {c.data:7s} {c.method:10s} image AUROC {c.image_auroc:.3f} "
                   f"pixel AUROC {c.pixel_auroc:.3f}")
    for r in speed:
        typer.echo(f"{r.architecture:6s} {r.variant:9s} {r.images_per_s_b1:7.1f} img/s (b=1) "
                   f"{r.images_per_s_b8:7.1f} img/s (b=8)")
    typer.echo(f"wrote {out} and {out.parent / 'variants.png'} ({len(variants)} variants)")


@app.command("demo")
def demo_cmd(
    home: Annotated[Path, typer.Option(help="folder for data, MLflow store, logs")] = Path(".demo"),
    architectures: Annotated[str, typer.Option("--arch", help="comma-separated")] = "stfpm,rd,us",
    epochs: Annotated[int, typer.Option(help="epochs for every architecture (0 = demo defaults)")] = 0,
    input_size: Annotated[int, typer.Option(help="square input side")] = 256,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    variants: Annotated[str, typer.Option(
        help="comma-separated variants besides fp32 (fp16, ptq-int8, qat-int8; empty = none)")]
    = "fp16,ptq-int8,qat-int8",
    qat_epochs: Annotated[int, typer.Option(help="QAT fine-tuning epochs (0 = demo defaults)")] = 0,
    rss: Annotated[bool, typer.Option(help="measure each version's peak memory in a server process")]
    = True,
) -> None:
    """The main job end to end: data → train → variants → register → serve → score → table."""
    from registry.demo import DemoConfig, run_demo
    from registry.variants import VARIANTS
    from service.logs import configure_logging

    chosen = tuple(v for v in variants.split(",") if v)
    unknown = [v for v in chosen if v not in VARIANTS or v == "fp32"]
    if unknown:
        raise typer.BadParameter(f"unknown variant(s) {unknown}; choose from {list(VARIANTS[1:])}",
                                 param_hint="--variants")
    configure_logging("WARNING")
    run_demo(DemoConfig(home=home, architectures=tuple(a for a in architectures.split(",") if a),
                        epochs=epochs, input_size=input_size, seed=seed, variants=chosen,
                        qat_epochs=qat_epochs, measure_rss=rss))

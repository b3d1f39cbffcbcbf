"""`anomaly demo`, `anomaly compare`, `anomaly quant-study`, `anomaly int8-study` …: the studies
behind this repository's results (the `train` extra). Their defaults are this repository's folders:
`.demo/` for data and the MLflow store, `docs/` for the reports."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import command_line, fail, json_object, split_csv


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
    from registry.architectures import ModelConfig
    from registry.mlflow_registry import embedded_tracking_uri, use_store
    from registry.train import TrainConfig
    from service.logs import configure_logging
    from studies.compare import run_and_write

    configure_logging("INFO")
    use_store(tracking_uri or embedded_tracking_uri(Path(".demo")))
    rows = run_and_write(
        data, work_dir, out, split_csv(architectures), ModelConfig(input_size=(input_size, input_size)),
        TrainConfig(epochs=epochs), command=command_line(), categories=split_csv(categories) or None)
    for r in rows:
        typer.echo(f"{r.architecture:6s} {r.setup:9s} models={r.n_models} image AUROC "
                   f"{r.mean('image_auroc'):.3f} pixel AUROC {r.mean('pixel_auroc'):.3f} "
                   f"AUPRO {r.mean('aupro'):.3f}")
    typer.echo(f"wrote {out}")


def quant_study_cmd(
    home: Annotated[Path, typer.Option(help="the demo folder (data + MLflow store)")] = Path(".demo"),
    architectures: Annotated[str, typer.Option("--arch", help="comma-separated")] = "stfpm,rd,us",
    images: Annotated[int, typer.Option(help="calibration images per source")] = 64,
    out: Annotated[Path, typer.Option(help="Markdown report to update")] = Path("docs/results.md"),
    tracking_uri: Annotated[str, typer.Option(help="MLflow URI (default: embedded SQLite in --home)")] = "",
) -> None:
    """Variants table + PTQ calibration study (data × method) + AUROC-vs-latency plot."""
    from registry.mlflow_registry import embedded_tracking_uri, use_store
    from service.logs import configure_logging
    from studies.quant_study import run_and_write

    configure_logging("INFO")
    use_store(tracking_uri or embedded_tracking_uri(home))
    try:
        variants, calib, speed = run_and_write(home, out, split_csv(architectures), command=command_line(),
                                               n_images=images)
    except LookupError as exc:
        raise fail(str(exc), 2) from exc
    for c in calib:
        typer.echo(f"{c.architecture:6s} {c.data:7s} {c.method:10s} image AUROC {c.image_auroc:.3f} "
                   f"pixel AUROC {c.pixel_auroc:.3f}")
    for r in speed:
        typer.echo(f"{r.architecture:6s} {r.variant:9s} {r.images_per_s_b1:7.1f} img/s (b=1) "
                   f"{r.images_per_s_b8:7.1f} img/s (b=8)")
    typer.echo(f"wrote {out} and {out.parent / 'variants.png'} ({len(variants)} variants)")


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
    first_look: Annotated[bool, typer.Option(help="serve the first registered build at once and score a "
                                                  "good and a defective part (prints the time to it)")]
    = True,
) -> None:
    """The main job end to end: data → train → variants → register → serve → score → table.
    The first architecture's FP32 build is served and scored as soon as it is registered."""
    from registry.variants import VARIANTS
    from service.logs import configure_logging
    from studies.demo import DemoConfig, run_demo

    chosen = tuple(split_csv(variants))
    unknown = [v for v in chosen if v not in VARIANTS or v == "fp32"]
    if unknown:
        raise typer.BadParameter(f"unknown variant(s) {unknown}; choose from {list(VARIANTS[1:])}",
                                 param_hint="--variants")
    configure_logging("WARNING")
    run_demo(DemoConfig(home=home, architectures=tuple(split_csv(architectures)),
                        epochs=epochs, input_size=input_size, seed=seed, variants=chosen,
                        qat_epochs=qat_epochs, measure_rss=rss, first_look=first_look))


def families_study_cmd(
    home: Annotated[Path, typer.Option(help="where data, models and the row cache live")] = Path(".demo"),
    architectures: Annotated[str, typer.Option("--arch", help="comma-separated")] = "stfpm,rd,us",
    families: Annotated[str, typer.Option(help="comma-separated sample families (1, 2)")] = "1,2",
    extra: Annotated[str, typer.Option(
        "--options", "--extra",
        help='architecture options over the defaults, JSON (an ablation, e.g. \'{"compactness": 0}\')')] = "",
    out: Annotated[Path, typer.Option(help="Markdown report to update")] = Path("docs/results.md"),
) -> None:
    """Each architecture trained on both sample families (differently made defects) →
    the `Two defect families` section of the report."""
    from service.logs import configure_logging
    from studies.robustness import families as run

    configure_logging("INFO")
    try:
        fams = [int(f) for f in split_csv(families)]
        rows = run(home, out, split_csv(architectures), fams, command_line(), json_object(extra, "--options"))
    except ValueError as exc:
        raise fail(str(exc), 2) from exc
    for r in rows:
        typer.echo(f"{r.architecture:6s} {r.setup:9s} image AUROC {r.image_auroc:.3f} pixel AUROC "
                   f"{r.pixel_auroc:.3f} AUPRO {r.aupro:.3f}")
    typer.echo(f"wrote {out}")


def tiling_study_cmd(
    home: Annotated[Path, typer.Option(help="where data and models live")] = Path(".demo"),
    architecture: Annotated[str, typer.Option("--arch", help="architecture")] = "stfpm",
    epochs: Annotated[int, typer.Option(help="training epochs (both setups)")] = 30,
    working_size: Annotated[int, typer.Option(help="working side of the tiled setup")] = 1024,
    stride: Annotated[int, typer.Option(help="tile stride (0 = full coverage: 240 for 256² tiles; "
                                             "256 = no overlap)")] = 0,
    out: Annotated[Path, typer.Option(help="Markdown report to update")] = Path("docs/results.md"),
) -> None:
    """The 2048² high-resolution category resized vs tiled → the report's tiling section."""
    from service.logs import configure_logging
    from studies.robustness import tiling

    configure_logging("INFO")
    for r in tiling(home, out, architecture, epochs, working_size, stride, command_line()):
        typer.echo(f"{r.setup}: image AUROC {r.image_auroc:.3f} pixel AUROC {r.pixel_auroc:.3f} "
                   f"{r.ms_per_image:.1f} ms/image")
    typer.echo(f"wrote {out}")


def int8_study_cmd(
    data: Annotated[Path, typer.Option(help="dataset root in MVTec AD layout")] = Path(".demo/data"),
    architectures: Annotated[str, typer.Option("--arch", help="comma-separated")] = "stfpm,rd,us",
    tracking_uri: Annotated[str, typer.Option(
        help="MLflow URI (default: the embedded SQLite store beside --data, e.g. .demo)")] = "",
    emulate: Annotated[bool, typer.Option(
        help="also evaluate under `qemu-x86_64 -cpu Haswell` (AVX2, no VNNI)")] = True,
    images: Annotated[int, typer.Option(
        help="test images of the emulated comparison (a fixed subset; 0 = all)")] = 32,
    probe: Annotated[int, typer.Option(
        help="images FP32 and s8s8 are emulated on (tens of seconds each under TCG; 0 = none)")] = 1,
    doc: Annotated[Path, typer.Option(help="Markdown report to update")] = Path("docs/results.md"),
) -> None:
    """INT8 weight schemes (u8s8-rr, u8s8, u8u8, s8s8) per CPU: accuracy natively and on an
    emulated AVX2 CPU without VNNI, native speed, and the registered INT8 versions."""
    from rich.console import Console

    from registry.mlflow_registry import embedded_tracking_uri, use_store
    from service.logs import configure_logging
    from studies.int8_cpus import PROBE_SCHEMES, run_and_write

    configure_logging("WARNING")
    use_store(tracking_uri or embedded_tracking_uri(data.resolve().parent))
    console = Console(stderr=True)
    with console.status("INT8 study …") as status:
        def progress(message: str) -> None:
            console.log(message)
            status.update(f"INT8 study: {message}")

        try:
            result = run_and_write(data, doc, split_csv(architectures), command_line(), emulate=emulate,
                                   n_images=images, probe=probe, progress=progress)
        except LookupError as exc:
            raise fail(str(exc), 2) from exc
    typer.echo(f"native:   {result.cpus.native}\nemulated: {result.cpus.emulated or 'not measured'}")
    for c in result.checks:
        typer.echo(f"conv check {c.scheme:8s} native vs emulated {c.native_vs_emulated:.3f} % of range")
    for r in result.schemes:
        emulated = ("not measured" if r.emulated is None else f"{r.emulated.image_auroc:.3f}"
                    if r.scheme not in PROBE_SCHEMES else f"probe (score change {r.score_shift:.2f} %)")
        typer.echo(f"{r.architecture:6s} {r.scheme:8s} image AUROC native {r.native.image_auroc:.3f} "
                   f"emulated {emulated} ({r.native.images} images); {r.latency_ms_p50:6.2f} ms/image")
    for g in result.registered:
        emulated = f"{g.emulated.image_auroc:.3f}" if g.emulated else "not measured"
        typer.echo(f"{g.architecture:6s} {g.variant:8s} v{g.version} image AUROC native "
                   f"{g.native.image_auroc:.3f} emulated {emulated}")
    typer.echo(f"wrote {doc} in {result.seconds / 60:.1f} min")


COMMANDS = {"demo": demo_cmd, "compare": compare_cmd, "quant-study": quant_study_cmd,
            "families-study": families_study_cmd, "tiling-study": tiling_study_cmd,
            "int8-study": int8_study_cmd}

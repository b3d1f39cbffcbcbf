"""`anomaly bench`, `anomaly providers-check`, `anomaly soak`: measure a registered model
version served for real (the `serve` extra; `loadtests/` does the work).

Each prints its results; `--out FILE` also writes the Markdown table between its markers
in FILE, keeping whatever was written around it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from anomaly.wire import DEFAULT_MODEL_NAME
from cli.common import command_line, echo_err, fail, settings, split_csv

TrackingUri = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: ANOMALY_TRACKING_URI)")]
Model = Annotated[str, typer.Option(help="registered model")]
Images = Annotated[Path, typer.Option(help="folder of images, e.g. an MVTec-layout dataset")]


def bench_cmd(
    images: Images,
    tracking_uri: TrackingUri = None,
    model: Model = DEFAULT_MODEL_NAME,
    alias: Annotated[str, typer.Option(help="alias to benchmark")] = "champion",
    seconds: Annotated[float, typer.Option(help="seconds per path, mode and round")] = 5.0,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (ratios are their median)")] = 3,
    concurrency: Annotated[int, typer.Option(help="concurrent clients at saturation")] = 8,
    peers: Annotated[str, typer.Option(help="peers to measure too: mlflow,kserve,mlserver (empty = none)")
                     ] = "",
    camera_images: Annotated[Path | None, typer.Option(
        help="second image set (e.g. `anomaly sample-data DIR --camera 16`) for the paths that decode")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Markdown report (table between bench markers) "
                                                  "and a chart beside it")] = None,
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers for bare ORT and the servers, "
                                                "comma-separated (empty = CPU)")] = "",
    max_batch_size: Annotated[int, typer.Option(min=2, help="largest batch of the batching-on server")] = 8,
) -> None:
    """Serving benchmark: bare ONNX Runtime vs our servers and peers, in one run.

    Bare ORT vs the gRPC server (batching off/on, PNG/raw, ScoreStream, V2 ModelInfer) vs the
    HTTP gateway (and peers), measured in interleaved rounds."""
    from loadtests.bench import run_benchmark

    config = settings(tracking_uri=tracking_uri)
    try:
        results = run_benchmark(
            config.tracking_uri, model, alias, images, seconds=seconds, rounds=rounds,
            concurrency=concurrency, peers=tuple(split_csv(peers)), out=out, command=command_line(),
            progress=echo_err, providers=tuple(split_csv(providers)), max_batch_size=max_batch_size,
            camera_dir=camera_images)
    except ValueError as exc:
        raise fail(str(exc)) from exc
    for r in results:
        typer.echo(f"{r.name:48s} {r.mode:16s} {r.images_per_s:8.1f} img/s  p50 {r.p50_ms:7.1f} ms  "
                   f"p99 {r.p99_ms:7.1f} ms  ÷ bare ORT {r.ratio:5.2f}  server {r.server_ms_per_image:5.1f} "
                   "CPU ms/img")
    if out is not None:
        typer.echo(f"wrote {out}")


def providers_check_cmd(
    images: Images,
    tracking_uri: TrackingUri = None,
    model: Model = DEFAULT_MODEL_NAME,
    providers: Annotated[str, typer.Option(
        help="ONNX Runtime providers to check, comma-separated, in order of preference")
    ] = "TensorrtExecutionProvider,CUDAExecutionProvider",
    versions: Annotated[str, typer.Option(help="versions to check, comma-separated (empty = all)")] = "",
    batch: Annotated[int, typer.Option(min=1, help="batch size for throughput and the score comparison")
                     ] = 8,
    seconds: Annotated[float, typer.Option(help="seconds per version and provider")] = 4.0,
    trt_cache_dir: Annotated[Path | None, typer.Option(help="TensorRT engine cache folder")] = None,
    out: Annotated[Path | None, typer.Option(help="Markdown report (table between providers markers)")
                   ] = None,
) -> None:
    """Compare each registered version on CPU and on CUDA/TensorRT.

    Loads every version through the serving path on the CPU provider and on the requested
    ones; compares speed, scores and OK/NG decisions."""
    from loadtests.providers import BEGIN, END, check_providers, render
    from loadtests.report import machine_line, write_report

    config = settings(tracking_uri=tracking_uri)
    try:
        rows = check_providers(config.tracking_uri, model, images, split_csv(providers),
                               versions=split_csv(versions) or None, batch=batch, seconds=seconds,
                               trt_cache_dir=trt_cache_dir, progress=echo_err)
    except (ValueError, FileNotFoundError) as exc:
        raise fail(str(exc)) from exc
    table = render(rows, batch=batch, command=command_line(), machine=machine_line(rows[0].accel.provider))
    for r in rows:
        flag = " (fell back)" if r.fell_back else ""
        typer.echo(f"v{r.version:4s} {r.variant:18s} {r.accel.provider}{flag}: p50 {r.accel.p50_ms:.2f} ms "
                   f"(CPU {r.cpu.p50_ms:.2f}), {r.accel.images_per_s:.0f} img/s (CPU "
                   f"{r.cpu.images_per_s:.0f}), max |Δscore| {r.max_score_diff:.2g}, "
                   f"{r.decisions_changed} decisions changed")
    if out is None:
        typer.echo(table)
        return
    write_report(out, table, markers=(BEGIN, END), heading="# Execution providers\n\nProduced by "
                 "`anomaly providers-check`.")
    typer.echo(f"wrote {out}")


def soak_cmd(
    images: Annotated[Path, typer.Option(help="MVTec-layout folder (its test split is the load)")],
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store of the model under test "
                                                          "(default: ANOMALY_TRACKING_URI)")] = None,
    model: Annotated[str, typer.Option(help="registered model under test")] = DEFAULT_MODEL_NAME,
    alias: Annotated[str, typer.Option(help="its alias (the version copied into the sandbox)")] = "champion",
    minutes: Annotated[float, typer.Option(min=0.2, help="how long to drive load and faults")] = 10.0,
    work: Annotated[Path | None, typer.Option(help="sandbox folder (default: a new temporary one)")] = None,
    out: Annotated[Path | None, typer.Option(help="Markdown report (table between soak markers)")] = None,
    hotfolder: Annotated[bool, typer.Option(help="soak the MES hot folder instead: poison files, reused "
                                                 "names, a slow writer, server SIGKILLs, database outages")
                         ] = False,
    count: Annotated[int, typer.Option(min=1, help="--hotfolder: good images to drop")] = 2000,
) -> None:
    """Fault-injection soak of a real server and gateway (or the MES hot folder).

    Good and hostile load while alias moves to broken versions, registry and database
    outages and SIGKILLs are injected; prints what was lost, passed wrongly or crashed
    (exit 1 if anything was). With --hotfolder, the same for the MES hot folder."""
    from loadtests import soak
    from loadtests.report import machine_line, write_report

    config = settings(tracking_uri=tracking_uri)
    folder = work or Path(tempfile.mkdtemp(prefix="anomaly-soak-"))
    try:
        if hotfolder:
            result = soak.run_hotfolder_soak(config.tracking_uri, model, alias, images, minutes, folder,
                                             count=count, progress=echo_err)
        else:
            result = soak.run_soak(config.tracking_uri, model, alias, images, minutes, folder,
                                   progress=echo_err)
    except (ValueError, RuntimeError) as exc:
        raise fail(str(exc)) from exc
    machine = f"{machine_line('CPUExecutionProvider')} Sandbox: {folder}."
    render = soak.render_hotfolder if hotfolder else soak.render
    report = render(result, command_line(), machine)  # type: ignore[arg-type]
    typer.echo(report)
    if out is not None:
        markers = (soak.HOT_BEGIN, soak.HOT_END) if hotfolder else (soak.BEGIN, soak.END)
        write_report(out, report, markers=markers, heading="# Reliability\n\nProduced by `anomaly soak`.")
        typer.echo(f"wrote {out}")
    if result.failures():
        raise typer.Exit(1)


COMMANDS = {"bench": bench_cmd, "providers-check": providers_check_cmd, "soak": soak_cmd}

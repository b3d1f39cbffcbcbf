"""`anomaly serve` and `anomaly gateway`: run the gRPC server or the HTTP gateway.

Options override the `ANOMALY_*` environment variables (see `service.settings`).
Run as `python -m service.cli serve …` too; nothing here imports torch.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from service.settings import Settings

app = typer.Typer(help="Inference server and HTTP gateway.", no_args_is_help=True)


def _settings(**overrides: object) -> Settings:
    """Settings from the environment and the given options; an inconsistent configuration
    (e.g. TLS half set up) is a one-line error, exit code 2."""
    from pydantic import ValidationError

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"])
            typer.secho(f"error: invalid settings{f' ({where})' if where else ''}: "
                        f"{error['msg'].removeprefix('Value error, ')}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.command("serve")
def serve_cmd(
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    model: Annotated[str | None, typer.Option(help="registered model to serve")] = None,
    alias: Annotated[str | None, typer.Option(help="alias to serve, e.g. champion")] = None,
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="model download cache")] = None,
    log_level: Annotated[str | None, typer.Option(help="logging level")] = None,
) -> None:
    """Run the gRPC inference server (serves `models:/<model>@<alias>`)."""
    from service.errors import ServiceError
    from service.grpc_server import serve
    from service.logs import configure_logging

    settings = _settings(tracking_uri=tracking_uri, model_name=model, model_alias=alias,
                         grpc_host=host, grpc_port=port, cache_dir=cache_dir, log_level=log_level)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except ServiceError as exc:
        typer.secho(f"error: cannot serve {settings.model_name}@{settings.model_alias} from "
                    f"{settings.tracking_uri}: {exc.message}", fg="red", err=True)
        raise typer.Exit(1) from exc
    except (RuntimeError, OSError) as exc:  # e.g. a port or spool folder in use, a TLS file missing
        typer.secho(f"error: cannot start the server: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc


@app.command("gateway")
def gateway_cmd(
    grpc_target: Annotated[str | None, typer.Option(help="gRPC server address")] = None,
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port")] = None,
    log_level: Annotated[str | None, typer.Option(help="logging level")] = None,
) -> None:
    """Run the HTTP gateway in front of a gRPC server."""
    import uvicorn

    from service.gateway import create_app
    from service.logs import configure_logging

    settings = _settings(grpc_target=grpc_target, http_host=host, http_port=port,
                         log_level=log_level)
    configure_logging(settings.log_level, settings.log_format)
    tls = {"ssl_certfile": str(settings.https_cert_file), "ssl_keyfile": str(settings.https_key_file)} \
        if settings.https_cert_file else {}
    uvicorn.run(create_app(settings), host=settings.http_host, port=settings.http_port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=int(settings.grace_s), **tls)


@app.command("bench")
def bench_cmd(
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    model: Annotated[str, typer.Option(help="registered model")] = "anomaly-detector",
    alias: Annotated[str, typer.Option(help="alias to benchmark")] = "champion",
    images: Annotated[Path, typer.Option(help="folder of PNG images")] = Path(".demo/data"),
    seconds: Annotated[float, typer.Option(help="seconds per path, mode and round")] = 5.0,
    rounds: Annotated[int, typer.Option(help="interleaved rounds (ratios are their median)")] = 3,
    concurrency: Annotated[int, typer.Option(help="concurrent clients at saturation")] = 8,
    peers: Annotated[str, typer.Option(help="peers to measure too: mlflow,kserve (empty = none)")] = "",
    out: Annotated[Path, typer.Option(help="Markdown report (table between bench markers)")] = Path(
        "docs/benchmarks.md"),
    providers: Annotated[str, typer.Option(help="ONNX Runtime providers for bare ORT and the servers, "
                                                "comma-separated (empty = CPU)")] = "",
    max_batch_size: Annotated[int, typer.Option(min=2, help="largest batch of the batching-on server")] = 8,
) -> None:
    """Bare ONNX Runtime vs the gRPC server (batching off/on, PNG/raw) vs the HTTP gateway
    (and peers), interleaved rounds in one run."""
    import shlex
    import sys

    from loadtests.bench import run_benchmark

    settings = _settings(tracking_uri=tracking_uri)
    results = run_benchmark(
        settings.tracking_uri, model, alias, images, seconds=seconds, rounds=rounds,
        concurrency=concurrency, peers=tuple(p for p in peers.split(",") if p), out=out,
        command="anomaly " + shlex.join(sys.argv[1:]), progress=lambda m: typer.echo(m, err=True),
        providers=tuple(p for p in providers.split(",") if p), max_batch_size=max_batch_size)
    for r in results:
        typer.echo(f"{r.name:32s} {r.mode:16s} {r.images_per_s:8.1f} img/s  p50 {r.p50_ms:7.1f} ms  "
                   f"p99 {r.p99_ms:7.1f} ms  ÷ bare ORT {r.ratio:5.2f}")
    typer.echo(f"wrote {out}")


@app.command("providers-check")
def providers_check_cmd(
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    model: Annotated[str, typer.Option(help="registered model")] = "anomaly-detector",
    providers: Annotated[str, typer.Option(
        help="ONNX Runtime providers to check, comma-separated, in order of preference")
    ] = "TensorrtExecutionProvider,CUDAExecutionProvider",
    versions: Annotated[str, typer.Option(help="versions to check, comma-separated (empty = all)")] = "",
    images: Annotated[Path, typer.Option(help="folder of PNG images")] = Path(".demo/data"),
    batch: Annotated[int, typer.Option(min=1, help="batch size for throughput and the score comparison")
                     ] = 8,
    seconds: Annotated[float, typer.Option(help="seconds per version and provider")] = 4.0,
    trt_cache_dir: Annotated[Path | None, typer.Option(help="TensorRT engine cache folder")] = None,
    out: Annotated[Path, typer.Option(help="Markdown report (table between providers markers)")] = Path(
        "docs/benchmarks-gpu.md"),
) -> None:
    """Load every registered version on the CPU provider and on the requested ones (CUDA,
    TensorRT) through the serving path; compare speed, scores and OK/NG decisions."""
    import shlex
    import sys

    from loadtests.bench import machine_line, write_report
    from loadtests.providers import BEGIN, END, check_providers, render

    settings = _settings(tracking_uri=tracking_uri)
    wanted = [p for p in providers.split(",") if p]
    try:
        rows = check_providers(settings.tracking_uri, model, images, wanted,
                               versions=[v for v in versions.split(",") if v] or None, batch=batch,
                               seconds=seconds, trt_cache_dir=trt_cache_dir,
                               progress=lambda m: typer.echo(m, err=True))
    except (ValueError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    table = render(rows, batch=batch, command="anomaly " + shlex.join(sys.argv[1:]),
                   machine=machine_line(rows[0].accel.provider))
    write_report(out, table, markers=(BEGIN, END), heading="# Execution providers\n\nProduced by "
                 "`anomaly providers-check` (loadtests/providers.py).")
    for r in rows:
        flag = " (fell back)" if r.fell_back else ""
        typer.echo(f"v{r.version:4s} {r.variant:18s} {r.accel.provider}{flag}: p50 {r.accel.p50_ms:.2f} ms "
                   f"(CPU {r.cpu.p50_ms:.2f}), {r.accel.images_per_s:.0f} img/s (CPU "
                   f"{r.cpu.images_per_s:.0f}), max |Δscore| {r.max_score_diff:.2g}, "
                   f"{r.decisions_changed} decisions changed")
    typer.echo(f"wrote {out}")


@app.command("soak")
def soak_cmd(
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow store of the model under test")] = None,
    model: Annotated[str, typer.Option(help="registered model under test")] = "anomaly-detector",
    alias: Annotated[str, typer.Option(help="its alias (the version copied into the sandbox)")] = "champion",
    images: Annotated[Path, typer.Option(help="MVTec-layout folder (its test split is the load)")] = Path(
        ".demo/data"),
    minutes: Annotated[float, typer.Option(min=0.2, help="how long to drive load and faults")] = 10.0,
    work: Annotated[Path | None, typer.Option(help="sandbox folder (default: a new temporary one)")] = None,
    out: Annotated[Path | None, typer.Option(help="Markdown report (table between soak markers)")] = None,
    hotfolder: Annotated[bool, typer.Option(help="soak the MES hot folder instead: poison files, reused "
                                                 "names, a slow writer, server SIGKILLs, database outages")
                         ] = False,
    count: Annotated[int, typer.Option(min=1, help="--hotfolder: good images to drop")] = 2000,
) -> None:
    """Fault-injection soak: a real server and gateway under good and hostile load while
    alias moves to broken versions, registry and database outages and SIGKILLs are
    injected; prints what was lost, passed wrongly or crashed (exit 1 if anything was).
    With --hotfolder, the same for the MES hot folder."""
    import shlex
    import sys
    import tempfile

    from loadtests import soak
    from loadtests.bench import machine_line, write_report

    settings = _settings(tracking_uri=tracking_uri)
    folder = work or Path(tempfile.mkdtemp(prefix="anomaly-soak-"))
    progress = lambda m: typer.echo(m, err=True)  # noqa: E731
    try:
        if hotfolder:
            result = soak.run_hotfolder_soak(settings.tracking_uri, model, alias, images, minutes, folder,
                                             count=count, progress=progress)
        else:
            result = soak.run_soak(settings.tracking_uri, model, alias, images, minutes, folder,
                                   progress=progress)
    except (ValueError, RuntimeError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(1) from exc
    machine = f"{machine_line('CPUExecutionProvider')} Sandbox: {folder}."
    command = "anomaly " + shlex.join(sys.argv[1:])
    render = soak.render_hotfolder if hotfolder else soak.render
    report = render(result, command, machine)  # type: ignore[arg-type]
    typer.echo(report)
    if out is not None:
        markers = (soak.HOT_BEGIN, soak.HOT_END) if hotfolder else (soak.BEGIN, soak.END)
        write_report(out, report, markers=markers, heading="# Reliability\n\nProduced by `anomaly soak` "
                     "(loadtests/soak.py).")
        typer.echo(f"wrote {out}")
    if result.failures():
        raise typer.Exit(1)


@app.command("inspections-export")
def inspections_export_cmd(
    out: Annotated[Path, typer.Argument(help="CSV file to write")],
    db: Annotated[str | None, typer.Option(help="inspection-log database URL")] = None,
    since: Annotated[datetime | None, typer.Option(help="from this time (UTC unless an offset is given)")
                     ] = None,
    until: Annotated[datetime | None, typer.Option(help="up to (not including) this time")] = None,
) -> None:
    """Export the inspection log's decisions in a time range to CSV."""
    from service.inspection import export_csv

    url = db or _settings().inspection_db_url
    n = export_csv(url, out, since, until)
    typer.echo(f"wrote {n} decisions to {out}")


if __name__ == "__main__":
    app()

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
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


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
        command="anomaly " + shlex.join(sys.argv[1:]), progress=lambda m: typer.echo(m, err=True))
    for r in results:
        typer.echo(f"{r.name:32s} {r.mode:16s} {r.images_per_s:8.1f} img/s  p50 {r.p50_ms:7.1f} ms  "
                   f"p99 {r.p99_ms:7.1f} ms  ÷ bare ORT {r.ratio:5.2f}")
    typer.echo(f"wrote {out}")


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

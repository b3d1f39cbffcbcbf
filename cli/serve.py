"""`anomaly serve`, `anomaly gateway`, `anomaly inspections-export`: run the gRPC server or
the HTTP gateway, export the inspection log (the `serve` extra; nothing here imports torch).

Options override the `ANOMALY_*` environment variables (see `service.settings`).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from cli.common import fail, settings


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

    config = settings(tracking_uri=tracking_uri, model_name=model, model_alias=alias,
                      grpc_host=host, grpc_port=port, cache_dir=cache_dir, log_level=log_level)
    configure_logging(config.log_level, config.log_format, config.ort_log_severity)
    try:
        asyncio.run(serve(config))
    except ServiceError as exc:
        raise fail(f"cannot serve {config.model_name}@{config.model_alias} from {config.tracking_uri}: "
                   f"{exc.message}") from exc
    except (RuntimeError, OSError) as exc:  # e.g. a port or spool folder in use, a TLS file missing
        raise fail(f"cannot start the server: {exc}") from exc


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

    config = settings(grpc_target=grpc_target, http_host=host, http_port=port, log_level=log_level)
    configure_logging(config.log_level, config.log_format, config.ort_log_severity)
    tls = {"ssl_certfile": str(config.https_cert_file), "ssl_keyfile": str(config.https_key_file)} \
        if config.https_cert_file else {}
    uvicorn.run(create_app(config), host=config.http_host, port=config.http_port,
                log_level=config.log_level.lower(), timeout_graceful_shutdown=int(config.grace_s), **tls)


def inspections_export_cmd(
    out: Annotated[Path, typer.Argument(help="CSV file to write")],
    db: Annotated[str | None, typer.Option(help="inspection-log database URL")] = None,
    since: Annotated[datetime | None, typer.Option(help="from this time (UTC unless an offset is given)")
                     ] = None,
    until: Annotated[datetime | None, typer.Option(help="up to (not including) this time")] = None,
) -> None:
    """Export the inspection log's decisions in a time range to CSV."""
    from service.inspection import export_csv

    url = db or settings().inspection_db_url
    n = export_csv(url, out, since, until)
    typer.echo(f"wrote {n} decisions to {out}")


COMMANDS = {"serve": serve_cmd, "gateway": gateway_cmd, "inspections-export": inspections_export_cmd}

"""The `anomaly` command: score images, inspect models, and (with the extras installed)
serve, train and run the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from clients.sdk import DEFAULT_TARGET, IMAGE_SUFFIXES, AnomalyClient, AnomalyError

app = typer.Typer(help="Industrial visual anomaly detection: score, serve, train.",
                  no_args_is_help=True)

# The SDK's security options, the same on every command that talks to a server.
ApiKey = Annotated[str, typer.Option(envvar="ANOMALY_API_KEY", show_default=False,
                                     help="API key (x-api-key); or set ANOMALY_API_KEY")]
ApiKeyFile = Annotated[Path | None, typer.Option(help="file whose first line is the API key")]
TlsCa = Annotated[Path | None, typer.Option("--tls-ca", help="CA certificate to trust (TLS / HTTPS)")]
ClientCert = Annotated[Path | None, typer.Option(help="client certificate (mutual TLS)")]
ClientKey = Annotated[Path | None, typer.Option(help="client private key (mutual TLS)")]


def _security(api_key: str, api_key_file: Path | None, tls_ca: Path | None, client_cert: Path | None,
              client_key: Path | None) -> dict:
    """SDK keyword arguments from the security options (a key file wins over nothing)."""
    if api_key_file is not None and not api_key:
        try:
            api_key = api_key_file.read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise typer.BadParameter(f"cannot read an API key from {api_key_file}: {exc}",
                                     param_hint="--api-key-file") from exc
    if bool(client_cert) != bool(client_key):
        raise typer.BadParameter("give both --client-cert and --client-key, or neither")
    return {"api_key": api_key, "tls_ca_file": tls_ca, "client_cert_file": client_cert,
            "client_key_file": client_key}


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise typer.BadParameter(f"{p} does not exist", param_hint="PATHS")
    return files


@app.command("score")
def score_cmd(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    target: Annotated[str, typer.Option(help="gRPC server host:port, or the gateway's http:// URL")
                      ] = DEFAULT_TARGET,
    model: Annotated[str, typer.Option(help="registered model name")] = "",
    alias: Annotated[str, typer.Option(help="alias (default: server's)")] = "",
    version: Annotated[int, typer.Option(help="version number")] = 0,
    category: Annotated[str, typer.Option(help="product category")] = "",
    timeout: Annotated[float, typer.Option(help="deadline per image, seconds")] = 30.0,
    api_key: ApiKey = "",
    api_key_file: ApiKeyFile = None,
    tls_ca: TlsCa = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
) -> None:
    """Score image files (or every image in folders) and print a table."""
    security = _security(api_key, api_key_file, tls_ca, client_cert, client_key)
    files = _expand(paths)
    console = Console()
    table = Table(title=f"{len(files)} image(s) scored by {target}")
    for col in ("image", "score", "normalized", "decision", "threshold", "model", "ms"):
        table.add_column(col)
    failures = 0
    with AnomalyClient(target, model=model, alias=alias, timeout=timeout, **security) as client:
        for f in files:
            try:
                r = client.score(f, version=version, category=category, request_id=f.name)
            except AnomalyError as exc:
                failures += 1
                table.add_row(str(f), "-", "-", f"[yellow]{exc.code}[/]", "-", "-", exc.message)
                continue
            table.add_row(str(f), f"{r.score:.5g}", f"{r.normalized_score:.3f}",
                          "[red]NG[/]" if r.is_anomalous else "[green]OK[/]", f"{r.threshold:.5g}",
                          f"{r.model.name}/{r.model.version} ({r.model.architecture}-{r.model.variant})",
                          f"{r.timings['total_ms']:.1f}")
    console.print(table)
    if failures:
        raise typer.Exit(1)


@app.command("models")
def models_cmd(
    target: Annotated[str, typer.Option(help="gRPC server host:port, or the gateway's http:// URL")
                      ] = DEFAULT_TARGET,
    api_key: ApiKey = "",
    api_key_file: ApiKeyFile = None,
    tls_ca: TlsCa = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
) -> None:
    """List the model versions loaded on a server."""
    security = _security(api_key, api_key_file, tls_ca, client_cert, client_key)
    console = Console()
    table = Table(title=f"models on {target}")
    for col in ("name", "version", "aliases", "architecture", "variant", "input", "provider",
                "categories"):
        table.add_column(col)
    with AnomalyClient(target, **security) as client:
        for m in client.list_models():
            table.add_row(m.ref.name, m.ref.version, m.ref.alias, m.ref.architecture,
                          m.ref.variant, f"{m.input_height}x{m.input_width}", m.provider,
                          ",".join(m.categories))
    console.print(table)


@app.command("hotfolder")
def hotfolder_cmd(
    inbox: Annotated[Path, typer.Argument(help="folder the MES drops images into")],
    target: Annotated[str, typer.Option(help="gRPC server host:port, or the gateway's http:// URL")
                      ] = DEFAULT_TARGET,
    out: Annotated[Path | None, typer.Option(help="where OK/, NG/, error/ go (default: the inbox)")] = None,
    category: Annotated[str, typer.Option(help="product category (threshold)")] = "",
    station: Annotated[str, typer.Option(help="station / line name for the inspection log")] = "",
    seconds: Annotated[float | None, typer.Option(help="stop after this long (default: run until Ctrl-C)")
                       ] = None,
    until_empty: Annotated[bool, typer.Option(help="stop once the inbox is empty")] = False,
    settle: Annotated[float, typer.Option(help="seconds a file must stay unchanged before scoring")] = 0.5,
    max_attempts: Annotated[int, typer.Option(min=1, help="failed answers (not outages) before an image "
                                                         "goes to error/")] = 8,
    max_age: Annotated[float, typer.Option(help="seconds after its first failed answer before an image "
                                                "goes to error/")] = 600.0,
    api_key: ApiKey = "",
    api_key_file: ApiKeyFile = None,
    tls_ca: TlsCa = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
) -> None:
    """Watch a folder: score each new image, write <image>.json beside it, move both to OK/NG/error.

    At least once and idempotent: images wait in the inbox while the server is down, one
    image's failures never hold up the others, and a restart never loses or double-moves a
    file.
    """
    security = _security(api_key, api_key_file, tls_ca, client_cert, client_key)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from clients.hotfolder import HotFolder

    console = Console()
    with AnomalyClient(target, retries=1, **security) as client, Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
            transient=True) as progress:
        folder = HotFolder(client, inbox, out, category=category, station=station, settle_s=settle,
                           max_attempts=max_attempts, max_age_s=max_age)
        task = progress.add_task(f"watching {inbox}")
        counts = {"OK": 0, "NG": 0, "error": 0}

        def done(image: Path, outcome: str) -> None:
            counts[outcome] += 1
            progress.update(task, description=f"watching {inbox}: OK {counts['OK']}  NG {counts['NG']}  "
                                              f"error {counts['error']}  (last: {image.name} → {outcome})")

        try:
            summary = folder.run(seconds=seconds, until_empty=until_empty, on_done=done)
        except KeyboardInterrupt:
            summary = None
    table = Table(title=f"hot folder {inbox}")
    for col in ("OK", "NG", "error", "retried", "still in inbox"):
        table.add_column(col)
    if summary is not None:
        table.add_row(str(summary.ok), str(summary.ng), str(summary.error), str(summary.retries),
                      str(summary.pending))
    else:
        table.add_row(str(counts["OK"]), str(counts["NG"]), str(counts["error"]), "-", "-")
    console.print(table)


def _mount_optional() -> None:
    """Add the serve / train commands when their extras are installed."""
    try:
        from service.cli import (
            bench_cmd,
            gateway_cmd,
            inspections_export_cmd,
            providers_check_cmd,
            serve_cmd,
            soak_cmd,
        )
    except ImportError:  # base install: client only
        pass
    else:
        app.command("serve")(serve_cmd)
        app.command("gateway")(gateway_cmd)
        app.command("bench")(bench_cmd)
        app.command("inspections-export")(inspections_export_cmd)
        app.command("providers-check")(providers_check_cmd)
        app.command("soak")(soak_cmd)
    try:
        from registry.cli import compare_cmd, demo_cmd, quant_study_cmd, sample_data_cmd, train_cmd
    except ImportError:
        return
    app.command("sample-data")(sample_data_cmd)
    app.command("train")(train_cmd)
    app.command("compare")(compare_cmd)
    app.command("quant-study")(quant_study_cmd)
    app.command("demo")(demo_cmd)


_mount_optional()

if __name__ == "__main__":
    app()

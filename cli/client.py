"""`anomaly score`, `anomaly models`, `anomaly hotfolder`: the client commands (the base
install: the SDK only)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from anomaly.wire import DEFAULT_TARGET, IMAGE_SUFFIXES
from cli.common import model_reference, print_json, with_security
from edge_anomaly_client.sdk import AnomalyClient, AnomalyError

UNREACHABLE_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED")  # the server could not be reached
Target = Annotated[str, typer.Option(help="gRPC server host:port, or the gateway's http:// URL")]


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


@with_security
def score_cmd(
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    target: Target = DEFAULT_TARGET,
    model: Annotated[str, typer.Option(help="registered model name, or models:/<name>@<alias> or "
                                            "models:/<name>/<version>")] = "",
    alias: Annotated[str, typer.Option(help="alias (default: server's)")] = "",
    version: Annotated[int, typer.Option(help="version number")] = 0,
    category: Annotated[str, typer.Option(help="product category")] = "",
    timeout: Annotated[float, typer.Option(help="deadline per image, seconds")] = 30.0,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per image (result or "
                                                         "error) instead of the table")] = False,
    sdk_options: dict | None = None,
) -> None:
    """Score image files (or every image in folders) and print a table. Exit code 1 when an image
    could not be scored."""
    files = _expand(paths)
    model, uri_alias, uri_version = model_reference(model)
    alias, version = alias or uri_alias, version or uri_version
    table = Table(title=f"{len(files)} image(s) scored by {target}")
    for col in ("image", "score", "normalized", "decision", "threshold", "model", "ms"):
        table.add_column(col)
    failed: list[str] = []  # the status of each image not scored
    with AnomalyClient(target, model=model, alias=alias, timeout=timeout, **(sdk_options or {})) as client:
        for f in files:
            try:
                r = client.score(f, version=version, category=category, request_id=f.name)
            except AnomalyError as exc:
                failed.append(exc.code)
                if as_json:  # one line per image as it is answered
                    print_json({"image": str(f), "error": {"code": exc.code, "message": exc.message}},
                               indent=None)
                else:
                    table.add_row(str(f), "-", "-", f"[yellow]{exc.code}[/]", "-", "-", exc.message)
                continue
            if as_json:
                print_json({"image": str(f), **asdict(r)}, indent=None)
            else:
                table.add_row(str(f), f"{r.score:.5g}", f"{r.normalized_score:.3f}",
                              "[red]NG[/]" if r.is_anomalous else "[green]OK[/]", f"{r.threshold:.5g}",
                              f"{r.model.name}/{r.model.version} ({r.model.architecture}-{r.model.variant})",
                              f"{r.timings['total_ms']:.1f}")
    if not as_json:
        Console().print(table)
    if failed:
        raise typer.Exit(failure_code(failed))


def failure_code(failed: list[str]) -> int:
    """The exit code of a scoring run with failures (their status codes): 5 when the server could
    not be reached for any image (every failure UNAVAILABLE or DEADLINE_EXCEEDED), else 1."""
    return 5 if all(code in UNREACHABLE_CODES for code in failed) else 1


@with_security
def models_cmd(
    target: Target = DEFAULT_TARGET,
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list instead of the table")] = False,
    sdk_options: dict | None = None,
) -> None:
    """List the model versions loaded on a server."""
    if as_json:
        with AnomalyClient(target, **(sdk_options or {})) as client:
            print_json([asdict(m) for m in client.list_models()])
        return
    console = Console()
    table = Table(title=f"models on {target}")
    for col in ("name", "version", "aliases", "architecture", "variant", "input", "provider",
                "categories"):
        table.add_column(col)
    with AnomalyClient(target, **(sdk_options or {})) as client:
        for m in client.list_models():
            size = f"{m.input_height}x{m.input_width}"
            if m.tiling:  # tiles of the input size over a working size
                size += f" tiles of {m.tiling[0]}x{m.tiling[1]}/{m.tiling[2]}"
            table.add_row(m.ref.name, m.ref.version, m.ref.alias, m.ref.architecture,
                          m.ref.variant, size, m.provider, ",".join(m.categories))
    console.print(table)


@with_security
def hotfolder_cmd(
    inbox: Annotated[Path, typer.Argument(help="folder the MES drops images into")],
    target: Target = DEFAULT_TARGET,
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
    sdk_options: dict | None = None,
) -> None:
    """Watch a folder: score each new image, write <image>.json beside it, move both to OK/NG/error.

    At least once and idempotent: images wait in the inbox while the server is down, one
    image's failures never hold up the others, and a restart never loses or double-moves a
    file.
    """
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from clients.hotfolder import HotFolder

    console = Console()
    with AnomalyClient(target, retries=1, **(sdk_options or {})) as client, Progress(
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


@with_security
def feedback_cmd(
    request_id: Annotated[str, typer.Argument(help="request id of the scored part (as answered)")],
    verdict: Annotated[str, typer.Argument(help="OK (good part) or NG (defective)")],
    target: Target = DEFAULT_TARGET,
    defect_type: Annotated[str, typer.Option(help="e.g. scratch (for NG)")] = "",
    operator: Annotated[str, typer.Option(help="who checked the part")] = "",
    comment: Annotated[str, typer.Option(help="free text")] = "",
    station: Annotated[str, typer.Option(help="where it was checked")] = "",
    sdk_options: dict | None = None,
) -> None:
    """Record an operator's verdict on a part the server scored (kept in its inspection log)."""
    with AnomalyClient(target, **(sdk_options or {})) as client:
        try:
            r = client.feedback(request_id, verdict.upper(), defect_type=defect_type, operator=operator,
                                comment=comment, station=station)
        except AnomalyError as exc:
            typer.secho(f"error: {exc.code}: {exc.message}", fg="red", err=True)
            raise typer.Exit(1) from None
    typer.echo(f"recorded {verdict.upper()} for {r.request_id} at {r.recorded_at}")


COMMANDS = {"score": score_cmd, "models": models_cmd, "hotfolder": hotfolder_cmd, "feedback": feedback_cmd}

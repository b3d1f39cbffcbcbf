"""`anomaly serve`, `anomaly gateway`, `anomaly inspections-export`: run the gRPC server or
the HTTP gateway, export the inspection log (the `serve` extra; nothing here imports torch).

Options override the `ANOMALY_*` environment variables (see `service.settings`).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from cli.common import (
    UNREACHABLE,
    database_unreachable,
    fail,
    first_line,
    model_reference,
    print_json,
    settings,
)

# The option of each setting `anomaly serve` takes, for errors that name it.
SERVE_OPTIONS = {"model_name": "--model", "model_alias": "--alias", "grpc_host": "--host",
                 "grpc_port": "--port", "http_in_process": "--http"}


def serve_cmd(
    tracking_uri: Annotated[str | None, typer.Option(help="MLflow tracking URI")] = None,
    model: Annotated[str | None, typer.Option(
        help="registered model to serve, or models:/<name>@<alias> (MLflow's form)")] = None,
    alias: Annotated[str | None, typer.Option(help="alias to serve, e.g. champion")] = None,
    host: Annotated[str | None, typer.Option(help="bind address")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="model download cache")] = None,
    log_level: Annotated[str | None, typer.Option(help="logging level")] = None,
    http: Annotated[bool | None, typer.Option(
        "--http/--no-http", help="also answer the HTTP API from this process (ANOMALY_HTTP_IN_PROCESS)",
        show_default=False)] = None,
    http_port: Annotated[int | None, typer.Option(help="HTTP port with --http")] = None,
    processes: Annotated[int | None, typer.Option(
        min=1, help="server processes sharing the port (SO_REUSEPORT), each with its share of the cores "
                    "(ANOMALY_PROCESSES)")] = None,
) -> None:
    """Run the gRPC inference server (serves `models:/<model>@<alias>`); with `--http`, the
    HTTP API too, in the same process."""
    from service import tracing
    from service.errors import ServiceError
    from service.logs import configure_logging
    from service.main import serve

    if model is not None:
        model, uri_alias, _ = model_reference(model, allow_version=False)
        alias = alias if alias is not None else (uri_alias or None)
    config = settings(SERVE_OPTIONS, tracking_uri=tracking_uri, model_name=model, model_alias=alias,
                      grpc_host=host, grpc_port=port, cache_dir=cache_dir, log_level=log_level,
                      http_in_process=http, http_port=http_port, processes=processes)
    configure_logging(config.log_level, config.log_format, config.ort_log_severity)
    if config.processes > 1:  # the supervisor serves nothing: each child traces its own requests
        from service.processes import PortHeld, Supervisor

        try:
            code = Supervisor(config).run()
        except ValueError as exc:
            raise fail(str(exc), 2) from exc
        except (PortHeld, OSError) as exc:  # another supervisor, server or spool holder; no runtime folder
            raise fail(f"cannot start the servers: {exc}") from exc
        raise typer.Exit(code)
    tracing.configure("anomaly-server")
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
    # A stop is a success once drained. uvicorn drains on SIGTERM and then raises the signal
    # again: outside PID 1 (a supervisor, systemd, `timeout`) the process would end "killed by
    # SIGTERM" (143). With this handler that re-raise, and a SIGTERM before uvicorn listens
    # (nothing to drain), end it with status 0, as `anomaly serve`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    import uvicorn

    from service import tracing
    from service.logs import configure_logging
    from service.protocol.rest.gateway import create_app

    config = settings({"http_host": "--host", "http_port": "--port"}, grpc_target=grpc_target, http_host=host,
                      http_port=port, log_level=log_level)
    configure_logging(config.log_level, config.log_format, config.ort_log_severity)
    tracing.configure("anomaly-gateway")
    tls = {"ssl_certfile": str(config.https_cert_file), "ssl_keyfile": str(config.https_key_file)} \
        if config.https_cert_file else {}
    try:
        uvicorn.run(create_app(config), host=config.http_host, port=config.http_port,
                    log_level=config.log_level.lower(), timeout_graceful_shutdown=int(config.grace_s),
                    log_config=None, **tls)  # None: uvicorn's lines go through configure_logging's format
    except SystemExit as exc:  # uvicorn exits 3 when it cannot bind (after logging why); 0 after a stop
        if exc.code not in (0, None):
            raise fail(f"the gateway could not listen on {config.http_host}:{config.http_port} (in use, or "
                       "not an address of this host; see the log line above)") from None
        raise


Since = Annotated[datetime | None, typer.Option(help="from this time (UTC unless an offset is given)")]
Until = Annotated[datetime | None, typer.Option(help="up to (not including) this time")]
Db = Annotated[str | None, typer.Option(help="inspection-log database URL (default: "
                                             "ANOMALY_INSPECTION_DB_URL)")]


def _inspection_db(db: str | None = None) -> str:
    """The inspection database: `--db`, else the settings' URL; the password file of the
    settings applied to either; or a one-line error."""
    try:
        return settings(inspection_db_url=db).inspection_db()
    except OSError as exc:
        raise fail(str(exc)) from exc


def inspections_export_cmd(
    out: Annotated[Path, typer.Argument(help="CSV file to write")],
    db: Db = None,
    since: Since = None,
    until: Until = None,
) -> None:
    """Export the inspection log's decisions in a time range to CSV."""
    from service.inspection.export import export_csv

    url = _inspection_db(db)
    n = export_csv(url, out, since, until)
    typer.echo(f"wrote {n} decisions to {out}")


def quality_report_cmd(
    db: Db = None,
    since: Since = None,
    until: Until = None,
    proposal: Annotated[Path | None, typer.Option(help="write the threshold proposal here (JSON) for "
                                                       "`anomaly thresholds apply`")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON, not tables")] = False,
) -> None:
    """False calls and escapes per version, category and station, from operator feedback, and the
    per-category thresholds that keep escapes at zero with the fewest false calls. Parts with
    conflicting verdicts are listed and left out; verdicts on request ids never decided are
    counted and ignored."""
    import json

    from rich.console import Console
    from rich.table import Table

    from service.inspection.quality import proposals_json, review

    found = review(_inspection_db(db), since, until)
    rows, proposals = found.rows, found.proposals
    if proposal is not None:
        proposal.parent.mkdir(parents=True, exist_ok=True)
        proposal.write_text(json.dumps(proposals_json(proposals), indent=1))
    if as_json:
        print_json({"rows": rows, "conflicts": found.conflicts, "unknown_verdicts": found.unknown,
                    "unknown_request_ids": found.unknown_ids, **proposals_json(proposals)})
        return
    console = Console()
    table = Table(title="Quality: operator verdicts against the served decisions")
    for col in ("model", "category", "station", "decided", "reviewed", "false calls", "escapes",
                "escaped request ids", "conflicting"):
        table.add_column(col)
    for q in rows:
        table.add_row(f"{q.model_name}/{q.model_version}", q.category or "(global)", q.station or "-",
                      str(q.decided), str(q.reviewed), str(q.false_calls),
                      f"[red]{q.escapes}[/]" if q.escapes else "0", ", ".join(q.escape_ids[:3]),
                      f"[yellow]{q.conflicts}[/]" if q.conflicts else "0")
    console.print(table)
    if found.conflicts:
        table = Table(title="Parts with conflicting verdicts (left out of the counts and the proposal: "
                            "settle them, e.g. with one more verdict after a second look)")
        for col in ("request id", "model", "category", "station", "verdicts (sender), oldest first"):
            table.add_column(col)
        for c in found.conflicts:
            table.add_row(c.request_id, f"{c.model_name}/{c.model_version}", c.category or "(global)",
                          c.station or "-", ", ".join(f"{v} ({who or 'unknown'})" for v, who in c.verdicts))
        console.print(table)
    if found.unknown:
        more = " …" if found.unknown > len(found.unknown_ids) else ""
        typer.echo(f"ignored {found.unknown} verdict(s) on request ids never decided (no answered decision "
                   f"in this log): {', '.join(found.unknown_ids)}{more}")
    table = Table(title="Proposed thresholds (zero escapes, fewest false calls, on the reviewed parts)")
    for col in ("model", "tag", "now", "proposed", "defects / good reviewed", "false calls now → proposed",
                "escapes now", "note"):
        table.add_column(col)
    for p in proposals:
        table.add_row(f"{p.model_name}/{p.model_version}", p.tag, f"{p.current:.6g}",
                      "-" if p.threshold is None else f"{p.threshold:.6g}",
                      f"{p.confirmed_defects} / {p.confirmed_good}",
                      f"{p.false_calls_now} → {'-' if p.threshold is None else p.false_calls_proposed}",
                      str(p.escapes_now), p.note)
    console.print(table)
    if proposal is not None:
        typer.echo(f"wrote the proposal to {proposal}; apply it with `anomaly thresholds apply {proposal}`")


def shadow_report_cmd(
    db: Db = None,
    since: Since = None,
    until: Until = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON, not a table")] = False,
) -> None:
    """How often the shadow challenger agreed with the served answers, per category, with example
    request ids of each kind of disagreement."""
    from rich.console import Console
    from rich.table import Table

    from service.inspection.quality import shadow_report

    rows = shadow_report(_inspection_db(db), since, until)
    if as_json:
        print_json(rows)
        return
    table = Table(title="Shadow challenger against the served answers")
    for col in ("served", "challenger", "category", "pairs", "agreement", "served OK, challenger NG",
                "served NG, challenger OK"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.served_version, r.shadow_version, r.category or "(global)", str(r.pairs),
                      f"{r.agreement:.1%}", f"{len(r.ok_to_ng)} {' '.join(r.ok_to_ng[:3])}",
                      f"{len(r.ng_to_ok)} {' '.join(r.ng_to_ok[:3])}")
    Console().print(table)
    if not rows:
        typer.echo("no shadow decisions in this range (is ANOMALY_SHADOW_ALIAS set on the server, with the "
                   "inspection log on?)")


TrackingUri = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: ANOMALY_TRACKING_URI)")]
ModelName = Annotated[str | None, typer.Option("--model", help="registered model")]
reference_app = typer.Typer(help="The plant's known parts, which the promotion gate checks every candidate "
                                 "against.", no_args_is_help=True)
thresholds_app = typer.Typer(help="Per-category thresholds as version tags that running servers follow.",
                             no_args_is_help=True)


def _client(tracking_uri: str | None):  # type: ignore[no-untyped-def]
    from mlflow import MlflowClient

    uri = tracking_uri or settings().tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@reference_app.command("add")
def reference_add_cmd(
    images: Annotated[list[Path], typer.Argument(help="images of the known parts")],
    category: Annotated[str, typer.Option(help="their product category (empty = global)")] = "",
    expect: Annotated[str, typer.Option(help="the decision each must get: OK or NG")] = "NG",
    model: ModelName = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Add known parts to the plant's reference set of a registered model. The whole add is
    refused, nothing written, for a category the model does not know, an image already in the
    set with another category or expectation, or a set that would exceed its limit."""
    from mlflow.exceptions import MlflowException

    from registry.plant import add_known_parts

    name = model or settings().model_name
    try:
        run_id, total = add_known_parts(_client(tracking_uri), name, category, expect.upper(), images)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    except MlflowException as exc:  # e.g. no such registered model
        raise fail(f"{name}: {exc.message}") from exc
    typer.echo(f"{name}: the plant's reference set holds {total} known parts (MLflow run {run_id})")


@reference_app.command("list")
def reference_list_cmd(
    model: ModelName = None,
    tracking_uri: TrackingUri = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (items with file, category, expect, "
                                                         "origin, sha256)")] = False,
) -> None:
    """List the known parts of the plant's reference set of a registered model."""
    import json

    from mlflow.exceptions import MlflowException

    from registry.plant import known_parts

    name = model or settings().model_name
    try:
        run_id, items = known_parts(_client(tracking_uri), name)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    except MlflowException as exc:
        raise fail(f"{name}: {exc.message}") from exc
    if as_json:
        typer.echo(json.dumps({"model": name, "run_id": run_id, "items": items}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name}: the plant's reference set ({len(items)} known parts"
                        f"{f', MLflow run {run_id}' if run_id else ''})")
    for col in ("file", "category", "expect", "origin", "sha256"):
        table.add_column(col, overflow="fold")
    for i in items:
        table.add_row(i["file"], i["category"] or "(global)", i["expect"], i.get("origin", ""),
                      i["sha256"][:16])
    Console(width=200).print(table)


@reference_app.command("remove")
def reference_remove_cmd(
    parts: Annotated[list[str], typer.Argument(help="stored file names or SHA-256 prefixes (≥ 8 hex digits), "
                                                   "as `anomaly reference list` shows them")],
    model: ModelName = None,
    tracking_uri: TrackingUri = None,
) -> None:
    """Take known parts out of the plant's reference set (each name must match exactly one
    part, or nothing is removed)."""
    from mlflow.exceptions import MlflowException

    from registry.plant import remove_known_parts

    name = model or settings().model_name
    try:
        run_id, removed, total = remove_known_parts(_client(tracking_uri), name, parts)
    except (ValueError, OSError) as exc:
        raise fail(str(exc)) from exc
    except MlflowException as exc:
        raise fail(f"{name}: {exc.message}") from exc
    for item in removed:
        typer.echo(f"removed {item['file']} ({item['category'] or '(global)'} {item['expect']})")
    typer.echo(f"{name}: the plant's reference set holds {total} known parts (MLflow run {run_id})")


@thresholds_app.command("apply")
def thresholds_apply_cmd(
    proposal: Annotated[Path, typer.Argument(help="JSON written by `anomaly quality-report --proposal`")],
    version: Annotated[str, typer.Option(help="tag this version instead of the one each proposal "
                                              "is for")] = "",
    model: ModelName = None,
    tracking_uri: TrackingUri = None,
    dry_run: Annotated[bool, typer.Option(help="print the tags without writing them")] = False,
) -> None:
    """Write a quality report's proposed thresholds as `threshold.<category>` version tags."""
    import json

    from registry.plant import apply_thresholds

    try:
        proposals = json.loads(proposal.read_text())["proposals"]
        applied = apply_thresholds(_client(tracking_uri), model or settings().model_name, proposals,
                                   version, dry_run)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise fail(f"cannot apply {proposal}: {exc}") from exc
    for a in applied:
        typer.echo(f"{'would set' if dry_run else 'set'} version {a.version} {a.tag}={a.value}"
                   f"{f' (was {a.previous})' if a.previous else ''}")
    if not applied:
        typer.echo("nothing to apply: no proposal has a threshold")


db_app = typer.Typer(help="The inspection log's database schema (as `mlflow db` is for MLflow's store).",
                     no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade_cmd(db: Db = None) -> None:
    """Create or migrate the inspection database's schema to this release's newest revision
    (servers do it themselves on first connecting; this does it ahead, e.g. before a rollout).
    Exit 3: the database is of a newer release."""
    from sqlalchemy import exc as sa_exc

    from service.inspection.schema import SchemaMismatch, upgrade
    from service.repository.registry_schema import redacted

    url = _inspection_db(db)
    try:
        before, after = upgrade(url)
    except SchemaMismatch as exc:
        raise fail(str(exc), 3) from exc
    except (sa_exc.SQLAlchemyError, OSError, ValueError, RuntimeError) as exc:
        raise fail(f"cannot migrate {redacted(url)}: {first_line(exc, 300)}", _db_code(exc)) from exc
    typer.echo(f"{redacted(url)}: schema {before or '(none)'} → {after}" if before != after
               else f"{redacted(url)}: schema {after}, up to date")


@db_app.command("current")
def db_current_cmd(db: Db = None) -> None:
    """The inspection database's schema revision and this release's newest. Exit 0: up to date;
    4: it needs `anomaly db upgrade`; 3: it is of a newer release (or not this project's)."""
    from sqlalchemy import exc as sa_exc

    from service.inspection.schema import head_revision, known_revisions, schema_state
    from service.repository.registry_schema import redacted

    url = _inspection_db(db)
    try:
        current, tables = schema_state(url)
    except (sa_exc.SQLAlchemyError, OSError, ValueError) as exc:
        raise fail(f"cannot read {redacted(url)}: {first_line(exc, 300)}", _db_code(exc)) from exc
    head = head_revision()
    typer.echo(f"{redacted(url)}: schema {current or '(none)'}, this release's newest {head}")
    if current == head:
        return
    if current and current not in known_revisions():
        raise fail("that revision is not one of this release's: a newer release migrated the database, "
                   "or it is not this project's (MLflow's store uses the same alembic_version table)", 3)
    if not current and {"inspections", "feedback"} & tables:
        raise fail("inspection tables without a schema revision: a migration was interrupted (SQLite "
                   "cannot undo part of one: restore the database from a backup), or the tables are "
                   "not this project's", 3)
    raise fail("run `anomaly db upgrade`", 4)


def _db_code(exc: BaseException) -> int:
    """The CLI's code for a database that could not be reached, else 1."""
    return UNREACHABLE if database_unreachable(exc) else 1


def settings_reference_cmd(
    out: Annotated[Path | None, typer.Option(help="write it here (e.g. docs/settings.md) instead of stdout")
                   ] = None,
) -> None:
    """Print the reference of every server and gateway setting (Markdown, generated from the
    settings class: variable, type, default, meaning)."""
    from service.settings_reference import reference_markdown

    text = reference_markdown()
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {out}")


COMMANDS = {"serve": serve_cmd, "gateway": gateway_cmd, "inspections-export": inspections_export_cmd,
            "quality-report": quality_report_cmd, "shadow-report": shadow_report_cmd,
            "reference": reference_app, "thresholds": thresholds_app, "db": db_app,
            "settings-reference": settings_reference_cmd}

"""The inspection log: a real server records every decision (SQLite and PostgreSQL), the
schema is Alembic's, nothing queued is lost on graceful shutdown, CSV export by time range."""

from __future__ import annotations

import asyncio
import csv
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import fresh_postgres_database
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from cli.main import app
from edge_anomaly_client.sdk import AnomalyClient, AnomalyError
from loadtests.launch import start_server
from service.inspection.export import export_csv
from service.inspection.log import Decided, InspectionLog


def _rows(url: str) -> list[dict]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM inspections ORDER BY id"))]
    finally:
        engine.dispose()


def _serve_and_score(store, url: str, images: list[Path], tmp_path: Path) -> list:
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": url})
    results = []
    try:
        with AnomalyClient(target) as client:
            for i, path in enumerate(images):
                results.append(client.score(path, request_id=f"part-{i}", station="line-1",
                                            category=path.parts[-4]))
            with pytest.raises(AnomalyError):  # refused requests are not decisions
                client.score(b"not an image", request_id="bad")
    finally:
        assert child.stop() == 0  # SIGTERM: drain, flush the log, exit 0
    return results


def _check(rows: list[dict], results: list, version: str) -> None:
    assert [r["request_id"] for r in rows] == [r.request_id for r in results]
    for row, res in zip(rows, results, strict=True):
        assert row["station"] == "line-1" and row["category"] == res.category
        assert row["model_name"] == res.model.name and row["model_version"] == version
        assert row["score"] == pytest.approx(res.score, rel=1e-6)
        assert row["normalized_score"] == pytest.approx(res.normalized_score, rel=1e-6)
        assert row["decision"] == ("NG" if res.is_anomalous else "OK")
        assert row["latency_ms"] > 0


def test_sqlite_log_alembic_and_export(store, good_and_defect, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'inspections.db'}"
    images = [*good_and_defect[0], *good_and_defect[1]]
    before = datetime.now(UTC)
    results = _serve_and_score(store, url, images, tmp_path)
    rows = _rows(url)
    _check(rows, results, store.version)
    assert {r["decision"] for r in rows} == {"OK", "NG"}
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    engine.dispose()

    out = tmp_path / "all.csv"
    assert export_csv(url, out, since=before - timedelta(seconds=1)) == len(images)
    with out.open() as f:
        exported = list(csv.DictReader(f))
    assert [e["request_id"] for e in exported] == [r.request_id for r in results]
    assert export_csv(url, tmp_path / "none.csv", since=datetime.now(UTC) + timedelta(hours=1)) == 0
    cli = CliRunner().invoke(app, ["inspections-export", str(tmp_path / "cli.csv"), "--db", url,
                                   "--since", (before - timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%S")])
    assert cli.exit_code == 0 and f"wrote {len(images)} decisions" in cli.output, cli.output
    assert export_csv(url, tmp_path / "none.csv", until=before - timedelta(hours=1)) == 0


def test_postgres_log(store, good_and_defect, tmp_path: Path) -> None:
    with fresh_postgres_database("inspections_test") as url:
        images = good_and_defect[1][:6]
        results = _serve_and_score(store, url, images, tmp_path)
        _check(_rows(url), results, store.version)


def test_close_flushes_everything_queued(tmp_path: Path) -> None:
    """Rows recorded faster than one batch are all written by `close`, none twice."""
    url = f"sqlite:///{tmp_path / 'burst.db'}"

    async def main() -> InspectionLog:
        log = InspectionLog(url, tmp_path / "spool", batch_size=64, flush_s=5.0)
        await log.start()
        for start in range(0, 1000, 100):  # concurrent requests: group-committed to the spool
            await asyncio.gather(*(log.record(Decided(f"r{i}", "s", "brick", "m", "1", float(i), 0.5, 10.0,
                                                      i % 2 == 0, 1.0)) for i in range(start, start + 100)))
        await log.close()
        return log

    log = asyncio.run(main())
    rows = _rows(url)
    assert log.written == 1000 and [r["request_id"] for r in rows] == [f"r{i}" for i in range(1000)]
    assert {r["decision"] for r in rows[:2]} == {"NG", "OK"}

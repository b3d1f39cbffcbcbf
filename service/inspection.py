"""The inspection log: an optional server-side record of every decision, through SQLAlchemy.

Turn it on with `ANOMALY_INSPECTION_LOG=true` (SQLite file `inspections.db` by default) or
point `ANOMALY_INSPECTION_DB_URL` at any SQLAlchemy URL (`postgresql://user@host/db`).
The schema is managed by Alembic (`service/migrations`), upgraded to head at start-up.

Writing never slows the Score path: `record` only appends to an in-memory queue; a
background task writes batches (up to `batch_size` rows, at least every `flush_s`) from a
worker thread. If the database is unreachable the rows stay queued and the writer retries
with backoff; `close` (graceful shutdown) flushes everything still queued.
"""

from __future__ import annotations

import asyncio
import csv
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import DateTime, Float, Index, Integer, String, create_engine, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.batcher import collect

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
COLUMNS = ("request_id", "station", "category", "model_name", "model_version", "score",
           "normalized_score", "threshold", "decision", "latency_ms", "created_at")


class Base(DeclarativeBase):
    """Declarative base of the inspection-log tables."""


class Inspection(Base):
    """One decision the server made."""

    __tablename__ = "inspections"
    __table_args__ = (Index("ix_inspections_created_at", "created_at"),
                      Index("ix_inspections_request_id", "request_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(128))
    station: Mapped[str] = mapped_column(String(128), default="")
    category: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(256))
    model_version: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    normalized_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    decision: Mapped[str] = mapped_column(String(2))  # "OK" | "NG"
    latency_ms: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime)  # UTC, stored naive (same on every backend)


def upgrade(url: str) -> None:
    """Create or migrate the schema at `url` to the newest Alembic revision."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


@dataclass
class Decided:
    """What `record` takes: one decision, as the data plane has it."""

    request_id: str
    station: str
    category: str
    model_name: str
    model_version: str
    score: float
    normalized_score: float
    threshold: float
    anomalous: bool
    latency_ms: float

    def row(self) -> dict:
        """The table row, stamped now (UTC)."""
        return {"request_id": self.request_id, "station": self.station, "category": self.category,
                "model_name": self.model_name, "model_version": self.model_version, "score": self.score,
                "normalized_score": self.normalized_score, "threshold": self.threshold,
                "decision": "NG" if self.anomalous else "OK", "latency_ms": self.latency_ms,
                "created_at": datetime.now(UTC).replace(tzinfo=None)}


class InspectionLog:
    """Asynchronous, batched writer of `Inspection` rows.

    Args:
        url: SQLAlchemy database URL.
        batch_size: most rows per INSERT.
        flush_s: longest a row waits in memory when the database is healthy.
    """

    def __init__(self, url: str, *, batch_size: int = 500, flush_s: float = 0.2) -> None:
        self.url = url
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.engine: Engine | None = None
        self.queue: asyncio.Queue[dict | None] = asyncio.Queue()  # unbounded: a row is never dropped
        self.written = 0
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Migrate the schema and start the background writer."""
        await asyncio.to_thread(upgrade, self.url)
        self.engine = create_engine(self.url, pool_pre_ping=True)
        self._task = asyncio.create_task(self._loop())
        log.info("inspection log: writing to %s", self.engine.url.render_as_string(hide_password=True))

    def record(self, decided: Decided) -> None:
        """Queue one decision (never blocks, never raises)."""
        self.queue.put_nowait(decided.row())

    def _write(self, rows: list[dict]) -> None:
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.execute(insert(Inspection), rows)

    async def _flush(self, rows: list[dict]) -> None:
        """Write `rows`, retrying with backoff until the database takes them."""
        delay = 0.5
        while True:
            try:
                await asyncio.to_thread(self._write, rows)
                self.written += len(rows)
                return
            except Exception as exc:  # any DB/driver error: keep the rows, try again
                log.error("inspection log: writing %d rows failed (%s); retrying in %.1fs",
                          len(rows), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _loop(self) -> None:
        stop = False
        while not stop:
            batch = await collect(self.queue, self.batch_size, self.flush_s)
            rows = [row for row in batch if row is not None]
            stop = len(rows) < len(batch)  # `close` queued None: write what came before, then stop
            if rows:
                await self._flush(rows)

    async def close(self, timeout: float = 30.0) -> None:
        """Flush every row queued so far (up to `timeout`), then stop the writer."""
        if self._task is not None:
            self.queue.put_nowait(None)  # type: ignore[arg-type]  # the writer stops at it
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.error("inspection log: %d rows could not be written before shutdown",
                          self.queue.qsize())
        if self.engine is not None:
            self.engine.dispose()
        log.info("inspection log: %d rows written", self.written)


def _naive_utc(t: datetime | None) -> datetime | None:
    return t.astimezone(UTC).replace(tzinfo=None) if t is not None and t.tzinfo else t


def export_csv(url: str, out: Path, since: datetime | None = None, until: datetime | None = None) -> int:
    """Write the decisions with `since <= created_at < until` (UTC; aware datetimes are
    converted) to `out` as CSV; returns the number of rows."""
    since, until = (_naive_utc(t) for t in (since, until))
    engine = create_engine(url)
    query = select(*(getattr(Inspection, c) for c in COLUMNS)).order_by(Inspection.created_at, Inspection.id)
    if since is not None:
        query = query.where(Inspection.created_at >= since)
    if until is not None:
        query = query.where(Inspection.created_at < until)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with engine.connect() as conn, out.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in conn.execute(query):
                values = list(row)
                values[-1] = values[-1].isoformat()
                writer.writerow(values)
                n += 1
    finally:
        engine.dispose()
    return n

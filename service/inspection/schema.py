"""The inspection database: its tables and their Alembic migrations.

`Inspection` (one row per decision) and `Feedback` (an operator's verdict on a part scored
earlier), the engine every reader and writer opens (`engine_for`: bounded waits on
PostgreSQL), and the schema's upgrade to this release's newest revision, one process at a time
(`upgrade`; the revisions are in `service/inspection/migrations`). `service.inspection.log`
writes the rows; `service.inspection.quality` and `service.inspection.export` read them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

# Alembic at import, not in the shipper's thread: importing it from two threads at once (MLflow's
# store imports it too) can meet a partially initialised module.
from alembic import command as alembic_command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import DateTime, Float, Index, Integer, String, create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

MIGRATIONS = Path(__file__).parent / "migrations"
COLUMNS = ("request_id", "station", "category", "model_name", "model_version", "score",
           "normalized_score", "threshold", "threshold_source", "decision", "role", "latency_ms",
           "created_at")
VERDICTS = ("OK", "NG")
MAX_COMMENT = 2000  # characters of an operator's comment



class Base(DeclarativeBase):
    """Declarative base of the inspection-log tables."""


class Inspection(Base):
    """One decision the server made."""

    __tablename__ = "inspections"
    __table_args__ = (Index("ix_inspections_created_at", "created_at"),
                      Index("ix_inspections_request_id", "request_id"),
                      Index("ux_inspections_record_id", "record_id", unique=True))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # spool identity
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
    threshold_source: Mapped[str] = mapped_column(String(160), default="model", server_default="model")
    role: Mapped[str] = mapped_column(String(8), default="serve", server_default="serve")  # serve | shadow
    served_record_id: Mapped[str | None] = mapped_column(String(32), nullable=True)  # a shadow's answer


class Feedback(Base):
    """An operator's verdict on a part scored earlier (`request_id`)."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ux_feedback_record_id", "record_id", unique=True),
                      Index("ix_feedback_request_id", "request_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(String(32))
    request_id: Mapped[str] = mapped_column(String(128))
    verdict: Mapped[str] = mapped_column(String(2))  # "OK" | "NG"
    defect_type: Mapped[str] = mapped_column(String(128), default="", server_default="")
    operator: Mapped[str] = mapped_column(String(128), default="", server_default="")
    comment: Mapped[str] = mapped_column(String(MAX_COMMENT), default="", server_default="")
    station: Mapped[str] = mapped_column(String(128), default="", server_default="")
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # Who sent it: the name of the caller's API key, or anonymous@<address> without keys.
    sender: Mapped[str] = mapped_column(String(128), default="", server_default="")


TABLES: dict[str, type[Base]] = {"inspections": Inspection, "feedback": Feedback}



MIGRATION_LOCK = 0x616E6F6D616C7900  # PostgreSQL advisory lock key of the migrations ("anomaly")


class SchemaMismatch(RuntimeError):
    """The database is at a revision this release does not know (a newer one migrated it)."""


def _alembic_config(url: str):  # type: ignore[no-untyped-def]
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest schema revision this release knows."""
    return ScriptDirectory.from_config(_alembic_config("sqlite://")).get_current_head() or ""


# PostgreSQL waits bounded, so a hung database or peer is an error the shipper reports and
# retries, never a thread blocked for ever (which also kept the process from exiting): 10 s to
# connect, 30 s for any lock (the migration lock included), 2 min for a statement (the shipper's
# inserts; a migration's statements, over a large table, may take longer and are not limited).
POSTGRES_LIMITS = {"connect_timeout": 10, "options": "-c lock_timeout=30000"}
STATEMENT_TIMEOUT_MS = 120_000


def engine_for(url: str, *, statement_timeout_ms: int = STATEMENT_TIMEOUT_MS, **kwargs: object) -> Engine:
    """An engine for the inspection database at `url` (PostgreSQL: with POSTGRES_LIMITS and
    `statement_timeout_ms`, 0 = none)."""
    from sqlalchemy.engine import make_url

    limits: dict[str, object] = {}
    if make_url(url).get_backend_name() == "postgresql":
        limits = {**POSTGRES_LIMITS,
                  "options": f"{POSTGRES_LIMITS['options']} -c statement_timeout={statement_timeout_ms}"}
    return create_engine(url, connect_args=limits, **kwargs)  # type: ignore[arg-type]


class MigrationLockTimeout(RuntimeError):
    """Another process has held the migration lock longer than a lock may be waited for."""


def known_revisions() -> set[str]:
    """Every schema revision this release knows."""
    return {r.revision for r in ScriptDirectory.from_config(_alembic_config("sqlite://")).walk_revisions()}


def schema_state(url: str) -> tuple[str, set[str]]:
    """The schema revision of the database at `url` ('' when it has none yet) and its tables."""
    from sqlalchemy import inspect, text

    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            if "alembic_version" not in tables:
                return "", tables
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar() or "", tables
    finally:
        engine.dispose()


def current_revision(url: str) -> str:
    """The schema revision of the database at `url` ('' when it has none yet)."""
    return schema_state(url)[0]


@contextlib.contextmanager
def _one_migrator(engine: Engine) -> Iterator[None]:
    """Hold the migration lock of `engine`'s database: PostgreSQL's advisory lock MIGRATION_LOCK;
    for an SQLite file, an exclusive lock on `<file>.migration-lock` beside it (SQLite does not
    put Alembic's DDL in one transaction); none for other databases."""
    from sqlalchemy import text

    database = engine.url.database or ""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            try:
                conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
            except sa_exc.OperationalError as exc:
                if "lock timeout" not in str(exc):
                    raise
                raise MigrationLockTimeout(
                    "another session has held the inspection database's migration lock for "
                    f"{POSTGRES_LIMITS['options'].split('lock_timeout=')[1].split()[0]} ms (a migration in "
                    "progress, or a hung one: see pg_stat_activity)") from exc
            conn.commit()  # the lock is the session's: no transaction held open meanwhile
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                conn.commit()
    elif engine.dialect.name == "sqlite" and database not in ("", ":memory:"):
        import fcntl

        # Read-only: a lock file left by another user (`sudo anomaly db upgrade`) still locks.
        lock = os.open(f"{database}.migration-lock", os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)  # releases the lock
    else:
        yield


def upgrade(url: str) -> tuple[str, str]:
    """Create or migrate the schema at `url` to the newest Alembic revision; (before, after).

    One process at a time (`_one_migrator`), so replicas or a supervisor's children starting
    together do not collide on the first migration: the others wait, then find it done.

    Raises:
        SchemaMismatch: the database is at a revision this release does not know.
    """
    head = head_revision()
    before = current_revision(url)
    if before == head:  # the usual case: no lock to wait for
        return before, head
    engine = engine_for(url)
    try:
        with _one_migrator(engine):
            before = current_revision(url)  # another process may have done it meanwhile
            if before != head:
                try:
                    alembic_command.upgrade(_alembic_config(url), "head")
                except CommandError as exc:
                    if "Can't locate revision" not in str(exc):
                        raise
                    raise SchemaMismatch(
                        f"the inspection database is at schema revision {before!r}, which is not one of "
                        f"this release's (newest {head!r}): a newer release migrated it (run that "
                        "release), or it is another application's database (MLflow's keeps its "
                        "revision in the same table, alembic_version)") from exc
            return before, head
    finally:
        engine.dispose()



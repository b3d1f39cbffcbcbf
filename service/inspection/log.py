"""The inspection log: an optional server-side record of every decision, through SQLAlchemy.

Turn it on with `ANOMALY_INSPECTION_LOG=true` (SQLite file `inspections.db` by default) or
point `ANOMALY_INSPECTION_DB_URL` at any SQLAlchemy URL (`postgresql://user@host/db`).
The tables and their Alembic migrations are in `service.inspection.schema` (upgraded to head
at start-up); reading the log back, in `service.inspection.export` and `.quality`.

Nothing acknowledged is lost. Each decision is first appended to a local durable spool
(`service.inspection.spool`): a writer thread group-commits whatever is waiting (one fsync for all of
it) and, with `ANOMALY_INSPECTION_DURABILITY=sync` (the default), the response leaves the
server only after its decision is on disk. A shipper moves spooled rows to the database in
batches (up to `batch_size`, at least every `flush_s`) and checkpoints the spool after each
commit; rows carry a unique `record_id`, so a batch shipped twice (a crash between commit
and checkpoint) is inserted once.

- **Database down** (at start or later): rows wait in the spool; the shipper retries with
  backoff (0.5 s doubling to 30 s) and catches up when it is back. The spool is bounded
  (`ANOMALY_INSPECTION_SPOOL_MAX_MB`): a metric tracks it, and a log line warns at 50 %,
  80 % and 95 %; when full, requests are refused with UNAVAILABLE rather than answered
  unrecorded.
- **A row the database rejects** (too long, a constraint): the batch is retried row by row;
  each rejected row is set aside in `dead-letter.jsonl` in the spool folder with the
  database's reason (counted, logged at ERROR) and never blocks the rows behind it. So is a
  spooled record that cannot be read as a row at all (written by another release or by hand).
- **A database of a newer schema** (a newer release migrated it): not an outage; the
  shipper says so (`schema mismatch`, logged once, `anomaly_inspection_db_errors_total
  {kind="schema"}`), decisions keep being answered into the spool, and it looks again every
  minute. The schema is made and migrated by the first shipper to connect, one process at a
  time (a PostgreSQL advisory lock), or ahead of time with `anomaly db upgrade`.
- **Crash or SIGKILL**: on start the spool is replayed from its checkpoint.
- **A spool write the disk refuses** (full, EIO): that decision is refused (UNAVAILABLE)
  and the spool is cut back to its last good end, so later decisions are unharmed; **a
  damaged spool record** is set aside alone in `damaged-records.jsonl` (counted, logged at
  ERROR), never the records after it.
- **Graceful shutdown**: the shipper gets `close`'s timeout to catch up; whatever is left
  stays in the spool for the next start.

`async` durability acknowledges before the fsync (which follows within milliseconds); a
power cut can then lose the last acknowledged decisions.

This module is longer than most (about 480 lines, 80 of them this contract): `InspectionLog`'s
writer thread, shipper and failure handling share one state (the spool's read position, the
futures waiting on fsync, the counters behind the metrics), and each failure above is handled
where that state is. The tables and migrations (`schema`) and the readers (`export`,
`quality`) are apart.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import event, insert, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from service import metrics, tracing
from service.errors import NotReady
from service.inspection.schema import TABLES, SchemaMismatch, engine_for, upgrade
from service.inspection.spool import Spool, SpoolFull
from service.settings import Settings

log = logging.getLogger(__name__)
def _now() -> str:
    return datetime.now(timezone.utc).replace(tzinfo=None).isoformat()


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
    threshold_source: str = "model"
    role: str = "serve"  # "shadow": the challenger's decision on an image already answered
    served_record_id: str | None = None
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    table = "inspections"

    def row(self) -> dict:
        """The table row, stamped now (UTC)."""
        return {"record_id": self.record_id, "request_id": self.request_id, "station": self.station,
                "category": self.category,
                "model_name": self.model_name, "model_version": self.model_version, "score": self.score,
                "normalized_score": self.normalized_score, "threshold": self.threshold,
                "threshold_source": self.threshold_source, "decision": "NG" if self.anomalous else "OK",
                "role": self.role, "served_record_id": self.served_record_id,
                "latency_ms": self.latency_ms, "created_at": _now()}


@dataclass
class Verdict:
    """What `record` takes for operator feedback: the verdict on one past request id."""

    request_id: str
    verdict: str
    defect_type: str = ""
    operator: str = ""
    comment: str = ""
    station: str = ""
    sender: str = ""  # the caller's API key name (or anonymous@<address>): set by the server
    record_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    table = "feedback"

    def row(self) -> dict:
        """The table row, stamped now (UTC)."""
        return {"record_id": self.record_id, "request_id": self.request_id, "verdict": self.verdict,
                "defect_type": self.defect_type, "operator": self.operator, "comment": self.comment,
                "station": self.station, "sender": self.sender, "created_at": _now()}


SCHEMA_RETRY_S = 60.0  # how often a shipper facing a schema mismatch looks again
OUTAGES = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.DisconnectionError, sa_exc.TimeoutError,
           OSError)
ALARMS = (0.5, 0.8, 0.95)


def _is_outage(exc: BaseException) -> bool:
    """A database that cannot be reached (retry later) rather than one that refuses a row."""
    return isinstance(exc, OUTAGES) or (isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated)


def _sqlite_wal(engine: Engine) -> None:
    """SQLite: WAL journal (readers never block the writer, a crash never corrupts) and
    `synchronous=FULL`: a commit is on disk when it returns, because the spool checkpoint
    (and the deletion of shipped segments) follows it; NORMAL could lose the last commits
    to a power cut after their records left the spool."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()


def _from_json(record: bytes) -> dict:
    row = json.loads(record)
    row.setdefault("table", "inspections")  # spooled before feedback existed
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


MAX_TRACED_RECORDS = 20_000  # trace contexts kept for decisions not yet shipped (tracing on): ~10 MB


class InspectionLog:
    """Durable, batched recorder of `Inspection` rows (see the module docstring).

    Args:
        url: SQLAlchemy database URL.
        spool_dir: the local spool folder (one server per folder).
        max_spool_bytes: bound of the spool.
        durability: "sync" (fsync before `record` returns) or "async".
        batch_size: most rows per INSERT.
        flush_s: longest a spooled row waits for the shipper when the database is healthy.
    """

    def __init__(self, url: str, spool_dir: Path, *, max_spool_bytes: int = 1 << 30,
                 durability: str = "sync", batch_size: int = 500, flush_s: float = 0.2) -> None:
        self.url = url
        self.spool = Spool(spool_dir, max_spool_bytes)
        self.dead_letter_path = Path(spool_dir) / "dead-letter.jsonl"
        self.durability = durability
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.engine: Engine | None = None
        self.written = 0
        self.dead_letters = 0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._shipper: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._alarm = 0.0
        self.last_db_error = ""
        self._undecodable: set[bytes] = set()  # digests of records set aside as undecodable
        # With tracing on: record_id → the span context of the request that made the decision,
        # so its INSERT joins that request's trace. In memory only (the spool's format is not
        # touched, so older releases read it); decisions replayed after a restart ship untraced.
        self._traces: collections.OrderedDict[str, object] = collections.OrderedDict()
        self._traces_lock = threading.Lock()  # the loop adds, the shipper's thread removes

    @classmethod
    def from_settings(cls, settings: Settings) -> InspectionLog:
        """The inspection log the settings describe."""
        return cls(settings.inspection_db(), settings.spool_dir(),
                   max_spool_bytes=settings.inspection_spool_max_mb * 1024 * 1024,
                   durability=settings.inspection_durability)

    async def start(self) -> None:
        """Open (and replay) the spool and start the writer and the shipper. The database
        need not be up: the schema is migrated by the shipper when it first connects."""
        await asyncio.to_thread(self.spool.open)
        self._loop = asyncio.get_running_loop()
        self.engine = engine_for(self.url, pool_pre_ping=True)
        _sqlite_wal(self.engine)
        tracing.instrument_engine(self.engine)
        self._writer = threading.Thread(target=self._write_loop, name="inspection-spool", daemon=True)
        self._writer.start()
        self._shipper = asyncio.create_task(self._ship_loop())
        self._gauge()
        log.info("inspection log: spooling to %s (%s), shipping to %s", self.spool.folder, self.durability,
                 self.engine.url.render_as_string(hide_password=True))

    async def record(self, decided: Decided | Verdict) -> None:
        """Spool one decision (or operator verdict); in sync mode, return once it is fsync'd.

        Raises:
            NotReady: the spool is full (the database has been unreachable too long) or the
                disk refused the write; the decision is not acknowledged.
        """
        future = self._loop.create_future()
        row = decided.row()
        trace = tracing.anchor()
        if trace is not None:
            with self._traces_lock:
                self._traces[row["record_id"]] = trace
                while len(self._traces) > MAX_TRACED_RECORDS:
                    self._traces.popitem(last=False)
        self._inbox.put((json.dumps({**row, "table": decided.table}).encode(), future))
        if self.durability == "sync":
            await future
        else:
            future.add_done_callback(lambda f: f.exception() and log.error(
                "inspection log: a decision acknowledged early could not be spooled: %s", f.exception()))

    # -- the writer thread: group commit ---------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < 4096:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._inbox.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            error: Exception | None = None
            try:
                self.spool.append([record for record, _ in batch])
                metrics.INSPECTION_ROWS.labels("spooled").inc(len(batch))
            except SpoolFull as exc:
                metrics.INSPECTION_ROWS.labels("refused").inc(len(batch))
                error = NotReady(f"inspection log spool is full ({exc}); the database is unreachable "
                                 f"({self.last_db_error or 'see the server log'}); the decision was not "
                                 "made durable, so it is refused")
            except Exception as exc:  # a disk error, or anything else: refuse, never hang the requests
                metrics.INSPECTION_ROWS.labels("refused").inc(len(batch))
                log.error("inspection log: spooling %d decisions failed: %s", len(batch), exc)
                error = NotReady(f"inspection log spool write failed: {exc}")
            self._loop.call_soon_threadsafe(self._settle, [f for _, f in batch], error)

    def _settle(self, futures: list[asyncio.Future], error: Exception | None) -> None:
        for future in futures:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
        self._wake.set()
        self._gauge()

    def _gauge(self) -> None:
        fill = self.spool.pending_bytes / self.spool.max_bytes
        metrics.SPOOL_BYTES.set(self.spool.pending_bytes)
        metrics.SPOOL_FILL.set(fill)
        crossed = max((a for a in ALARMS if fill >= a), default=0.0)
        if crossed > self._alarm:
            log.error("inspection log spool is %.0f%% full (%d MB not yet in the database: %s); at 100%% "
                      "requests are refused", 100 * fill, self.spool.pending_bytes >> 20,
                      self.last_db_error or "the database is slow")
        self._alarm = crossed

    # -- the shipper -----------------------------------------------------------------------
    async def _ship_loop(self) -> None:
        delay = 0.5
        migrated = False
        while True:
            try:
                if not migrated:
                    await asyncio.to_thread(upgrade, self.url)
                    migrated = True
                records, position = await asyncio.to_thread(self.spool.read, None, self.batch_size)
                if records:
                    rows = [row for row in map(self._decode, records) if row is not None]
                    await asyncio.to_thread(self._ship_traced, rows)
                    await asyncio.to_thread(self.spool.commit, position)
                    self._gauge()
                    if self.last_db_error:
                        log.info("inspection log: database reachable again; catching up")
                    self.last_db_error = ""
                    delay = 0.5
                    continue
                if self._closing:
                    return
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.flush_s)
                except asyncio.TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except SchemaMismatch as exc:  # not an outage: an operator must act; retried slowly
                error = f"schema mismatch: {exc}"
                if error != self.last_db_error:
                    log.error("inspection log: %s; decisions are answered and wait in the spool (%d bytes) "
                              "until it is resolved; checking again every %.0fs", error,
                              self.spool.pending_bytes, SCHEMA_RETRY_S)
                self.last_db_error = error
                metrics.INSPECTION_DB_ERRORS.labels("schema").inc()
                if await self._pause(SCHEMA_RETRY_S):
                    return
            except Exception as exc:  # an outage (a rejection is handled inside _ship)
                self.last_db_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                metrics.INSPECTION_DB_ERRORS.labels("unavailable").inc()
                log.error("inspection log: database unavailable (%s); %d bytes wait in the spool; "
                          "retrying in %.1fs", self.last_db_error, self.spool.pending_bytes, delay)
                if await self._pause(delay):
                    return
                delay = min(delay * 2, 30.0)

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds` before trying the database again; True (stop now) when the log is
        closing: with the database failing there is nothing to catch up on, and a shutdown
        must not wait out a backoff (compose stops a container after 10 s)."""
        deadline = time.monotonic() + seconds
        while not self._closing:  # new decisions wake the shipper too: they do not end the pause
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return self._closing
        return True

    def _decode(self, record: bytes) -> dict | None:
        """A spooled record as a row; one that cannot be read as a row (written by another
        release, or by hand) is set aside in the dead letters with its bytes, once (its batch
        is read again after a failed insert), and skipped."""
        try:
            return _from_json(record)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            digest = hashlib.sha256(record).digest()
            if digest in self._undecodable:
                return None
            self._undecodable.add(digest)
            self._set_aside({"record": record.decode("utf-8", "backslashreplace")},
                            f"undecodable record: {type(exc).__name__}: {exc}", request_id="?")
            return None

    def _insert(self, rows: list[dict]) -> None:
        """Insert rows (of either table) in one transaction; a row already there (same
        record_id) is skipped."""
        assert self.engine is not None
        dialect = self.engine.dialect.name
        by_table: dict[str, list[dict]] = {}
        for row in rows:
            by_table.setdefault(row.get("table", "inspections"), []).append(
                {k: v for k, v in row.items() if k != "table"})
        with self.engine.begin() as conn:
            for name, table_rows in by_table.items():
                table = TABLES[name]
                upsert = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
                if upsert is not None:
                    conn.execute(upsert(table).on_conflict_do_nothing(index_elements=["record_id"]),
                                 table_rows)
                    continue
                ids = [r["record_id"] for r in table_rows]
                query = select(table.record_id).where(table.record_id.in_(ids))  # type: ignore[attr-defined]
                have = set(conn.execute(query).scalars())
                fresh = [r for r in table_rows if r["record_id"] not in have]
                if fresh:
                    conn.execute(insert(table), fresh)

    def _ship_traced(self, rows: list[dict]) -> None:
        """`_ship`, and with tracing on an `inspection.insert` span in each decision's trace."""
        if not tracing.enabled():
            self._ship(rows)
            return
        with self._traces_lock:
            parents = [(row, self._traces.get(row["record_id"])) for row in rows]
        system = self.engine.dialect.name if self.engine else ""
        start = time.time_ns()
        with tracing.linked("inspection.ship", [p for _, p in parents],
                            {"db.system": system, "inspection.rows": len(rows)}):
            self._ship(rows)  # an outage raises: the batch, and its traces, wait for the retry
        end = time.time_ns()
        with self._traces_lock:
            for row in rows:
                self._traces.pop(row["record_id"], None)
        for row, parent in parents:
            tracing.timed("inspection.insert", parent, start, end,
                          {"db.system": system, "db.sql.table": row.get("table", "inspections"),
                           "inspection.record_id": row["record_id"],
                           "inspection.batch_rows": len(rows)})

    def _ship(self, rows: list[dict]) -> None:
        """Insert a batch; when the database rejects it, row by row, setting rejected rows aside.

        Raises:
            Exception: an outage (nothing is checkpointed; the batch is retried later).
        """
        try:
            self._insert(rows)
            self.written += len(rows)
            metrics.INSPECTION_ROWS.labels("shipped").inc(len(rows))
            return
        except Exception as exc:
            if _is_outage(exc):
                raise
        for row in rows:
            try:
                self._insert([row])
                self.written += 1
                metrics.INSPECTION_ROWS.labels("shipped").inc()
            except Exception as exc:
                if _is_outage(exc):
                    raise
                self._dead_letter(row, exc)

    def _dead_letter(self, row: dict, exc: Exception) -> None:
        reason = f"{type(exc).__name__}: {str(getattr(exc, 'orig', None) or exc).splitlines()[0][:500]}"
        self._set_aside({"row": {**row, "created_at": row["created_at"].isoformat()}}, reason,
                        request_id=row.get("request_id"))

    def _set_aside(self, what: dict, reason: str, request_id: object) -> None:
        entry = {**what, "reason": reason[:1000], "at": datetime.now(timezone.utc).isoformat()}
        with self.dead_letter_path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.dead_letters += 1
        metrics.INSPECTION_ROWS.labels("dead_letter").inc()
        log.error("inspection log: the row of request_id=%r cannot be stored (%s); set aside in %s",
                  request_id, reason[:500], self.dead_letter_path)

    async def close(self, timeout: float = 30.0) -> None:
        """Stop spooling, give the shipper up to `timeout` to catch up, then stop it. Rows it
        could not ship stay in the spool and are shipped at the next start."""
        if self._writer is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._writer.join)
        if self._shipper is not None:
            self._closing = True
            self._wake.set()
            deadline = time.monotonic() + timeout
            try:
                await asyncio.wait_for(asyncio.shield(self._shipper), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                self._shipper.cancel()
                await asyncio.gather(self._shipper, return_exceptions=True)
            if self.spool.pending_bytes:
                log.error("inspection log: %d bytes of decisions are still in the spool %s (database: %s); "
                          "they will be shipped at the next start", self.spool.pending_bytes,
                          self.spool.folder, self.last_db_error or "slow")
        if self.engine is not None:
            self.engine.dispose()
        self.spool.close()
        log.info("inspection log: %d rows written, %d set aside", self.written, self.dead_letters)



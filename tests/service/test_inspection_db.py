"""The inspection database's schema, driven from outside: several processes making it at once
(a supervisor's children, replicas starting together), `anomaly db upgrade` / `anomaly db
current`, and a database migrated by a newer release than the server's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import fresh_postgres_database, metric_sum
from sqlalchemy import create_engine, inspect, text

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, start_server
from service.inspection.schema import head_revision
from service.inspection.spool import Spool

ROOT = Path(__file__).resolve().parents[2]
MIGRATE = "import sys; from service.inspection.schema import upgrade; upgrade(sys.argv[1])"
PROCESSES = 4


def migrate_at_once(url: str) -> list[tuple[int, str]]:
    """PROCESSES interpreters migrating `url` at the same moment; (status, stderr) of each."""
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, url], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True) for _ in range(PROCESSES)]
    return [(p.wait(180), p.stderr.read()[-1500:]) for p in procs]


def assert_at_head(url: str) -> None:
    engine = create_engine(url)
    try:
        assert {"inspections", "feedback", "alembic_version"} <= set(inspect(engine).get_table_names())
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == \
                [head_revision()]
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_processes_making_the_schema_at_once_all_succeed(backend: str, tmp_path: Path) -> None:
    """Without a lock, concurrent first migrations collide (a duplicate table or version row)
    and all but one process fail, or recover only by retrying."""
    for attempt in range(3):  # a race: a few rounds, each on a fresh database
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / f'race-{attempt}.db'}"
            results = migrate_at_once(url)
            assert all(rc == 0 for rc, _ in results), results
            assert_at_head(url)
        else:
            with fresh_postgres_database("race") as url:
                results = migrate_at_once(url)
                assert all(rc == 0 for rc, _ in results), results
                assert_at_head(url)


def anomaly(*args: str) -> subprocess.CompletedProcess:
    """The `anomaly` command line, as an operator runs it."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def set_revision(url: str, revision: str) -> None:
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()


def revision_of(url: str) -> str:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()


def test_db_upgrade_and_current_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'inspections.db'}"
    head = head_revision()
    missing = anomaly("db", "current", "--db", url)
    assert missing.returncode == 4 and "(none)" in missing.stdout and "anomaly db upgrade" in missing.stderr
    made = anomaly("db", "upgrade", "--db", url)
    assert made.returncode == 0 and f"(none) → {head}" in made.stdout, made.stderr
    assert_at_head(url)
    again = anomaly("db", "upgrade", "--db", url)
    assert again.returncode == 0 and "up to date" in again.stdout
    assert anomaly("db", "current", "--db", url).returncode == 0

    set_revision(url, "ffffffffffff")  # as a newer release would leave it
    newer = anomaly("db", "current", "--db", url)
    assert newer.returncode == 3 and "newer" in newer.stderr
    refused = anomaly("db", "upgrade", "--db", url)
    assert refused.returncode == 3 and "newer release" in refused.stderr and "Traceback" not in refused.stderr
    assert revision_of(url) == "ffffffffffff"  # left as it was

    down = anomaly("db", "upgrade", "--db", "postgresql://nobody:secret@127.0.0.1:1/none")
    assert down.returncode == 5 and "cannot migrate" in down.stderr and "Traceback" not in down.stderr
    assert "secret" not in down.stderr + down.stdout  # the password is never printed
    # Not a URL: 1; a database that cannot be opened: 5, the CLI's code for "could not be reached".
    for bad, code in (("postgresql://nobody:secret@127.0.0.1:port/none", 1),
                      ("sqlite:////no/such/folder/x.db", 5)):
        for command in ("upgrade", "current"):
            said = anomaly("db", command, "--db", bad)
            assert said.returncode == code and "Traceback" not in said.stderr, said.stderr[-1500:]
            assert "secret" not in said.stderr + said.stdout

    # Tables but no revision: a migration cut short (SQLite's DDL is not one transaction), or
    # another application's tables. Not "run anomaly db upgrade", which cannot succeed.
    half = f"sqlite:///{tmp_path / 'half.db'}"
    engine = create_engine(half)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE inspections (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    stuck = anomaly("db", "current", "--db", half)
    assert stuck.returncode == 3 and "interrupted" in stuck.stderr, stuck.stderr


def start_logging_server(store, db_url: str, tmp_path: Path, spool: Path, **env: str) -> tuple:
    metrics_port = free_port()
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": db_url,
                                      "ANOMALY_INSPECTION_SPOOL_DIR": str(spool),
                                      "ANOMALY_METRICS_PORT": str(metrics_port), **env})
    return child, target, f"http://127.0.0.1:{metrics_port}/metrics"


def test_a_database_of_a_newer_schema_is_named_and_decisions_wait_in_the_spool(
        store, good_and_defect, tmp_path: Path) -> None:
    """Not "database unavailable" retried forever: the server says what is wrong, keeps
    answering, leaves the database alone, and ships once an operator has put it right."""
    url = f"sqlite:///{tmp_path / 'inspections.db'}"
    assert anomaly("db", "upgrade", "--db", url).returncode == 0
    set_revision(url, "ffffffffffff")
    spool = tmp_path / "spool"
    child, target, metrics = start_logging_server(store, url, tmp_path, spool)
    ids = [f"newer-{i}" for i in range(3)]
    try:
        with AnomalyClient(target) as client:
            for request_id, image in zip(ids, good_and_defect[1], strict=False):
                assert client.score(image, request_id=request_id).request_id == request_id
        deadline = time.monotonic() + 30
        while metric_sum(metrics, 'anomaly_inspection_db_errors_total{kind="schema"}', default=0.0) < 1:
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert metric_sum(metrics, "anomaly_inspection_spool_bytes") > 0
    finally:
        assert child.stop() == 0
    log_text = (tmp_path / "server.log").read_text()
    assert "schema mismatch" in log_text and "ffffffffffff" in log_text
    assert "database unavailable" not in log_text
    assert log_text.count("inspection log: schema mismatch") == 1  # said once, not at every look
    assert revision_of(url) == "ffffffffffff"  # the server changed nothing
    assert not _request_ids(url)

    set_revision(url, head_revision())  # the operator restores the database
    child, target, metrics = start_logging_server(store, url, tmp_path, spool)
    try:
        deadline = time.monotonic() + 30
        while set(_request_ids(url)) != set(ids):
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        assert child.stop() == 0


def _request_ids(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT request_id FROM inspections")).scalars().all()
    finally:
        engine.dispose()


def test_an_undecodable_spool_record_is_set_aside_and_the_rest_shipped(
        store, good_and_defect, tmp_path: Path) -> None:
    """A spooled record that is not a row (another release's, or edited by hand) went to the
    catch-all as "database unavailable": retried forever, the spool filling behind it."""
    url = f"sqlite:///{tmp_path / 'inspections.db'}"
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, max_bytes=1 << 20)
    spool.open()
    spool.append([b"{not json", b'{"request_id": "no-time"}', b"[1, 2]"])
    spool.close()
    child, target, metrics = start_logging_server(store, url, tmp_path, spool_dir)
    try:
        with AnomalyClient(target) as client:
            client.score(good_and_defect[0][0], request_id="after-1")
            client.score(good_and_defect[1][0], request_id="after-2")
        deadline = time.monotonic() + 30
        while sorted(_request_ids(url)) != ["after-1", "after-2"] or \
                metric_sum(metrics, "anomaly_inspection_spool_bytes") > 0:
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        assert metric_sum(metrics, 'anomaly_inspection_rows_total{outcome="dead_letter"}') == 3
    finally:
        assert child.stop() == 0
    set_aside = [json.loads(line) for line in (spool_dir / "dead-letter.jsonl").read_text().splitlines()]
    assert [e["record"] for e in set_aside] == ["{not json", '{"request_id": "no-time"}', "[1, 2]"]
    assert all(e["reason"].startswith("undecodable record") for e in set_aside)
    assert "database unavailable" not in (tmp_path / "server.log").read_text()


def test_a_server_stops_promptly_while_its_database_is_down(store, good_and_defect, tmp_path: Path) -> None:
    """The shipper's backoff (up to 30 s) ignored the shutdown: with the database down, a stop
    waited out the inspection log's 10 s, and compose (10 s by default) SIGKILLed the server."""
    password = tmp_path / "password"
    password.write_text("p@ss/word\r\n")  # a secret file as an editor on Windows leaves it
    url = f"postgresql://mlflow@127.0.0.1:{free_port()}/inspections"  # nothing listens there
    child, target, metrics = start_logging_server(
        store, url, tmp_path, tmp_path / "spool", ANOMALY_INSPECTION_DB_PASSWORD_FILE=str(password))
    try:
        with AnomalyClient(target) as client:
            for i, image in enumerate(good_and_defect[0][:2]):
                client.score(image, request_id=f"down-{i}")
        time.sleep(18)  # the shipper is in its 16 s backoff now
        assert metric_sum(metrics, 'anomaly_inspection_db_errors_total{kind="unavailable"}') >= 4
        stopping = time.monotonic()
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(30) == 0
        took = time.monotonic() - stopping
    finally:
        child.stop()
    assert took < 8, f"stopping took {took:.1f} s"
    log_text = (tmp_path / "server.log").read_text()
    assert "bytes of decisions are still in the spool" in log_text  # and it says what it leaves
    assert "p@ss" not in log_text  # the password from the file is never logged


def test_a_missing_password_file_stops_the_server_at_start(store, tmp_path: Path) -> None:
    """Not a server that starts with an empty password and spools forever."""
    env = {**os.environ, "ANOMALY_INSPECTION_LOG": "true",
           "ANOMALY_INSPECTION_DB_URL": "postgresql://mlflow@127.0.0.1:5432/inspections",
           "ANOMALY_INSPECTION_DB_PASSWORD_FILE": str(tmp_path / "absent"),
           "ANOMALY_CACHE_DIR": str(tmp_path / "cache")}
    started = subprocess.run([sys.executable, "-m", "cli.main", "serve", "--tracking-uri", store.tracking_uri,
                              "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
    assert started.returncode != 0
    assert "ANOMALY_INSPECTION_DB_PASSWORD_FILE" in started.stderr and "Traceback" not in started.stderr, \
        started.stderr[-2000:]


def test_the_password_file_goes_into_the_url_encoded() -> None:
    from sqlalchemy.engine import make_url

    from service.settings import Settings

    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("p@ss/w%rd:1\n")
        f.flush()
        url = Settings(inspection_db_url="postgresql://mlflow@db:5432/inspections",
                       inspection_db_password_file=Path(f.name)).inspection_db()
    parsed = make_url(url)
    assert (parsed.password, parsed.host, parsed.database) == ("p@ss/w%rd:1", "db", "inspections")


@pytest.mark.heavy  # waits out a lock bound by design, about 35 s: not in the fast loop
def test_the_migration_lock_is_waited_for_within_a_bound(tmp_path: Path) -> None:
    """A session holding the migration lock (a hung migration) made every shipper wait for
    ever, silently, and kept the server from exiting; an up-to-date database waited too."""
    import psycopg

    from service.inspection.schema import MIGRATION_LOCK

    with fresh_postgres_database("lock") as ready, fresh_postgres_database("lock") as empty:
        assert anomaly("db", "upgrade", "--db", ready).returncode == 0
        # Advisory locks are per database: a hung migrator in each.
        with psycopg.connect(ready, autocommit=True) as held, \
                psycopg.connect(empty, autocommit=True) as held2:
            for session in (held, held2):
                session.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            started = time.monotonic()
            current = anomaly("db", "upgrade", "--db", ready)  # up to date: no lock needed
            assert current.returncode == 0 and "up to date" in current.stdout, current.stderr
            assert time.monotonic() - started < 20
            waited = anomaly("db", "upgrade", "--db", empty)  # needs the lock: waits 30 s, then says so
            assert waited.returncode == 1 and "migration lock" in waited.stderr, waited.stderr[-1500:]
            assert "Traceback" not in waited.stderr
        assert anomaly("db", "upgrade", "--db", empty).returncode == 0  # released: it goes on
        assert_at_head(empty)

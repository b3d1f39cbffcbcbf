"""A server never migrates the registry (issue 37, point 4).

A store made by an older MLflow schema (built here with MLflow's own migrations, stopped one
revision short of the installed head, as an older trainer leaves it): a real server started
on it does not open it, says why (`GetModel.last_error`, naming `mlflow db upgrade`), and
leaves the file byte for byte as it was. Before this, MLflow's SQL store found a newer table
missing and ran every migration on open."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import grpc
import pytest
from conftest import wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import ChildProcess, free_port
from service.repository.registry_schema import expected_revision, schema_problem


def older_store(path: Path) -> tuple[str, str]:
    """An SQLite MLflow store at the revision before the installed head; (uri, revision)."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    uri = f"sqlite:///{path}"
    engine = sa.create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    head = ScriptDirectory.from_config(config).get_revision(expected_revision(uri))
    previous = head.down_revision if isinstance(head.down_revision, str) else head.down_revision[0]
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, previous)
    engine.dispose()
    return uri, previous


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_schema_problem_reads_without_writing(tmp_path: Path) -> None:
    """The check itself: an older store is named with both revisions and the command that
    upgrades it; a new (absent) or empty database is left to MLflow; an HTTP tracking server
    is not the server's to check; nothing is written."""
    uri, previous = older_store(tmp_path / "old.db")
    before = digest(tmp_path / "old.db")
    problem = schema_problem(uri)
    assert previous in problem and expected_revision(uri) in problem and "mlflow db upgrade" in problem
    assert digest(tmp_path / "old.db") == before
    assert schema_problem(f"sqlite:///{tmp_path / 'absent.db'}") == ""
    assert not (tmp_path / "absent.db").exists()
    sqlite3.connect(tmp_path / "empty.db").close()
    assert schema_problem(f"sqlite:///{tmp_path / 'empty.db'}") == ""
    assert schema_problem("http://127.0.0.1:5000") == ""
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    assert "cannot read the schema" in schema_problem(f"sqlite:///{garbage}")


@pytest.mark.timeout(300)
def test_a_server_on_an_older_registry_schema_leaves_it_unchanged_and_says_why(tmp_path: Path) -> None:
    store = tmp_path / "mlflow.db"
    uri, previous = older_store(store)
    before = digest(store)
    port = free_port()
    server = ChildProcess(["serve", "--tracking-uri", uri, "--host", "127.0.0.1", "--port", str(port),
                           "--cache-dir", str(tmp_path / "cache")], tmp_path / "server.log",
                          {"ANOMALY_POLL_INTERVAL_S": "0.5"})
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)

            def refused() -> pb.ModelInfo | None:
                try:
                    info = stub.GetModel(pb.GetModelRequest(alias="champion"), timeout=5)
                except grpc.RpcError:
                    return None
                return info if "mlflow db upgrade" in info.last_error else None

            info = wait_for(refused, timeout=120, what="the refusal to open an older registry schema")
            assert info.state == "NOT_SERVING" and previous in info.last_error
            # Not ready, but alive: what the Kubernetes readiness and liveness probes ask.
            health = health_pb2_grpc.HealthStub(ch)
            check, answer = health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
            assert health.Check(check(service=""), timeout=5).status == answer.NOT_SERVING
            assert health.Check(check(service="liveness"), timeout=5).status == answer.SERVING
    finally:
        server.stop()
    assert digest(store) == before
    with sqlite3.connect(store) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()[0] == previous
    assert "a server never migrates the registry" in (tmp_path / "server.log").read_text()

"""MLflow on PostgreSQL, for real: a fresh database on the machine's PostgreSQL
(127.0.0.1:5432, user postgres; `ANOMALY_TEST_POSTGRES` overrides), a real `mlflow server`
with that backend store and artifacts it serves from a local folder, the registry code
registering through it, and our gRPC server following an alias moved through it.

PostgreSQL is part of the development and CI machines, so it being unreachable is a
failure here, not a skip.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from conftest import fresh_postgres_database, mlflow_server_process, reference_set, tracking_uri

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import start_server


@pytest.fixture(scope="module")
def database() -> str:
    """A new, empty database; dropped afterwards."""
    with fresh_postgres_database("mlflow_test") as url:
        yield url


@pytest.fixture(scope="module")
def mlflow_server(database: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`mlflow server` on the PostgreSQL backend store, serving artifacts from a folder."""
    with mlflow_server_process(database, tmp_path_factory.mktemp("mlflow-pg")) as (url, _):
        yield url


def _rows(database: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(database) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.timeout(300)
def test_registry_on_postgres_and_server_follows_alias(store, database: str, mlflow_server: str,
                                                       good_and_defect, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from registry.mlflow_registry import log_and_register

    build = store.build
    local = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    parts = reference_set(store, local, tmp_path)  # the promotion gate checks the move against them
    with tracking_uri(mlflow_server):
        first = log_and_register(build.onnx_path, build.metadata, params={"copy": 1},
                                 metrics={"image_auroc": 0.9}, aliases=("champion",), reference=parts)
        second = log_and_register(build.onnx_path, build.metadata, params={"copy": 2},
                                  metrics={"image_auroc": 0.9}, reference=parts)
    assert (first.version, second.version) == ("1", "2")

    # The registry really lives in PostgreSQL.
    aliases = dict(_rows(database, "SELECT alias, version FROM registered_model_aliases"))
    assert aliases["champion"] == 1 and aliases["stfpm-fp32"] == 2
    assert _rows(database, "SELECT count(*) FROM model_versions") == [(2,)]

    child, target = start_server(mlflow_server, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_POLL_INTERVAL_S": "0.5"})
    image = good_and_defect[1][0].read_bytes()
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.AnomalyDetectionStub(channel)
            assert stub.Score(pb.ScoreRequest(encoded=image), timeout=30).model.version == "1"
            MlflowClient(tracking_uri=mlflow_server).set_registered_model_alias(
                store.model_name, "champion", "2")  # what the MLflow UI does
            t0 = time.monotonic()
            while stub.Score(pb.ScoreRequest(encoded=image), timeout=30).model.version != "2":
                assert time.monotonic() - t0 < 30, "server did not follow the alias"
                time.sleep(0.1)
            info = stub.GetModel(pb.GetModelRequest(alias="champion"), timeout=10)
            assert info.ref.version == "2" and info.source_uri.startswith("models:/")
    finally:
        assert child.stop() == 0
    assert _rows(database, "SELECT version FROM registered_model_aliases WHERE alias = 'champion'") == [(2,)]

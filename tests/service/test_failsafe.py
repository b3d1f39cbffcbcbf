"""The three faults reproduced from outside (issue 16), each against real processes.

1. a 1 GiB chunked body sent to the gateway must not grow its memory;
2. one over-long request id must not stop the inspection log (PostgreSQL);
3. a version whose `MLmodel` is not valid YAML must not kill the alias watcher.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from conftest import fresh_postgres_database, register_mutated, wait_alias_error
from mlflow import MlflowClient
from sqlalchemy import create_engine, text

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import peak_rss_mb, start_gateway, start_server
from loadtests.soak import send_chunked


def test_gateway_memory_flat_under_a_1gib_chunked_body(grpc_target: str, tmp_path: Path) -> None:
    child, base = start_gateway(grpc_target, tmp_path / "gateway.log")
    try:
        port = int(base.rsplit(":", 1)[1])
        before = peak_rss_mb(child.proc.pid)
        answer, sent = send_chunked("127.0.0.1", port, 1 << 30)
        growth = peak_rss_mb(child.proc.pid) - before
        assert growth < 64, f"gateway peak RSS grew {growth:.0f} MB after {sent >> 20} MiB sent"
        assert sent < 256 << 20, f"the gateway read {sent >> 20} MiB before refusing"
        if answer:  # the answer may be lost if the close overtakes it; memory is the point
            assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
            assert b"application/problem+json" in answer
        import httpx
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200  # still serving
    finally:
        child.stop()


def _rows(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(text("SELECT request_id FROM inspections ORDER BY id"))]
    except Exception:  # table not there yet
        return []
    finally:
        engine.dispose()


def test_long_request_id_does_not_stop_the_inspection_log(store, good_and_defect, tmp_path: Path) -> None:
    image = good_and_defect[0][0].read_bytes()
    with fresh_postgres_database("longid") as url:
        child, target = start_server(store.tracking_uri, tmp_path / "server.log",
                                     cache_dir=tmp_path / "cache",
                                     env={"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": url,
                                          "ANOMALY_INSPECTION_SPOOL_DIR": str(tmp_path / "spool")})
        try:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.AnomalyDetectionStub(ch)
                answered = []
                try:
                    stub.Score(pb.ScoreRequest(encoded=image, request_id="x" * 201), timeout=30)
                    answered.append("x" * 201)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
                for i in range(5):
                    answered.append(stub.Score(pb.ScoreRequest(encoded=image, request_id=f"after-{i}"),
                                               timeout=30).request_id)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                rows = _rows(url)
                if {f"after-{i}" for i in range(5)} <= set(rows):
                    break
                time.sleep(0.2)
            assert {f"after-{i}" for i in range(5)} <= set(_rows(url)), _rows(url)
        finally:
            assert child.stop() == 0, (tmp_path / "server.log").read_text()[-3000:]


@pytest.fixture()
def mlflow_client(store) -> MlflowClient:
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def test_malformed_mlmodel_does_not_kill_the_watcher(store, other_architectures, mlflow_client,
                                                     good_and_defect, tmp_path: Path) -> None:
    alias = "yaml-canary"
    good_next = other_architectures["rd"].registered.version

    def bad_yaml(folder: Path) -> None:
        (folder / "MLmodel").write_text("flavors: {onnx: [unclosed\n  : : :\n")

    broken = register_mutated(store, mlflow_client, bad_yaml, tmp_path)
    mlflow_client.set_registered_model_alias(store.model_name, alias, store.version)
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env={"ANOMALY_POLL_INTERVAL_S": "0.3"})
    request = pb.ScoreRequest(encoded=good_and_defect[0][0].read_bytes())
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            mlflow_client.set_registered_model_alias(store.model_name, alias, broken)
            info = wait_alias_error(stub, alias, broken, request, store.version)
            assert info.last_error_version == broken and "MLmodel" in info.last_error, info
            assert info.ref.version == store.version
            mlflow_client.set_registered_model_alias(store.model_name, alias, good_next)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if stub.Score(request, timeout=30).model.version == good_next:
                    break
                time.sleep(0.2)
            assert stub.Score(request, timeout=30).model.version == good_next
    finally:
        mlflow_client.set_registered_model_alias(store.model_name, alias, store.version)
        assert child.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert " ERROR " in log and "MLmodel" in log, log[-3000:]

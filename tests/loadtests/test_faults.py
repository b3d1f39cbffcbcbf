"""Faults: the registry going away under a serving server, and the gateway with no server.

Real processes on loopback: an `mlflow server` (SQLite backend) that is killed mid-run, our
gRPC server following it, and a gateway pointed at a port where nothing listens.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import grpc
import httpx
from conftest import mlflow_server_process, tracking_uri
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import ChildProcess, free_port, start_server, wait_http_ready


def test_registry_stopped_scoring_and_readiness_hold(store, good_and_defect, tmp_path: Path) -> None:
    from registry.mlflow_registry import log_and_register

    image = good_and_defect[1][0].read_bytes()
    with mlflow_server_process(f"sqlite:///{tmp_path / 'reg.db'}", tmp_path) as (url, registry):
        with tracking_uri(url):
            version = log_and_register(store.build.onnx_path, store.build.metadata, params={},
                                       metrics={}, aliases=("champion",)).version
        child, target = start_server(url, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                     env={"ANOMALY_POLL_INTERVAL_S": "0.3"})
        try:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.AnomalyDetectionStub(ch)
                health = health_pb2_grpc.HealthStub(ch)
                assert stub.Score(pb.ScoreRequest(encoded=image), timeout=10).model.version == version
                registry.signal(signal.SIGKILL)  # the registry (and its workers) vanish
                registry.proc.wait(10)
                stop = time.monotonic() + 4.0  # > 10 poll intervals against a dead registry
                n = 0
                while time.monotonic() < stop:
                    r = stub.Score(pb.ScoreRequest(encoded=image), timeout=10)
                    assert r.model.version == version
                    assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING
                    n += 1
                assert n > 10
                info = stub.GetModel(pb.GetModelRequest(alias="champion"), timeout=10)
                assert info.ref.version == version
        finally:
            assert child.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert "registry unreachable" in log, log[-2000:]


def test_gateway_with_server_down_answers_503_quickly(tmp_path: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    port = free_port()
    child = ChildProcess(["gateway", "--grpc-target", nowhere, "--host", "127.0.0.1", "--port", str(port)],
                         tmp_path / "gateway.log")
    child.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(f"{base}/healthz", 60, child.proc)  # up (liveness), though not ready
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.headers["content-type"].startswith("application/problem+json")
        assert ready.headers["retry-after"] == "5"
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/score", content=b"\x89PNG...", timeout=30,
                       headers={"content-type": "image/png"})
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.json()["grpc_status"] == "UNAVAILABLE" and elapsed < 5.0, (elapsed, r.text)
        assert r.headers["retry-after"] == "5"
        v2 = httpx.post(f"{base}/v2/models/anomaly-detector/infer", json={"inputs": []}, timeout=30)
        assert v2.status_code in (400, 503) and v2.headers.get("retry-after") == (
            "5" if v2.status_code == 503 else None), v2.text
    finally:
        child.stop()

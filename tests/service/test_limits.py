"""Bounded input end to end, identifiers at the door, fail closed (issue 16, points 1–3).

Real server and gateway processes on loopback, real images; after each refusal a good
request must still succeed.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import register_tiny, wait_alias_error
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient
from PIL import Image

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from edge_anomaly_client.sdk import AnomalyClient, AnomalyError
from loadtests.launch import free_port, start_server


def _png(width: int, height: int, seed: int = 0) -> bytes:
    """Many pixels in few bytes (a flat colour compresses to almost nothing)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (seed * 40 % 256, 120, 90)).save(buf, format="PNG")
    return buf.getvalue()


def test_declared_content_length_over_the_limit_is_refused_unread(http_base: str) -> None:
    host, port = http_base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1073741824\r\n\r\n" + b"\0" * 1000)
        answer = b""
        while b"}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"declares 1073741824 bytes" in answer and b"application/problem+json" in answer
    assert httpx.get(f"{http_base}/readyz", timeout=10).status_code == 200


def test_stream_cap_refuses_extra_streams_and_scoring_and_health_still_answer(store, good_and_defect,
                                                                               tmp_path: Path) -> None:
    """Streams have their own cap (`service.protocol.grpc.admission`): line cameras' streams held open up
    to it leave unary scoring and health checks answering; one more stream is refused."""
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_MAX_CONCURRENT_RPCS": "2", "ANOMALY_MAX_STREAMS": "2"})
    image = good_and_defect[0][0].read_bytes()

    async def main() -> tuple[grpc.StatusCode, int, str]:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            streams = [stub.ScoreStream() for _ in range(2)]  # line cameras' streams, held open
            for s in streams:
                await s.write(pb.ScoreRequest(encoded=image, request_id="held"))
                assert (await s.read()).request_id == "held"
            extra = stub.ScoreStream()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await extra.write(pb.ScoreRequest(encoded=image))
                await extra.read()
            scored = await stub.Score(pb.ScoreRequest(encoded=image), timeout=10)
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            for s in streams:
                await s.done_writing()
                assert await s.read() == grpc.aio.EOF
            return refused.value.code(), health.status, scored.model.version + refused.value.details()

    try:
        code, status, detail = asyncio.run(main())
    finally:
        child.stop()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "ANOMALY_MAX_STREAMS" in detail
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_decode_memory_budget(store, tmp_path: Path) -> None:
    """A 40 MB budget: an image that alone needs more is INVALID_ARGUMENT; concurrent big
    images beyond the budget get RESOURCE_EXHAUSTED, never an out-of-memory; small ones pass."""
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_DECODE_MEMORY_MB": "40", "ANOMALY_DECODE_WAIT_S": "0",
                                      "ANOMALY_MAX_CONCURRENT_RPCS": "32"})
    too_big, big, small = _png(4000, 3000), _png(2600, 2400, 1), _png(160, 160, 2)

    async def main() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)

            async def one(data: bytes) -> grpc.StatusCode:
                try:
                    await stub.Score(pb.ScoreRequest(encoded=data), timeout=60)
                    return grpc.StatusCode.OK
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    assert "decode memory busy" in exc.details(), exc.details()
                    return exc.code()

            return await asyncio.gather(*(one(big) for _ in range(12)))

    try:
        with AnomalyClient(target, retries=0) as client:
            with pytest.raises(AnomalyError) as info:
                client.score(too_big)
            assert info.value.code == "INVALID_ARGUMENT" and "decode budget (40 MB" in info.value.message
            codes = asyncio.run(main())
            assert grpc.StatusCode.OK in codes and grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
            assert client.score(small).model.version == store.version
    finally:
        child.stop()


def test_sdk_checks_identifiers_before_sending(tmp_path: Path) -> None:
    nowhere = f"127.0.0.1:{free_port()}"  # nothing listens: a call would be UNAVAILABLE
    with AnomalyClient(nowhere, retries=0, timeout=2) as client:
        for kwargs, text in (({"request_id": "x" * 129}, "129 characters"),
                             ({"station": "line\n1"}, "non-printable character U+000A")):
            with pytest.raises(AnomalyError) as info:
                client.score(b"\x89PNG", **kwargs)
            assert info.value.code == "INVALID_ARGUMENT" and text in info.value.message


@pytest.fixture(scope="module")
def nan_server(store, tmp_path_factory):
    """A server following `nan-canary`, which points at a model that passes validation and
    produces NaN for an all-black image."""
    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    work = tmp_path_factory.mktemp("nan")
    version = register_tiny(store, "nan_on_black", work, aliases=("nan-canary",))
    metrics_port = free_port()
    db = f"sqlite:///{work / 'inspections.db'}"
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=work / "cache",
                                 alias="nan-canary",
                                 env={"ANOMALY_METRICS_PORT": str(metrics_port),
                                      "ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": db,
                                      "ANOMALY_POLL_INTERVAL_S": "0.3"})
    yield target, version, metrics_port, db, client, work
    child.stop()


def test_nonfinite_score_is_never_a_decision(nan_server, store) -> None:
    target, version, metrics_port, db, _, work = nan_server
    black = io.BytesIO()
    Image.new("RGB", (128, 128)).save(black, format="PNG")
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.AnomalyDetectionStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(pb.ScoreRequest(encoded=black.getvalue(), request_id="black-1"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "non-finite" in info.value.details() and f"version {version}" in info.value.details()
        gray = io.BytesIO()
        Image.new("RGB", (128, 128), (90, 90, 90)).save(gray, format="PNG")
        ok = stub.Score(pb.ScoreRequest(encoded=gray.getvalue(), request_id="gray-1"), timeout=30)
        assert ok.model.version == version and np.isfinite(ok.score)
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    assert f'anomaly_nonfinite_outputs_total{{name="{store.model_name}",version="{version}"}} 1.0' in text
    from sqlalchemy import create_engine
    from sqlalchemy import text as sql

    engine = create_engine(db)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with engine.connect() as conn:
                ids = [r[0] for r in conn.execute(sql("SELECT request_id FROM inspections"))]
            if "gray-1" in ids:
                break
        except Exception:
            pass
        time.sleep(0.2)
    engine.dispose()
    assert ids == ["gray-1"]  # the NaN request left no decision behind
    log = (work / "server.log").read_text()
    assert "non-finite" in log and "request_id=black-1" in log


def test_version_with_nonfinite_validation_outputs_is_never_swapped_in(nan_server, store,
                                                                        tmp_path: Path) -> None:
    target, version, _, _, client, _ = nan_server
    bad = register_tiny(store, "nan", tmp_path)
    client.set_registered_model_alias(store.model_name, "nan-canary", bad)
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            info = wait_alias_error(stub, "nan-canary", bad)
            assert info.last_error_version == bad and "non-finite" in info.last_error, info
            assert info.ref.version == version and info.state == "SERVING"
            gray = io.BytesIO()
            Image.new("RGB", (64, 64), (90, 90, 90)).save(gray, format="PNG")
            assert stub.Score(pb.ScoreRequest(encoded=gray.getvalue()), timeout=30).model.version == version
    finally:
        client.set_registered_model_alias(store.model_name, "nan-canary", version)

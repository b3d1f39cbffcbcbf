"""Adaptive execution: a call alone runs on the model's multi-thread (solo) session, calls
that overlap run on its single-thread (shared) session; in-process on the session's real
ONNX model, then through a real gRPC server and its Prometheus metrics."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import httpx
import numpy as np
import pytest

from anomaly.channel import grpc_channel
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import free_port, start_server
from service.repository.model_repository import ModelRepository, ModelSpec
from service.runtime.engine import OnnxModel
from service.settings import Settings


@pytest.fixture(scope="module")
def served(store, tmp_path_factory: pytest.TempPathFactory):
    """The champion as the server loads it, with one thread per call and a 2-thread solo session."""
    settings = Settings(tracking_uri=store.tracking_uri, cache_dir=tmp_path_factory.mktemp("cache"),
                        intra_op_threads=1, solo_threads=2)
    return ModelRepository(settings).get(ModelSpec(store.model_name, "champion")).model


def _batch(model: OnnxModel, n: int) -> np.ndarray:
    h, w = model.metadata.input_size
    return np.random.default_rng(0).random((n, 3, h, w), dtype=np.float32)


def test_the_two_sessions_have_the_configured_threads(served: OnnxModel) -> None:
    assert served.solo is not None
    assert served.session.get_session_options().intra_op_num_threads == 1
    assert served.solo.get_session_options().intra_op_num_threads == 2


def test_a_lone_call_runs_solo_and_an_overlapping_one_shared(served: OnnxModel) -> None:
    before = dict(served.runs)
    lone_scores, _ = served.run(_batch(served, 1))
    assert served.runs["solo"] == before["solo"] + 1 and served.runs["shared"] == before["shared"]

    started, release = threading.Event(), threading.Event()
    long_batch = _batch(served, 96)  # runs for a while on the solo session

    def long_call() -> None:
        started.set()
        served.run(long_batch)
        release.set()

    thread = threading.Thread(target=long_call)
    thread.start()
    started.wait(5)
    deadline = time.monotonic() + 10
    while served._running == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    during, _ = served.run(_batch(served, 1))  # overlaps the long call
    overlapped = not release.is_set()
    thread.join(60)
    assert overlapped, "the long call ended before the second one: nothing overlapped"
    assert served.runs["solo"] == before["solo"] + 2  # the lone call and the long one
    assert served.runs["shared"] == before["shared"] + 1  # the overlapping one
    np.testing.assert_allclose(during, lone_scores, rtol=1e-4)  # same model, same answer

    served.run(_batch(served, 1), alone=False)  # the server knows of other requests
    assert served.runs["shared"] == before["shared"] + 2


def test_no_solo_session_when_it_would_not_add_threads(served: OnnxModel) -> None:
    same = OnnxModel(served.path, served.metadata, intra_op_threads=2, solo_threads=2)
    assert same.solo is None
    same.run(_batch(same, 1))
    assert same.runs == {"solo": 0, "shared": 1}


def _runs(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found = re.finditer(r'anomaly_inference_runs_total\{session="(\w+)"\} (\S+)', text)
    return {m[1]: float(m[2]) for m in found}


def test_served_lone_requests_run_solo_and_a_burst_shared(store, good_and_defect, tmp_path) -> None:
    port = free_port()
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_METRICS_PORT": str(port), "ANOMALY_WORKERS": "4",
                                      "ANOMALY_INTRA_OP_THREADS": "1", "ANOMALY_SOLO_THREADS": "2",
                                      "ANOMALY_MAX_BATCH_SIZE": "1"})
    try:
        good = good_and_defect[0][0].read_bytes()
        start = _runs(port)
        with grpc_channel(target, aio=False) as channel:
            stub = pb_grpc.AnomalyDetectionStub(channel)
            for _ in range(5):  # one after another: each alone in the server
                stub.Score(pb.ScoreRequest(encoded=good), timeout=30)
        lone = _runs(port)
        assert lone.get("solo", 0) - start.get("solo", 0) == 5
        assert lone.get("shared", 0) == start.get("shared", 0)

        async def burst() -> None:
            async with grpc_channel(target, aio=True) as channel:
                stub = pb_grpc.AnomalyDetectionStub(channel)

                async def client() -> None:
                    for _ in range(5):
                        await stub.Score(pb.ScoreRequest(encoded=good), timeout=30)

                await asyncio.gather(*(client() for _ in range(8)))

        t0 = time.monotonic()
        asyncio.run(burst())
        after = _runs(port)
        assert sum(after.values()) - sum(lone.values()) == 40, f"burst took {time.monotonic() - t0:.1f}s"
        assert after["shared"] - lone.get("shared", 0) > 0  # overlapping requests ran shared
    finally:
        child.stop()

"""A watcher that never dies silently, isolated loading, a cache keyed by content, loads off
the inference threads (issue 16, points 5–7). Real servers on loopback, a real MLflow store,
real (tiny or trained) ONNX models."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import Store, register_mutated, register_tiny, tracking_uri, wait_alias_error
from grpc_health.v1 import health_pb2, health_pb2_grpc
from mlflow import MlflowClient

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.faults import escaping_mlmodel, garbage_onnx, malformed_mlmodel
from loadtests.launch import ChildProcess, free_port, peak_rss_mb, start_server, wait_grpc_serving
from service.errors import ModelLoadError, ModelNotFound
from service.repository.model_repository import ModelRepository, ModelSpec
from service.settings import Settings


@pytest.fixture(scope="module")
def client(store) -> MlflowClient:
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def test_failed_version_is_not_retried_every_poll(store, client, good_and_defect, tmp_path: Path) -> None:
    alias = "retry-canary"
    client.set_registered_model_alias(store.model_name, alias, store.version)
    bad = register_mutated(store, client, garbage_onnx, tmp_path)
    escaping = register_mutated(store, client, escaping_mlmodel, tmp_path)
    port = free_port()
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env={"ANOMALY_POLL_INTERVAL_S": "0.2",
                                                   "ANOMALY_METRICS_PORT": str(port)})
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            client.set_registered_model_alias(store.model_name, alias, bad)
            info = wait_alias_error(stub, alias, bad)
            assert "ONNX" in info.last_error and info.ref.version == store.version
            time.sleep(3.0)  # 15 polls
            client.set_registered_model_alias(store.model_name, alias, escaping)
            info = wait_alias_error(stub, alias, escaping)
            assert "points outside the model folder" in info.last_error, info.last_error
            client.set_registered_model_alias(store.model_name, alias, store.version)
            deadline = time.monotonic() + 10
            while stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10).last_error and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            assert not stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10).last_error
            image = good_and_defect[0][0].read_bytes()
            assert stub.Score(pb.ScoreRequest(encoded=image), timeout=30).model.version == store.version
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        client.set_registered_model_alias(store.model_name, alias, store.version)
        child.stop()
    log = (tmp_path / "server.log").read_text()
    assert len(re.findall(rf"moved to version {bad}, which failed to load", log)) == 1, log[-3000:]
    assert f'anomaly_model_load_failures_total{{alias="{alias}",name="{store.model_name}"}} 2.0' in metrics
    assert not any((tmp_path / "cache" / "staging").glob("*/*"))  # no staging folder left behind


def test_server_starts_with_a_broken_watched_alias(store, client, good_and_defect, tmp_path: Path) -> None:
    """It comes up NOT_SERVING for that alias with the reason, serves the other watched
    model, and picks the alias up as soon as it moves to a good version."""
    alias = "startup-canary"
    broken = register_mutated(store, client, malformed_mlmodel, tmp_path)
    client.set_registered_model_alias(store.model_name, alias, broken)
    port = free_port()
    target = f"127.0.0.1:{port}"
    child = ChildProcess(["serve", "--tracking-uri", store.tracking_uri, "--port", str(port),
                          "--alias", alias, "--cache-dir", str(tmp_path / "cache")], tmp_path / "server.log",
                         {"ANOMALY_MODELS": f'["{store.model_name}@champion"]',
                          "ANOMALY_POLL_INTERVAL_S": "0.3"})
    child.start()
    image = good_and_defect[0][0].read_bytes()
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 120
            while True:
                assert child.proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                try:
                    info = stub.GetModel(pb.GetModelRequest(alias=alias), timeout=5)
                    other = stub.GetModel(pb.GetModelRequest(alias="champion"), timeout=5)
                    if info.last_error and other.state == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.3)
            assert info.state == "NOT_SERVING" and info.last_error_version == broken
            assert "MLmodel is not valid YAML" in info.last_error
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            other = stub.Score(pb.ScoreRequest(encoded=image, alias="champion"), timeout=30)
            assert other.model.version == store.version
            with pytest.raises(grpc.RpcError) as refused:
                stub.Score(pb.ScoreRequest(encoded=image), timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "MLmodel" in refused.value.details() and alias in refused.value.details()
            client.set_registered_model_alias(store.model_name, alias, store.version)
            wait_grpc_serving(target, 30, child.proc)
            assert stub.Score(pb.ScoreRequest(encoded=image), timeout=30).model.version == store.version
            assert stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10).state == "SERVING"
    finally:
        client.set_registered_model_alias(store.model_name, alias, store.version)
        assert child.stop() == 0


def test_isolated_loading_refuses_hanging_and_memory_hungry_models(store, good_and_defect,
                                                                    tmp_path: Path) -> None:
    hang = register_tiny(store, "hang", tmp_path)
    huge = register_tiny(store, "huge", tmp_path)
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_LOAD_PROBE_TIMEOUT_S": "4"})
    image = good_and_defect[0][0].read_bytes()
    try:
        before = peak_rss_mb(child.proc.pid)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)
            for version, text in ((hang, "did not finish within 4s"), (huge, "Failed to allocate memory")):
                for _ in range(2):  # the second answer comes from memory: no second 4 s wait
                    t0 = time.monotonic()
                    with pytest.raises(grpc.RpcError) as info:
                        stub.Score(pb.ScoreRequest(encoded=image, version=int(version)), timeout=60)
                    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                    assert text in info.value.details(), info.value.details()
                    good = stub.Score(pb.ScoreRequest(encoded=image), timeout=30)
                    assert good.model.version == store.version
                assert time.monotonic() - t0 < 2.0
        grown = peak_rss_mb(child.proc.pid) - before
        assert grown < 300, f"the server's peak RSS grew {grown:.0f} MB"
    finally:
        assert child.stop() == 0


def test_ad_hoc_loads_run_off_the_inference_threads(store, other_architectures, good_and_defect,
                                                    tmp_path: Path) -> None:
    """With one inference thread, requests for the serving version keep completing while
    another version downloads, is checked in a child process, and loads."""
    rd = other_architectures["rd"].registered.version
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 env={"ANOMALY_WORKERS": "1"})
    image = good_and_defect[0][0].read_bytes()
    done: list[tuple[float, str]] = []
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)

            def ad_hoc() -> None:
                r = stub.Score(pb.ScoreRequest(encoded=image, version=int(rd)), timeout=120)
                done.append((time.monotonic(), f"v{r.model.version}"))

            thread = threading.Thread(target=ad_hoc)
            thread.start()
            while thread.is_alive():
                stub.Score(pb.ScoreRequest(encoded=image), timeout=30)
                done.append((time.monotonic(), "champion"))
            thread.join()
    finally:
        child.stop()
    order = [what for _, what in sorted(done)]
    assert order[-1] == f"v{rd}" or f"v{rd}" in order
    assert order.index(f"v{rd}") >= 3, order  # champion answers kept coming during the load


def test_a_recreated_registry_is_never_served_a_stale_cache(store, tmp_path: Path) -> None:
    """Version 1 of a fresh registry is not the version 1 the cache holds from the old one."""
    from registry.mlflow_registry import log_and_register

    homes = [tmp_path / "registry-0", tmp_path / "registry-1"]
    uris = [f"sqlite:///{home / 'mlflow.db'}" for home in homes]
    for home in homes:
        home.mkdir()
    assert register_tiny(Store(uris[0], homes[0], store.model_name, "", None), "none", tmp_path) == "1"
    with tracking_uri(uris[1]):  # the registry recreated: the trained STFPM is version 1 now
        assert log_and_register(store.build.onnx_path, store.build.metadata, params={}, metrics={},
                                artifact_root=homes[1] / "artifacts").version == "1"
    served = []
    for i, uri in enumerate(uris):
        MlflowClient(uri, uri).set_registered_model_alias(store.model_name, "champion", "1")
        child, target = start_server(uri, tmp_path / f"server-{i}.log", cache_dir=tmp_path / "cache")
        try:
            with grpc.insecure_channel(target) as ch:
                info = pb_grpc.AnomalyDetectionStub(ch).GetModel(pb.GetModelRequest(), timeout=10)
                served.append((info.ref.version, info.ref.architecture))
        finally:
            child.stop()
    assert served == [("1", "tiny"), ("1", "stfpm")]


def test_unknown_and_failed_versions_answer_from_memory(store, client, tmp_path: Path) -> None:
    """In process, against the real store: an unknown alias is looked up once per
    `negative_cache_s`; a version that failed to load is not downloaded or loaded again."""
    bad = register_mutated(store, client, garbage_onnx, tmp_path)
    repo = ModelRepository(Settings(tracking_uri=store.tracking_uri, cache_dir=tmp_path / "cache",
                                    negative_cache_s=60))
    calls = {"alias": 0, "store": 0}
    by_alias, store_fn = repo.client.get_model_version_by_alias, repo.cache.store

    def count_alias(*args):
        calls["alias"] += 1
        return by_alias(*args)

    def count_store(*args):
        calls["store"] += 1
        return store_fn(*args)

    repo.client.get_model_version_by_alias = count_alias
    repo.cache.store = count_store
    for _ in range(3):
        with pytest.raises(ModelNotFound):
            repo.get(ModelSpec(store.model_name, alias="never-set"))
    assert calls["alias"] == 1
    for _ in range(3):
        with pytest.raises(ModelLoadError, match="ONNX"):
            repo.get(ModelSpec(store.model_name, version=int(bad)))
    assert calls["store"] == 1

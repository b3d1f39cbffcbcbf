"""The watcher follows aliases on threads of its own, on a real server and a real MLflow store.

Requests that name a version (or an alias the server does not follow) load it on the loader
threads; the watcher (promotions and rollbacks) used the same two threads, so two `Score`s
naming versions whose isolated check hangs delayed a promotion until the check's time limit
(28 s with `ANOMALY_LOAD_PROBE_TIMEOUT_S=25`). Now the watcher has its own executor."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from conftest import register_copy, register_tiny, wait_for
from mlflow import MlflowClient

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import start_server


def test_a_promotion_never_waits_behind_score_triggered_loads(store, good_and_defect, tmp_path: Path) -> None:
    """Two `Score`s name versions whose check hangs (until the probe child's time limit);
    an alias moved meanwhile is followed within seconds, before either `Score` ends."""
    image = good_and_defect[0][0].read_bytes()
    hanging = [register_tiny(store, "hang", tmp_path) for _ in range(2)]
    target_version = register_copy(store, tmp_path, "threads-target")
    alias = "threads-promotion"
    client = MlflowClient(store.tracking_uri, store.tracking_uri)
    client.set_registered_model_alias(store.model_name, alias, store.version)
    probe_s = 25
    env = {"ANOMALY_POLL_INTERVAL_S": "0.3", "ANOMALY_GATE": "false",
           "ANOMALY_LOAD_PROBE_TIMEOUT_S": str(probe_s)}
    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=tmp_path / "cache",
                                 alias=alias, env=env)
    ended: list[tuple[float, grpc.StatusCode]] = []
    try:
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.AnomalyDetectionStub(ch)

            def score(version: str) -> None:
                try:
                    stub.Score(pb.ScoreRequest(encoded=image, version=int(version)), timeout=3 * probe_s)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    code = exc.code()
                ended.append((time.monotonic(), code))

            scores = [threading.Thread(target=score, args=(v,)) for v in hanging]
            start = time.monotonic()
            for t in scores:
                t.start()
            time.sleep(1.0)  # both loads under way
            client.set_registered_model_alias(store.model_name, alias, target_version)
            served = lambda: stub.GetModel(pb.GetModelRequest(alias=alias), timeout=10).ref.version  # noqa: E731
            wait_for(lambda: served() == target_version, timeout=3 * probe_s, what="the promotion")
            promoted = time.monotonic()
            # Scoring the alias answers with the promoted version meanwhile.
            assert stub.Score(pb.ScoreRequest(encoded=image, alias=alias), timeout=30).model.version == \
                target_version
            for t in scores:
                t.join()
    finally:
        client.set_registered_model_alias(store.model_name, alias, store.version)
        child.stop()
    assert promoted - start < probe_s and not [at for at, _ in ended if at < promoted], \
        (promoted - start, [at - start for at, _ in ended])
    # The hanging versions were refused by their check (no decision from them).
    assert {code for _, code in ended} == {grpc.StatusCode.FAILED_PRECONDITION}, ended

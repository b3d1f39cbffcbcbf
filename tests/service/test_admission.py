"""Long-lived calls never starve scoring (issue 35, fault 6), on a real server on loopback.

Health `Watch` and reflection streams (open to anyone, no key needed) and `ScoreStream`s
each have their own cap, apart from the unary calls: idle streams beyond gRPC's old
overall cap leave `Score` and health `Check` answering, streams beyond their own cap get
RESOURCE_EXHAUSTED, and calls without a valid key are refused before they take a slot."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from loadtests.launch import start_server

KEY = "admission-key-5d2e"
OLD_GRPC_CAP = 16 + 32  # the default max_concurrent_rpcs + 32: grpc's own cap before the fix
WATCH_CAP, STREAM_CAP = 6, 2


@pytest.fixture(scope="module")
def server(store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("admission")
    env = {"ANOMALY_API_KEYS": f'["{KEY}"]', "ANOMALY_MAX_WATCH_STREAMS": str(WATCH_CAP),
           "ANOMALY_MAX_STREAMS": str(STREAM_CAP)}
    child, target = start_server(store.tracking_uri, logs / "server.log", cache_dir=store.home / "cache",
                                 env=env)
    yield target
    assert child.stop() == 0, (logs / "server.log").read_text()[-3000:]


def _open_watches(health: health_pb2_grpc.HealthStub, n: int) -> tuple[list, list[grpc.StatusCode]]:
    """Open `n` health Watch streams (no key, as a monitoring agent would); returns the ones
    that answered their first status and the codes of those refused."""
    opened, refused = [], []
    for _ in range(n):
        call = health.Watch(health_pb2.HealthCheckRequest(), timeout=300)
        try:
            next(call)
            opened.append(call)
        except grpc.RpcError as exc:
            refused.append(exc.code())
    return opened, refused


def test_idle_watch_streams_never_stop_scoring(server: str, good_and_defect) -> None:
    image = good_and_defect[0][0].read_bytes()
    keyed = (("x-api-key", KEY),)
    with grpc.insecure_channel(server) as ch:
        health, stub = health_pb2_grpc.HealthStub(ch), pb_grpc.AnomalyDetectionStub(ch)
        opened, refused = _open_watches(health, OLD_GRPC_CAP + 4)
        try:
            # Scoring, metadata and health checks answer while the idle streams are open.
            assert stub.Score(pb.ScoreRequest(encoded=image), timeout=30, metadata=keyed).model.version
            assert stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=keyed).models
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            # Watch streams beyond their own cap are refused, at once.
            assert len(opened) == WATCH_CAP
            assert set(refused) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert len(refused) == OLD_GRPC_CAP + 4 - WATCH_CAP
            # Reflection shares the cap of the open long-lived calls.
            info = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            with pytest.raises(grpc.RpcError) as err:
                list(info)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for call in opened:
                call.cancel()
        # Slots come back when streams close.
        again, refused = _open_watches(health, 1)
        again[0].cancel()
        assert not refused
        info = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        services = {s.name for r in info for s in r.list_services_response.service}
        assert "anomaly.v1.AnomalyDetection" in services


def _stream(stub: pb_grpc.AnomalyDetectionStub, image: bytes, metadata: tuple,
            release: threading.Event) -> tuple[object, object]:
    """A ScoreStream that sends one image, then idles until `release`; returns (call, its
    first answer or the error that ended it)."""

    def requests() -> Iterator[pb.ScoreRequest]:
        yield pb.ScoreRequest(encoded=image)
        release.wait(120)

    call = stub.ScoreStream(requests(), timeout=180, metadata=metadata)
    try:
        return call, next(call)
    except grpc.RpcError as exc:
        return call, exc


def test_score_streams_have_their_own_cap_and_unkeyed_calls_take_no_slot(server: str,
                                                                         good_and_defect) -> None:
    image = good_and_defect[1][0].read_bytes()
    keyed = (("x-api-key", KEY),)
    release = threading.Event()
    calls = []
    with grpc.insecure_channel(server) as ch:
        stub = pb_grpc.AnomalyDetectionStub(ch)
        try:
            # Streams without a key are refused before they hold a slot: many of them leave
            # every stream slot free.
            for _ in range(STREAM_CAP + 3):
                call, first = _stream(stub, image, (("x-api-key", "wrong"),), release)
                calls.append(call)
                assert isinstance(first, grpc.RpcError) and first.code() == grpc.StatusCode.UNAUTHENTICATED
            held = [_stream(stub, image, keyed, release) for _ in range(STREAM_CAP)]
            calls += [c for c, _ in held]
            assert all(isinstance(first, pb.ScoreResponse) for _, first in held), held
            call, first = _stream(stub, image, keyed, release)
            calls.append(call)
            assert isinstance(first, grpc.RpcError) and first.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ANOMALY_MAX_STREAMS" in first.details()
            # Unary scoring is not held up by the streams.
            for _ in range(3):
                assert stub.Score(pb.ScoreRequest(encoded=image), timeout=30, metadata=keyed).model.version
        finally:
            release.set()
            for call in calls:
                call.cancel()


def test_the_limits_are_documented() -> None:
    root = Path(__file__).resolve().parents[2]
    settings = (root / "docs" / "settings.md").read_text()
    reliability = (root / "docs" / "reliability.md").read_text()
    for setting in ("ANOMALY_MAX_WATCH_STREAMS", "ANOMALY_MAX_STREAMS"):
        assert f"`{setting}`" in settings and setting in reliability


def test_calls_that_never_reach_their_handler_hold_no_slot(server: str, good_and_defect) -> None:
    """Malformed messages (the call ends before its handler runs) beyond the unary cap: every
    slot is still free afterwards."""
    image = good_and_defect[0][0].read_bytes()
    keyed = (("x-api-key", KEY),)
    with grpc.insecure_channel(server) as ch:
        raw = ch.unary_unary("/anomaly.v1.AnomalyDetection/Score")
        for _ in range(16 + 4):  # the default ANOMALY_MAX_CONCURRENT_RPCS + 4
            with pytest.raises(grpc.RpcError) as err:
                raw(b"\xff\xff\xff", timeout=10, metadata=keyed)
            assert err.value.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
        stub = pb_grpc.AnomalyDetectionStub(ch)
        assert stub.Score(pb.ScoreRequest(encoded=image), timeout=30, metadata=keyed).model.version

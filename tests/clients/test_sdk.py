"""The SDK against the session's real server and gateway: both transports and both clients
give the same typed results; errors are `AnomalyError` with the status; UNAVAILABLE is
retried with backoff inside the deadline, other errors are not."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from edge_anomaly_client.sdk import AnomalyClient, AnomalyError, AsyncAnomalyClient
from loadtests.launch import free_port, start_server


@pytest.fixture(scope="module")
def image(good_and_defect) -> bytes:
    return good_and_defect[1][0].read_bytes()


@pytest.fixture(scope="module", params=["grpc", "http"])
def target(request, grpc_target: str, http_base: str) -> str:
    return grpc_target if request.param == "grpc" else http_base


def test_sync_and_async_agree_over_both_transports(target: str, grpc_target: str, store,
                                                    image: bytes) -> None:
    with AnomalyClient(grpc_target) as reference:
        expected = reference.score(image, request_id="ref")
    with AnomalyClient(target) as client:
        got = client.score(image, request_id="SN-1", return_anomaly_map=True)
        auto = client.score(image)
        models = client.list_models()
        info = client.get_model(alias="champion")

    async def run():  # noqa: ANN202
        async with AsyncAnomalyClient(target) as client:
            return await client.score(image, request_id="SN-2"), await client.list_models()

    got_async, models_async = asyncio.run(run())
    assert got.request_id == "SN-1" and got_async.request_id == "SN-2"
    assert len(auto.request_id) == 32 and auto.request_id != got.request_id  # generated per call
    for r in (got, got_async, auto):
        assert r.score == pytest.approx(expected.score, rel=1e-5)
        assert r.is_anomalous == expected.is_anomalous and r.model == expected.model
        assert r.model.version == store.version and r.timings["total_ms"] > 0
    assert got.anomaly_map_png.startswith(b"\x89PNG") and not auto.anomaly_map_png
    assert [m.ref.version for m in models] == [m.ref.version for m in models_async]
    assert info.ref.version == store.version and info.categories


def test_errors_carry_the_status_and_are_not_retried(target: str, image: bytes) -> None:
    with AnomalyClient(target, retries=5) as client:
        with pytest.raises(AnomalyError) as info:
            client.score(image, alias="no-such-alias")
        assert info.value.code == "NOT_FOUND" and "no-such-alias" in info.value.message
        assert info.value.attempts == 1 and not info.value.retryable
        if target.startswith("http"):
            assert info.value.http_status == 404
        with pytest.raises(AnomalyError) as info:
            client.score(b"not an image at all")
        assert info.value.code == "INVALID_ARGUMENT" and info.value.attempts == 1


@pytest.mark.parametrize("scheme", ["grpc", "http"])
def test_unavailable_is_retried_until_the_deadline(scheme: str) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}" if scheme == "grpc" else f"http://127.0.0.1:{port}"
    with AnomalyClient(target, retries=3, backoff_s=0.05) as client:
        t0 = time.monotonic()
        with pytest.raises(AnomalyError) as info:
            client.score(b"x", timeout=10)
        assert info.value.code == "UNAVAILABLE" and info.value.attempts == 4
        assert time.monotonic() - t0 < 5
        with pytest.raises(AnomalyError) as info:  # the deadline bounds all attempts together
            AnomalyClient(target, retries=100, backoff_s=0.2).score(b"x", timeout=1.0)
        assert info.value.code in {"UNAVAILABLE", "DEADLINE_EXCEEDED"} and info.value.attempts < 100


@pytest.mark.timeout(180)
def test_call_survives_a_server_that_starts_late(store, image: bytes, tmp_path: Path) -> None:
    """The server is down when the call starts; retries carry it until the server is up."""
    port = free_port()
    started: list = []

    def start_later() -> None:
        time.sleep(1.0)
        started.append(start_server(store.tracking_uri, tmp_path / "late.log", port=port,
                                    cache_dir=tmp_path / "cache"))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        with AnomalyClient(f"127.0.0.1:{port}", retries=30, backoff_s=0.2, max_backoff_s=2.0) as client:
            result = client.score(image, request_id="late-1", timeout=120)
        assert result.request_id == "late-1" and result.model.version == store.version
    finally:
        thread.join()
        for child, _ in started:
            child.stop()


def test_score_stream_with_both_clients(grpc_target: str, image: bytes, good_and_defect) -> None:
    """One stream of images (bytes, a path, `(image, id)` pairs): results in input order, the
    same scores as unary calls; the async client also takes an async generator."""
    good = good_and_defect[0][0]
    items = [(image, "frame-a"), good, (good.read_bytes(), "frame-c")]
    with AnomalyClient(grpc_target) as client:
        got = list(client.score_stream(items))
        expected = [client.score(image).score, client.score(good).score, client.score(good).score]
    assert got[0].request_id == "frame-a" and got[2].request_id == "frame-c"
    assert len(got[1].request_id) == 32  # generated
    assert [r.score for r in got] == pytest.approx(expected, rel=1e-5)

    async def run() -> list:
        async def frames():  # noqa: ANN202
            for item in items:
                yield item

        async with AsyncAnomalyClient(grpc_target) as client:
            return [r async for r in client.score_stream(frames())]

    got_async = asyncio.run(run())
    assert [r.request_id for r in got_async][::2] == ["frame-a", "frame-c"]
    assert [r.score for r in got_async] == pytest.approx(expected, rel=1e-5)


def test_score_stream_errors(grpc_target: str, http_base: str, image: bytes) -> None:
    """A bad image ends the stream with its status and request id, after the answers before
    it; an HTTP target has no stream and says so."""
    done = []
    with AnomalyClient(grpc_target) as client, pytest.raises(AnomalyError) as info:
        for r in client.score_stream([(image, "ok-1"), (b"not an image", "bad-2"), (image, "ok-3")]):
            done.append(r.request_id)
    assert done == ["ok-1"] and info.value.code == "INVALID_ARGUMENT"
    assert "bad-2" in info.value.message and "not an image" in info.value.message
    with AnomalyClient(http_base) as client, pytest.raises(AnomalyError) as info:
        list(client.score_stream([image]))
    assert info.value.code == "UNIMPLEMENTED"

    async def run() -> None:
        async with AsyncAnomalyClient(http_base) as client:
            [r async for r in client.score_stream([image])]

    with pytest.raises(AnomalyError, match="UNIMPLEMENTED|gRPC target"):
        asyncio.run(run())


@pytest.mark.parametrize(("code", "message", "kind"), [
    ("INVALID_ARGUMENT", "not an image", "permanent"),
    ("NOT_FOUND", "model x not found", "permanent"),
    ("UNAUTHENTICATED", "missing or invalid API key", "permanent"),
    ("PERMISSION_DENIED", "", "permanent"),
    ("RESOURCE_EXHAUSTED", "Received message larger than max (40000037 vs. 8454144)", "permanent"),
    ("RESOURCE_EXHAUSTED", "inference queue full (64 images waiting); retry later", "transient"),
    ("DEADLINE_EXCEEDED", "", "transient"),
    ("INTERNAL", "model produced a non-finite score", "transient"),
    ("UNAVAILABLE", "registry unreachable", "server down"),
    ("CANCELLED", "", "server down"),
])
def test_one_classification_of_failures(code: str, message: str, kind: str) -> None:
    err = AnomalyError(code, message)
    assert err.kind == kind and err.permanent == (kind == "permanent")
    sdk_retries = code in ("UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED") and kind != "permanent"
    assert err.retryable == sdk_retries


def test_the_client_checks_the_servers_size_limit_before_sending(target: str) -> None:
    """The server advertises its limit (`GetModel`); a bigger image is refused by the
    client itself, permanently, on both transports; an image just under 1 MiB is not
    checked (no extra call)."""
    with AnomalyClient(target, retries=3) as client:
        assert client.get_model().max_image_bytes == 8 * 1024 * 1024
        t0 = time.monotonic()
        with pytest.raises(AnomalyError) as info:
            client.score(b"\x89PNG" + b"\0" * (9 * 1024 * 1024))
        assert info.value.code == "INVALID_ARGUMENT" and info.value.permanent
        assert "checked before sending" in info.value.message and info.value.attempts == 1
        assert time.monotonic() - t0 < 5
    with AnomalyClient(target, retries=3) as client:  # a fresh client against gRPC's own limit
        client._max_image_bytes = 0  # as if the server had not said: the server's answer decides
        with pytest.raises(AnomalyError) as info:
            client.score(b"\x89PNG" + b"\0" * (12 * 1024 * 1024))
        assert info.value.permanent and info.value.attempts == 1, info.value


def test_registry_outage_is_unavailable_for_a_version_not_loaded(store, other_architectures, image: bytes,
                                                                 tmp_path: Path) -> None:
    """The server maps a registry it cannot reach to UNAVAILABLE (server down, retry later),
    never to INVALID_ARGUMENT or FAILED_PRECONDITION that a client would file as final."""
    import signal

    from conftest import mlflow_server_process, tracking_uri

    from registry.mlflow_registry import log_and_register

    with mlflow_server_process(f"sqlite:///{tmp_path / 'reg.db'}", tmp_path) as (url, registry):
        with tracking_uri(url):
            log_and_register(store.build.onnx_path, store.build.metadata, params={}, metrics={},
                             aliases=("champion",))
            rd = other_architectures["rd"]
            other = log_and_register(rd.onnx_path, rd.metadata, params={}, metrics={}).version
        child, target = start_server(url, tmp_path / "server.log", cache_dir=tmp_path / "cache")
        try:
            registry.signal(signal.SIGKILL)
            registry.proc.wait(10)
            with AnomalyClient(target, retries=0, timeout=30) as client:
                assert client.score(image).model.version == "1"  # the loaded champion still serves
                with pytest.raises(AnomalyError) as info:
                    client.score(image, version=int(other))
            assert info.value.code == "UNAVAILABLE" and info.value.kind == "server down", info.value
        finally:
            child.stop()

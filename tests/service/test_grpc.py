"""The real gRPC server (child process, loopback) serving the registered model."""

from __future__ import annotations

import io
import statistics
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from edge_anomaly_client.sdk import AnomalyClient, AsyncAnomalyClient


@pytest.fixture(scope="module")
def stub(grpc_target: str):
    with grpc.insecure_channel(grpc_target) as channel:
        yield pb_grpc.AnomalyDetectionStub(channel)


def _category(path: Path) -> str:
    return path.parts[-4]


def test_health_serving_and_reflection(grpc_target: str) -> None:
    with grpc.insecure_channel(grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "anomaly.v1.AnomalyDetection"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "anomaly.v1.AnomalyDetection" in names


def test_defects_score_higher_than_good(grpc_target: str, store, good_and_defect) -> None:
    good, defect = good_and_defect
    with AnomalyClient(grpc_target) as client:
        g = [client.score(p, category=_category(p)) for p in good]
        d = [client.score(p, category=_category(p)) for p in defect]
    assert statistics.median(r.score for r in d) > statistics.median(r.score for r in g)
    assert sum(r.is_anomalous for r in d) > sum(r.is_anomalous for r in g)
    for r in g + d:
        assert r.model.name == store.model_name and r.model.version == store.version
        assert r.model.architecture == "stfpm" and r.model.variant == "fp32"
        assert r.model.alias == "champion"
        assert 0.0 <= r.normalized_score <= 1.0
        assert r.is_anomalous == (r.score >= r.threshold)
        assert r.timings["total_ms"] > 0


def test_request_id_echo_and_anomaly_map(grpc_target: str, good_and_defect) -> None:
    path = good_and_defect[1][0]
    with AnomalyClient(grpc_target) as client:
        r = client.score(path, request_id="SN-0042", return_anomaly_map=True)
        assert r.request_id == "SN-0042"
        heat = Image.open(io.BytesIO(r.anomaly_map_png))
        assert heat.size == Image.open(path).size and heat.mode == "L"
        generated = client.score(path)
        assert len(generated.request_id) == 32 and generated.anomaly_map_png == b""


def test_raw_pixels_match_encoded(grpc_target: str, stub, good_and_defect) -> None:
    path = good_and_defect[1][0]
    arr = np.asarray(Image.open(path).convert("RGB"))
    raw = pb.RawImage(data=arr.tobytes(), width=arr.shape[1], height=arr.shape[0], channels=3,
                      dtype=pb.PIXEL_TYPE_UINT8)
    r_raw = stub.Score(pb.ScoreRequest(raw=raw), timeout=30)
    r_enc = stub.Score(pb.ScoreRequest(encoded=path.read_bytes()), timeout=30)
    assert r_raw.score == pytest.approx(r_enc.score, rel=1e-5)


def test_version_and_alias_selection(grpc_target: str, store, stub) -> None:
    info = stub.GetModel(pb.GetModelRequest(model=store.model_name, alias="stfpm-fp32"), timeout=30)
    assert info.ref.version == store.version and info.ref.alias == "stfpm-fp32"
    assert info.input_height == 128 and list(info.categories) == ["brick", "coffee"]
    assert info.provider == "CPUExecutionProvider"
    assert set(info.thresholds) == {"", "brick", "coffee"}
    by_version = stub.GetModel(pb.GetModelRequest(version=int(store.version)), timeout=30)
    assert by_version.ref.version == store.version
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert store.version in {m.ref.version for m in listed.models}


def test_score_stream_keeps_order(grpc_target: str, good_and_defect) -> None:
    paths = (good_and_defect[0] + good_and_defect[1])[:6]

    async def run() -> list[str]:
        async with AsyncAnomalyClient(grpc_target) as client:
            stub = client._next_stub()
            reqs = [pb.ScoreRequest(encoded=p.read_bytes(), request_id=f"id-{i}")
                    for i, p in enumerate(paths)]
            return [r.request_id async for r in stub.ScoreStream(iter(reqs), timeout=60)]

    import asyncio

    assert asyncio.run(run()) == [f"id-{i}" for i in range(len(paths))]


def test_score_stream_answers_a_client_that_waits_for_each_answer(grpc_target: str,
                                                                 good_and_defect) -> None:
    """A line camera in lock-step: send one image, read its answer, send the next. Each answer
    must come back while the stream is open, without more requests behind it."""
    image = good_and_defect[0][0].read_bytes()

    async def run() -> list[str]:
        async with AsyncAnomalyClient(grpc_target) as client:
            call = client._next_stub().ScoreStream(timeout=30)
            ids = []
            for i in range(3):
                await call.write(pb.ScoreRequest(encoded=image, request_id=f"step-{i}"))
                ids.append((await asyncio.wait_for(call.read(), 20)).request_id)
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            return ids

    import asyncio

    assert asyncio.run(run()) == ["step-0", "step-1", "step-2"]


def test_score_stream_failure_names_the_request(grpc_target: str, good_and_defect) -> None:
    """A bad image mid-stream ends the stream with its status and request id, after the
    answers before it."""
    image = good_and_defect[0][0].read_bytes()
    reqs = [pb.ScoreRequest(encoded=image, request_id="ok-0"),
            pb.ScoreRequest(encoded=b"not an image", request_id="bad-1"),
            pb.ScoreRequest(encoded=image, request_id="ok-2")]
    with grpc.insecure_channel(grpc_target) as ch:
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for r in pb_grpc.AnomalyDetectionStub(ch).ScoreStream(iter(reqs), timeout=30):
                got.append(r.request_id)
    assert got == ["ok-0"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad-1" in info.value.details() and "not an image" in info.value.details()


def test_async_client_mirrors_sync(grpc_target: str, good_and_defect) -> None:
    import asyncio

    path = good_and_defect[0][0]

    async def run():
        async with AsyncAnomalyClient(grpc_target) as client:
            return await client.score(path, request_id="a1"), await client.list_models()

    result, models = asyncio.run(run())
    with AnomalyClient(grpc_target) as client:
        sync = client.score(path, request_id="a1")
    assert result.score == pytest.approx(sync.score) and result.request_id == "a1"
    assert models


BAD_REQUESTS = {
    "empty image": (pb.ScoreRequest(encoded=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    "no image": (pb.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "no image"),
    "not an image": (pb.ScoreRequest(encoded=b"%PDF-1.4 definitely not pixels" * 8),
                     grpc.StatusCode.INVALID_ARGUMENT, "not an image"),
    "unknown alias": (pb.ScoreRequest(encoded=b"x", alias="no-such-alias"),
                      grpc.StatusCode.NOT_FOUND, "not found"),
    "unknown model": (pb.ScoreRequest(encoded=b"x", model="no-such-model"),
                      grpc.StatusCode.NOT_FOUND, "not found"),
    "unknown version": (pb.ScoreRequest(encoded=b"x", version=999),
                        grpc.StatusCode.NOT_FOUND, "not found"),
    "alias and version": (pb.ScoreRequest(encoded=b"x", alias="champion", version=1),
                          grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    "raw length mismatch": (pb.ScoreRequest(raw=pb.RawImage(data=b"\0" * 10, width=4, height=4,
                                                            channels=3)),
                            grpc.StatusCode.INVALID_ARGUMENT, "byte length"),
}


@pytest.mark.parametrize("name", sorted(BAD_REQUESTS))
def test_bad_input_is_a_clear_error_and_server_keeps_serving(name: str, stub, good_and_defect) -> None:
    request, code, text = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=30)
    assert info.value.code() == code
    assert text in info.value.details()
    ok = stub.Score(pb.ScoreRequest(encoded=good_and_defect[0][0].read_bytes()), timeout=30)
    assert ok.model.version


def test_truncated_png_and_unknown_category(stub, good_and_defect) -> None:
    data = good_and_defect[0][0].read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(pb.ScoreRequest(encoded=data[: len(data) // 3]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(pb.ScoreRequest(encoded=data, category="bolts"), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown category" in info.value.details()
    assert stub.Score(pb.ScoreRequest(encoded=data, category="brick"), timeout=30).category == "brick"


@pytest.mark.parametrize("arch", ["rd", "us"])
def test_every_architecture_is_served_by_the_same_server(arch: str, grpc_target: str,
                                                         other_architectures, good_and_defect) -> None:
    build = other_architectures[arch]
    good, defect = good_and_defect
    with AnomalyClient(grpc_target) as client:
        g = [client.score(p, alias=f"{arch}-fp32", category=_category(p)) for p in good]
        d = [client.score(p, alias=f"{arch}-fp32", category=_category(p)) for p in defect]
        info = client.get_model(alias=f"{arch}-fp32")
    assert info.ref.architecture == arch and info.ref.version == build.registered.version
    for r in g + d:
        assert r.model.architecture == arch and r.model.version == build.registered.version
    assert statistics.median(r.score for r in d) > statistics.median(r.score for r in g)


def test_camera_frame_jpeg_served_from_reduced_scale_decode(grpc_target: str, store, good_and_defect) -> None:
    """A 1920×1200 JPEG (a test image enlarged): the server decodes it at reduced scale,
    scores exactly what evaluation's decoding gives, and draws the map at the frame's size."""
    from service.runtime.engine import OnnxModel
    from service.runtime.imaging import decode_image

    frame = io.BytesIO()
    Image.open(good_and_defect[1][0]).convert("RGB").resize((1920, 1200)).save(frame, "JPEG", quality=90)
    data = frame.getvalue()
    build = store.build
    model = OnnxModel(build.onnx_path, build.metadata, intra_op_threads=1)
    reduced = decode_image(data, draft=model.metadata.map_size)
    assert reduced.shape[:2] != (1200, 1920)  # a scale was skipped
    expected = model.score_image(reduced, "").score
    with AnomalyClient(grpc_target) as client:
        r = client.score(data, return_anomaly_map=True)
    assert r.score == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert Image.open(io.BytesIO(r.anomaly_map_png)).size == (1920, 1200)

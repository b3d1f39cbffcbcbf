"""The Open Inference Protocol (V2) on the session's real server (gRPC) and gateway (REST):
the same decisions as `anomaly.v1`, metadata, statistics, the repository extension, and
the protocol's error shape for bad input (each followed by a good request)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from anomaly.channel import grpc_channel
from anomaly.oip import inference_pb2 as v2
from anomaly.oip import inference_pb2_grpc as v2_grpc
from anomaly.oip.tensors import deserialize_bytes, from_raw, serialize_bytes
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

OUT = ("score", "normalized_score", "threshold", "is_anomalous")


@pytest.fixture(scope="module")
def images(sample_root: Path) -> list[Path]:
    """Two good and two defective brick images."""
    test = sample_root / "brick" / "test"
    return sorted((test / "good").glob("*.png"))[:2] + sorted((test / "patch").glob("*.png"))[:2]


@pytest.fixture(scope="module")
def stubs(grpc_target: str):
    with grpc_channel(grpc_target, aio=False) as channel:
        yield v2_grpc.GRPCInferenceServiceStub(channel), pb_grpc.AnomalyDetectionStub(channel)


def _v1(stub, image: bytes, category: str = "brick") -> pb.ScoreResponse:
    return stub.Score(pb.ScoreRequest(encoded=image, category=category), timeout=30)


def _request(
    images: list[bytes],
    *,
    model: str = "anomaly-detector",
    version: str = "",
    rid: str = "",
    **params: object,
) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=model, model_version=version, id=rid)
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images)])
    request.raw_input_contents.append(serialize_bytes(images))
    for key, value in params.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        else:
            request.parameters[key].string_param = str(value)
    return request


def _outputs(response: v2.ModelInferResponse) -> dict[str, np.ndarray]:
    return {
        t.name: from_raw(response.raw_output_contents[i], t.datatype, t.shape)
        for i, t in enumerate(response.outputs)
    }


def test_grpc_batch_equals_v1_score(stubs, images: list[Path], store) -> None:
    v2_stub, v1_stub = stubs
    data = [p.read_bytes() for p in images]
    response = v2_stub.ModelInfer(_request(data, rid="lot-7", category="brick"), timeout=60)
    assert response.model_name == "anomaly-detector" and response.model_version == store.version
    assert response.id == "lot-7" and [t.name for t in response.outputs] == list(OUT)
    out = _outputs(response)
    assert out["score"].dtype == np.float32 and out["is_anomalous"].dtype == np.bool_
    for i, image in enumerate(data):
        ref = _v1(v1_stub, image)
        assert out["score"][i] == np.float32(ref.score)
        assert out["normalized_score"][i] == np.float32(ref.normalized_score)
        assert out["threshold"][i] == np.float32(ref.threshold)
        assert bool(out["is_anomalous"][i]) == ref.is_anomalous
    assert out["is_anomalous"].tolist()[2:] == [True, True], "the two patches are defects"


def test_grpc_pixels_and_the_map(stubs, images: list[Path]) -> None:
    """UINT8 [N,H,W,C] pixels (typed contents, not raw) score as the same image sent
    encoded, and the map comes back as UINT8 [N,H,W] when asked for."""
    v2_stub, v1_stub = stubs
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images[2:]])
    request = v2.ModelInferRequest(model_name="anomaly-detector")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=list(pixels.shape))
    tensor.contents.uint_contents.extend(pixels.reshape(-1).tolist())
    request.parameters["category"].string_param = "brick"
    request.parameters["return_anomaly_map"].bool_param = True
    out = _outputs(v2_stub.ModelInfer(request, timeout=60))
    assert out["anomaly_map"].shape == (2, *pixels.shape[1:3]) and out["anomaly_map"].dtype == np.uint8
    for i, path in enumerate(images[2:]):
        ref = _v1(v1_stub, path.read_bytes())
        assert out["score"][i] == pytest.approx(ref.score, rel=1e-5)
        assert bool(out["is_anomalous"][i]) == ref.is_anomalous
    only = v2.ModelInferRequest(
        model_name="anomaly-detector",
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="is_anomalous")],
    )
    only.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
        images[0].read_bytes()
    )
    answer = v2_stub.ModelInfer(only, timeout=30)
    assert [t.name for t in answer.outputs] == ["is_anomalous"]


def test_grpc_health_metadata_statistics_index(stubs, store) -> None:
    v2_stub, _ = stubs
    assert v2_stub.ServerLive(v2.ServerLiveRequest(), timeout=10).live
    assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready
    meta = v2_stub.ServerMetadata(v2.ServerMetadataRequest(), timeout=10)
    assert meta.name == "edge-anomaly" and {"model_repository", "statistics"} <= set(meta.extensions)
    model = v2_stub.ModelMetadata(
        v2.ModelMetadataRequest(name="anomaly-detector", version="champion"), timeout=30
    )
    assert model.versions == [store.version] and [i.name for i in model.inputs] == ["image"]
    assert {o.name: o.datatype for o in model.outputs}["is_anomalous"] == "BOOL"
    assert v2_stub.ModelReady(v2.ModelReadyRequest(name="anomaly-detector"), timeout=10).ready
    assert not v2_stub.ModelReady(
        v2.ModelReadyRequest(name="anomaly-detector", version="424242"), timeout=10
    ).ready
    stats = v2_stub.ModelStatistics(v2.ModelStatisticsRequest(name="anomaly-detector"), timeout=10)
    (mine,) = stats.model_stats
    assert mine.version == store.version and mine.inference_count > 0
    assert (
        mine.inference_stats.success.count == mine.inference_count
        and mine.inference_stats.compute_infer.ns > 0
    )
    unloaded = v2.ModelStatisticsRequest(name="anomaly-detector", version="4242")
    with pytest.raises(grpc.RpcError) as err:  # statistics never load a version
        v2_stub.ModelStatistics(unloaded, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    index = v2_stub.RepositoryIndex(v2.RepositoryIndexRequest(), timeout=10)
    assert ("anomaly-detector", store.version, "READY") in {
        (m.name, m.version, m.state) for m in index.models
    }


def _bad_requests(image: bytes) -> dict[str, tuple[v2.ModelInferRequest, grpc.StatusCode, str]]:
    def build(
        datatype: str = "BYTES",
        shape: tuple[int, ...] = (1,),
        name: str = "image",
        raw: bytes | None = None,
        **kwargs: str,
    ) -> v2.ModelInferRequest:
        request = v2.ModelInferRequest(
            model_name=kwargs.get("model", "anomaly-detector"), model_version=kwargs.get("version", "")
        )
        request.inputs.add(name=name, datatype=datatype, shape=list(shape))
        request.raw_input_contents.append(serialize_bytes([image]) if raw is None else raw)
        return request

    bad = grpc.StatusCode.INVALID_ARGUMENT
    return {
        "wrong datatype": (build("FP32", raw=b"\0" * 4), bad, "must be BYTES [N]"),
        "wrong shape": (build(shape=(1, 1)), bad, "must have shape [N]"),
        "count mismatch": (build(shape=(2,)), bad, "holds 1 element(s); the shape says 2"),
        "cut short": (build(raw=serialize_bytes([image])[:-1]), bad, "only"),
        "pixels of the wrong size": (build("UINT8", (1, 4, 4, 3), raw=b"\0" * 10), bad, "needs 48 bytes"),
        "missing input": (build(name="img"), bad, "exactly one input named 'image'"),
        "not an image": (build(raw=serialize_bytes([b"not an image"])), bad, "decode"),
        "unknown model": (build(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        "unknown version": (build(version="4242"), grpc.StatusCode.NOT_FOUND, "4242"),
        "oversize": (build(raw=serialize_bytes([b"\0" * (9 << 20)])), grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        "too many images": (build(shape=(65,), raw=serialize_bytes([image] * 65)), bad, "1 to 64 images"),
    }


@pytest.mark.parametrize("case", list(_bad_requests(b"").keys()))
def test_grpc_bad_input_then_a_good_request(stubs, images: list[Path], case: str) -> None:
    v2_stub, _ = stubs
    image = images[0].read_bytes()
    request, code, text = _bad_requests(image)[case]
    with pytest.raises(grpc.RpcError) as err:
        v2_stub.ModelInfer(request, timeout=30)
    assert err.value.code() == code, err.value.details()
    assert text.lower() in (err.value.details() or "").lower()
    assert _outputs(v2_stub.ModelInfer(_request([image]), timeout=30))["score"].shape == (1,)


def test_grpc_load_pins_and_unload_refuses_a_watched_alias(stubs, other_architectures) -> None:
    v2_stub, _ = stubs
    rd = other_architectures["rd"].registered.version
    load = v2.RepositoryModelLoadRequest(model_name="anomaly-detector")
    load.parameters["version"].string_param = rd
    v2_stub.RepositoryModelLoad(load, timeout=120)
    assert v2_stub.ModelReady(v2.ModelReadyRequest(name="anomaly-detector", version=rd), timeout=10).ready
    with pytest.raises(grpc.RpcError) as err:
        v2_stub.RepositoryModelUnload(
            v2.RepositoryModelUnloadRequest(model_name="anomaly-detector"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "watched alias" in err.value.details()
    unload = v2.RepositoryModelUnloadRequest(model_name="anomaly-detector")
    unload.parameters["version"].string_param = rd
    v2_stub.RepositoryModelUnload(unload, timeout=10)
    assert not v2_stub.ModelReady(v2.ModelReadyRequest(name="anomaly-detector", version=rd), timeout=10).ready
    with pytest.raises(grpc.RpcError) as err:
        v2_stub.RepositoryModelUnload(unload, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert v2_stub.ServerReady(v2.ServerReadyRequest(), timeout=10).ready


# -- REST on the gateway ---------------------------------------------------------------------


def test_rest_json_and_binary_equal_grpc(http_base: str, stubs, images: list[Path]) -> None:
    v2_stub, _ = stubs
    data = [p.read_bytes() for p in images]
    expected = _outputs(v2_stub.ModelInfer(_request(data, category="brick"), timeout=60))
    with httpx.Client(base_url=http_base, timeout=60) as http:
        doc = {
            "id": "rest-1",
            "parameters": {"category": "brick"},
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(data)],
                    "data": [{"b64": base64.b64encode(d).decode()} for d in data],
                }
            ],
        }
        r = http.post("/v2/models/anomaly-detector/infer", json=doc)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == "rest-1" and body["model_name"] == "anomaly-detector"
        got = {o["name"]: o for o in body["outputs"]}
        assert np.array(got["score"]["data"], np.float32).tolist() == expected["score"].tolist()
        assert got["is_anomalous"]["data"] == expected["is_anomalous"].tolist()
        # The binary-data extension, both ways.
        header = json.dumps(
            {
                "parameters": {"category": "brick", "binary_data_output": True},
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [len(data)],
                        "parameters": {"binary_data_size": len(serialize_bytes(data))},
                    }
                ],
            }
        ).encode()
        r = http.post(
            "/v2/models/anomaly-detector/versions/champion/infer",
            content=header + serialize_bytes(data),
            headers={
                "Inference-Header-Content-Length": str(len(header)),
                "content-type": "application/octet-stream",
            },
        )
        assert r.status_code == 200, r.text
        split = int(r.headers["inference-header-content-length"])
        meta, rest = json.loads(r.content[:split]), r.content[split:]
        offset, out = 0, {}
        for o in meta["outputs"]:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = from_raw(rest[offset : offset + size], o["datatype"], o["shape"])
            offset += size
        assert out["score"].tolist() == expected["score"].tolist()
        assert out["is_anomalous"].tolist() == expected["is_anomalous"].tolist()


def test_rest_health_metadata_repository(http_base: str, store) -> None:
    with httpx.Client(base_url=http_base, timeout=60) as http:
        assert http.get("/v2/health/live").json() == {"live": True}
        assert http.get("/v2/health/ready").status_code == 200
        meta = http.get("/v2").json()
        assert "binary_tensor_data" in meta["extensions"] and "model_repository" in meta["extensions"]
        model = http.get(f"/v2/models/anomaly-detector/versions/{store.version}").json()
        assert model["versions"] == [store.version] and model["inputs"][0]["datatype"] == "BYTES"
        assert http.get("/v2/models/anomaly-detector/ready").status_code == 200
        assert http.get("/v2/models/anomaly-detector/versions/424242/ready").status_code == 400
        index = http.post("/v2/repository/index", json={}).json()
        assert {"name": "anomaly-detector", "version": store.version, "state": "READY", "reason": ""} in index
        assert http.get("/v2/models/stats").json()["model_stats"]
        r = http.post("/v2/repository/models/anomaly-detector/unload")
        assert r.status_code == 400 and "watched alias" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "headers", "status", "text"),
    [
        (b"{not json", {}, 400, "not JSON"),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
            ).encode(),
            {},
            400,
            "must be BYTES [N]",
        ),
        (
            json.dumps(
                {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}
            ).encode(),
            {},
            400,
            "not valid base64",
        ),
        (
            json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "BYTES",
                            "shape": [1],
                            "parameters": {"binary_data_size": 99},
                        }
                    ]
                }
            ).encode(),
            {"Inference-Header-Content-Length": "999"},
            400,
            "Inference-Header-Content-Length",
        ),
        (json.dumps({"inputs": []}).encode(), {}, 400, "exactly one input"),
        (
            json.dumps({"inputs": [{"name": "image"}]}).encode(),
            {},
            400,
            "needs a name, a datatype and a shape",
        ),
        (
            json.dumps({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, -2, 2, 3],
                                    "data": [0] * 12}]}).encode(),
            {},
            400,
            "negative dimension",
        ),
        (b"{}" + b"\0" * (17 << 20), {"Inference-Header-Content-Length": "2"}, 413, "limit"),
    ],
)
def test_rest_bad_input_then_a_good_request(
    http_base: str, images: list[Path], body: bytes, headers: dict, status: int, text: str
) -> None:
    with httpx.Client(base_url=http_base, timeout=60) as http:
        r = http.post(
            "/v2/models/anomaly-detector/infer",
            content=body,
            headers={"content-type": "application/json", **headers},
        )
        assert r.status_code == status, r.text
        assert text.lower() in r.json()["error"].lower()
        r = http.post(
            "/v2/models/no-such-model/infer",
            json={
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(b"x").decode()],
                    }
                ]
            },
        )
        assert r.status_code == 404 and "no-such-model" in r.json()["error"]
        good = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [1],
                    "data": [base64.b64encode(images[0].read_bytes()).decode()],
                }
            ]
        }
        r = http.post("/v2/models/anomaly-detector/infer", json=good)
        assert r.status_code == 200 and len(r.json()["outputs"]) == 4


def test_bytes_codec_round_trip() -> None:
    items = [b"", b"\x89PNG", bytes(range(256))]
    assert deserialize_bytes(serialize_bytes(items), 3) == items


@pytest.mark.parametrize("version", ["\u00b9", "99999999999999999999999", "-1", "1.5", "champion\u0000"])
def test_odd_versions_are_not_found_never_internal(stubs, http_base: str, version: str) -> None:
    """A version that is no number and no alias is NOT_FOUND (404), on both transports."""
    v2_stub, _ = stubs
    with pytest.raises(grpc.RpcError) as err:
        v2_stub.ModelMetadata(v2.ModelMetadataRequest(name="anomaly-detector", version=version), timeout=30)
    assert err.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), (
        err.value.details())
    with httpx.Client(base_url=http_base, timeout=30) as http:
        r = http.get(f"/v2/models/anomaly-detector/versions/{quote(version, safe='')}")
        assert r.status_code in (400, 404), r.text
        assert "error" in r.json()

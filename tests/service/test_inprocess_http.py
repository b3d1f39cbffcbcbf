"""The HTTP API served from the gRPC server's own process (`ANOMALY_HTTP_IN_PROCESS`): the
gateway's routes on the same data plane, through the same interceptors (API keys here),
answering as the separate gateway does; a real server process, real HTTP and gRPC."""

from __future__ import annotations

import base64

import httpx
import pytest

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, start_server, wait_http_ready

KEY = "in-process-key"


@pytest.fixture(scope="module")
def server(store, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("inprocess")
    port = free_port()
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=work / "cache",
                                 env={"ANOMALY_HTTP_IN_PROCESS": "true", "ANOMALY_HTTP_PORT": str(port),
                                      "ANOMALY_API_KEYS": f'["{KEY}"]'})
    base = f"http://127.0.0.1:{port}"
    wait_http_ready(f"{base}/healthz", 30)
    yield target, base
    assert child.stop() == 0, (work / "server.log").read_text()


def test_scores_as_the_grpc_api_does(server, store, good_and_defect) -> None:
    target, base = server
    image = good_and_defect[1][0].read_bytes()
    with AnomalyClient(target, api_key=KEY) as client:
        expected = client.score(image, request_id="grpc-1")
    with httpx.Client(base_url=base, headers={"x-api-key": KEY}, timeout=30) as http:
        assert http.get("/readyz").json() == {"status": "SERVING"}
        r = http.post("/v1/score", content=image, params={"request_id": "http-1"},
                      headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["request_id"] == "http-1" and body["score"] == pytest.approx(expected.score, rel=1e-6)
        assert body["model"]["version"] == store.version and body["is_anomalous"] == expected.is_anomalous
        models = http.get("/v1/models").json()
        assert [m["ref"]["version"] for m in models] == [store.version]
        doc = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                           "data": [{"b64": base64.b64encode(image).decode()}]}]}
        v2 = http.post(f"/v2/models/{store.model_name}/infer", json=doc)
        assert v2.status_code == 200, v2.text
        score = next(o for o in v2.json()["outputs"] if o["name"] == "score")
        assert score["data"][0] == pytest.approx(expected.score, rel=1e-6)


def test_bad_input_and_missing_keys_answer_problems_and_the_server_keeps_serving(server,
                                                                                  good_and_defect) -> None:
    _, base = server
    image = good_and_defect[0][0].read_bytes()
    with httpx.Client(base_url=base, timeout=30) as http:
        denied = http.post("/v1/score", content=image, headers={"content-type": "image/png"})
        assert denied.status_code == 401 and denied.headers["content-type"] == "application/problem+json"
        assert denied.json()["grpc_status"] == "UNAUTHENTICATED" and "API key" in denied.json()["detail"]
        assert http.get("/v2/health/ready").status_code == 200  # open, as over gRPC
        keyed = {"x-api-key": KEY}
        bad = http.post("/v1/score", content=b"not an image", headers={**keyed, "content-type": "image/png"})
        assert bad.status_code == 400 and bad.json()["grpc_status"] == "INVALID_ARGUMENT"
        assert "not an image" in bad.json()["detail"]
        wrong_type = http.post("/v1/score", content=image, headers={**keyed, "content-type": "text/plain"})
        assert wrong_type.status_code == 415
        unknown = http.post("/v1/score", content=image, params={"model": "no-such-model"},
                            headers={**keyed, "content-type": "image/png"})
        assert unknown.status_code == 404 and unknown.json()["grpc_status"] == "NOT_FOUND"
        v2_bad = http.post("/v2/models/anomaly-detector/infer", json={"inputs": []}, headers=keyed)
        assert v2_bad.status_code == 400 and "error" in v2_bad.json()
        # A bare key has the role score: no model control, no feedback (service.keys).
        load = http.post("/v2/repository/models/anomaly-detector/load", json={}, headers=keyed)
        assert load.status_code == 403 and "needs the role admin" in load.json()["error"]
        feedback = http.post("/v1/feedback", json={"request_id": "x", "verdict": "OK"}, headers=keyed)
        assert feedback.status_code == 403 and feedback.json()["grpc_status"] == "PERMISSION_DENIED"
        ok = http.post("/v1/score", content=image, headers={**keyed, "content-type": "image/png"})
        assert ok.status_code == 200, ok.text

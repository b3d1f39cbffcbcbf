"""The real HTTP gateway (child process) in front of the real gRPC server."""

from __future__ import annotations

import statistics
from pathlib import Path

import httpx
import pytest


@pytest.fixture(scope="module")
def http(http_base: str):
    with httpx.Client(base_url=http_base, timeout=30) as client:
        yield client


def _category(path: Path) -> str:
    return path.parts[-4]


def _problem(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "SERVING"}


def test_multipart_and_raw_body_agree(http: httpx.Client, store, good_and_defect) -> None:
    path = good_and_defect[1][0]
    multi = http.post("/v1/score", files={"image": (path.name, path.read_bytes(), "image/png")},
                      data={"category": _category(path), "request_id": "P-1",
                            "return_anomaly_map": "true"})
    assert multi.status_code == 200, multi.text
    m = multi.json()
    raw = http.post("/v1/score", content=path.read_bytes(), headers={"content-type": "image/png"},
                    params={"category": _category(path), "request_id": "P-2"})
    assert raw.status_code == 200, raw.text
    r = raw.json()
    assert m["request_id"] == "P-1" and r["request_id"] == "P-2"
    assert m["score"] == pytest.approx(r["score"])
    assert m["model"]["version"] == store.version == r["model"]["version"]
    assert m["anomaly_map_png_base64"] and r["anomaly_map_png_base64"] is None


def test_defects_score_higher_over_http(http: httpx.Client, good_and_defect) -> None:
    good, defect = good_and_defect

    def score(p: Path) -> float:
        resp = http.post("/v1/score", content=p.read_bytes(),
                         headers={"content-type": "application/octet-stream"},
                         params={"category": _category(p)})
        assert resp.status_code == 200, resp.text
        return resp.json()["score"]

    assert statistics.median(map(score, defect)) > statistics.median(map(score, good))


def test_models_endpoints(http: httpx.Client, store) -> None:
    listed = http.get("/v1/models").json()
    assert store.version in {m["ref"]["version"] for m in listed}
    one = http.get(f"/v1/models/{store.model_name}", params={"alias": "stfpm-fp32"}).json()
    assert one["ref"]["version"] == store.version and one["categories"] == ["brick", "coffee"]
    _problem(http.get("/v1/models/no-such-model"), 404)


@pytest.mark.parametrize("case", ["empty", "not-image", "truncated", "wrong-type", "no-file",
                                  "unknown-alias", "unknown-category", "bad-version"])
def test_bad_input_problem_json_then_still_serving(case: str, http: httpx.Client,
                                                   good_and_defect) -> None:
    good = good_and_defect[0][0].read_bytes()
    png = {"content-type": "image/png"}
    if case == "empty":
        body = _problem(http.post("/v1/score", content=b"", headers=png), 400)
        assert body["grpc_status"] == "INVALID_ARGUMENT"
    elif case == "not-image":
        _problem(http.post("/v1/score", content=b"GIF? no, plain text" * 9, headers=png), 400)
    elif case == "truncated":
        _problem(http.post("/v1/score", content=good[:200], headers=png), 400)
    elif case == "wrong-type":
        _problem(http.post("/v1/score", json={"image": "abc"}), 415)
    elif case == "no-file":
        _problem(http.post("/v1/score", data={"category": "brick"},
                           files={"other": ("x.txt", b"hello", "text/plain")}), 400)
    elif case == "unknown-alias":
        _problem(http.post("/v1/score", content=good, headers=png, params={"alias": "nope"}), 404)
    elif case == "unknown-category":
        _problem(http.post("/v1/score", content=good, headers=png, params={"category": "x"}), 400)
    elif case == "bad-version":
        _problem(http.post("/v1/score", content=good, headers=png, params={"version": "abc"}), 400)
    ok = http.post("/v1/score", content=good, headers=png)
    assert ok.status_code == 200 and ok.json()["model"]["version"]


def test_unknown_route_is_problem_json(http: httpx.Client) -> None:
    _problem(http.get("/v9/nothing"), 404)
    v2 = http.get("/v2/nothing")  # under /v2, the Open Inference Protocol's error shape
    assert v2.status_code == 404 and set(v2.json()) == {"error"}


def test_openapi_lists_routes(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/score", "/v1/models", "/v1/models/{name}", "/healthz", "/readyz"} <= set(paths)


def test_x_request_id_is_the_parts_id_and_echoed(http: httpx.Client, good_and_defect) -> None:
    """`X-Request-ID` (as proxies and MES software send it) names the part when the query
    gives no id, and every answer echoes the id it was logged under."""
    png = {"content-type": "image/png"}
    image = good_and_defect[0][0].read_bytes()
    r = http.post("/v1/score", content=image, headers={**png, "x-request-id": "SN-header-7"})
    assert r.status_code == 200, r.text
    assert r.json()["request_id"] == "SN-header-7" and r.headers["x-request-id"] == "SN-header-7"
    # The query's id wins over the header's; the answer names the one used.
    r = http.post("/v1/score", content=image, params={"request_id": "SN-query-8"},
                  headers={**png, "x-request-id": "SN-header-8"})
    assert r.json()["request_id"] == "SN-query-8" and r.headers["x-request-id"] == "SN-query-8"
    # None sent: the server's own id, echoed.
    r = http.post("/v1/score", content=image, headers=png)
    assert r.headers["x-request-id"] == r.json()["request_id"] and len(r.headers["x-request-id"]) == 32
    # UTF-8, as plant software sends it: the part is logged under the same id, in the query's
    # and in the header's way alike, and the echo is the same bytes.
    def echoed(r: httpx.Response) -> bytes:
        return next(v for k, v in r.headers.raw if k.lower() == b"x-request-id")

    r = http.post("/v1/score", content=image, headers={**png, "x-request-id": "pièce-42 日本".encode()})
    assert r.status_code == 200, r.text
    assert r.json()["request_id"] == "pièce-42 日本" and echoed(r) == "pièce-42 日本".encode()
    r = http.post("/v1/score", content=image, params={"request_id": "部品-9"}, headers=png)
    assert r.status_code == 200 and echoed(r) == "部品-9".encode(), r.text
    # A header that cannot be a part's id (a proxy's long trace id, bytes that are not UTF-8)
    # is not a reason to refuse the part: the server names it, and the echo says so.
    for header in (b"x" * 200, b"\xff\xfe-not-utf8", b"tab\there"):
        r = http.post("/v1/score", content=image, headers={**png, "x-request-id": header})
        assert r.status_code == 200, (header, r.text)
        assert len(r.json()["request_id"]) == 32 and echoed(r) == r.json()["request_id"].encode()
    # Other routes echo it too.
    assert http.get("/v1/models", headers={"x-request-id": "trace-me"}).headers["x-request-id"] == "trace-me"
    assert "x-request-id" not in http.get("/v1/models").headers

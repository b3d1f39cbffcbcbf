"""What the HTTP API does with bodies and text it cannot use: client text that protobuf
cannot carry (lone surrogates) answers 400 naming the field, a client that disconnects
mid-upload is logged as such (no "internal error", no traceback), and a body that does not
arrive in time is dropped with its memory reservation (408). Real server processes (the
separate gateway and the in-process HTTP API), real sockets."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtests.launch import free_port, start_gateway, start_server, wait_http_ready

BODY_TIMEOUT_S = 4.0
MIB = 1 << 20


@pytest.fixture(scope="module")
def apis(store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Path]]]:
    """The separate gateway and the in-process HTTP API (one server): name -> (base URL, log)."""
    work = tmp_path_factory.mktemp("http-bodies")
    port = free_port()
    timeout = {"ANOMALY_HTTP_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S)}
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=work / "cache",
                                 env={"ANOMALY_HTTP_IN_PROCESS": "true", "ANOMALY_HTTP_PORT": str(port),
                                      **timeout})
    inprocess = f"http://127.0.0.1:{port}"
    wait_http_ready(f"{inprocess}/healthz", 30)
    gateway, base = start_gateway(target, work / "gateway.log", env=timeout)
    yield {"gateway": (base, work / "gateway.log"), "in-process": (inprocess, work / "server.log")}
    gateway.stop()
    assert child.stop() == 0, (work / "server.log").read_text()


def _problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()


@pytest.mark.parametrize("api", ["gateway", "in-process"])
def test_lone_surrogates_in_client_text_answer_400_naming_the_field(apis, api: str, good_and_defect) -> None:
    """A JSON-escaped U+D800 (feedback) and multipart fields decoded to lone surrogates (score: its
    charset parameter) cannot go into a protobuf string: 400 naming the field, not 500 (which
    the SDK retries); the API keeps answering."""
    base, _ = apis[api]
    image = good_and_defect[0][0].read_bytes()
    with httpx.Client(base_url=base, timeout=30) as http:
        for field in ("comment", "operator", "request_id", "defect_type", "station"):
            doc = {"request_id": "SN-1", "verdict": "OK", field: "part \\ud800"}
            body = ", ".join(f'"{k}": "{v}"' for k, v in doc.items())
            r = http.post("/v1/feedback", content="{" + body + "}",
                          headers={"content-type": "application/json"})
            problem = _problem(r, 400)
            assert problem["grpc_status"] == "INVALID_ARGUMENT" and field in problem["detail"], problem
        for field in ("request_id", "station", "category", "model", "alias"):
            boundary = "b0undary"
            form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"\r\n\r\n"
                    "SN \\ud800\r\n"
                    f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                    "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
            r = http.post("/v1/score", content=form, headers={
                "content-type": f"multipart/form-data; charset=unicode_escape; boundary={boundary}"})
            problem = _problem(r, 400)
            assert problem["grpc_status"] == "INVALID_ARGUMENT" and field in problem["detail"], problem
        ok = http.post("/v1/score", content=image, params={"request_id": "SN-é"},
                       headers={"content-type": "image/png"})
        assert ok.status_code == 200, ok.text


def _send(base: str, head: bytes, body: bytes = b"") -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head + body)
    return sock


@pytest.mark.parametrize("api", ["gateway", "in-process"])
def test_a_client_disconnecting_mid_upload_is_not_an_internal_error(apis, api: str) -> None:
    """A client that sends part of its body and hangs up is logged as a disconnect, without
    a traceback, raw or multipart."""
    base, log = apis[api]
    before = log.read_text()
    for ctype in ("image/png", "multipart/form-data; boundary=b0undary"):
        sock = _send(base, f"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     "Content-Length: 100000\r\n\r\n".encode(),
                     b"--b0undary\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                     b"Content-Type: image/png\r\n\r\n" + b"\0" * 5000)
        time.sleep(0.5)
        sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and log.read_text()[len(before):].count("disconnected") < 2:
        time.sleep(0.2)
    new = log.read_text()[len(before):]
    assert "internal error" not in new and "Traceback" not in new, new
    assert new.count("disconnected") == 2, new
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200


def _answer(sock: socket.socket) -> bytes:
    """What the server sends until it closes the connection (or 15 s pass)."""
    sock.settimeout(15)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except TimeoutError:
        pass
    finally:
        sock.close()
    return answer


@pytest.mark.parametrize("api", ["gateway", "in-process"])
def test_stalled_bodies_time_out_and_free_the_body_memory(apis, api: str, store, good_and_defect) -> None:
    """Connections that send headers with a large Content-Length and then no body reserve the
    body-memory budget (`ANOMALY_HTTP_BODY_MEMORY_MB`, 128 MB) before any authentication:
    while they hold it real requests get 429. A body not in after `http_body_timeout_s` is
    dropped: 408 (problem+json under /v1, `{"error"}` under /v2), the connection closed, the
    memory freed (real requests succeed again), counted and logged. A slow but steady upload
    that finishes within the limit is scored."""
    base, log = apis[api]
    image = good_and_defect[0][0].read_bytes()
    png = {"content-type": "image/png"}
    before = log.read_text()
    infer = f"/v2/models/{store.model_name}/infer"
    v1_raw = 8 * MIB  # ANOMALY_MAX_IMAGE_BYTES; the budget holds 3 copies of each declared body
    multipart = (32 * MIB - 3 * v1_raw) // 3 - len(image) + 1  # too little left for the real one
    stalls = [(infer, "application/json", 16 * MIB), (infer, "application/json", 16 * MIB),
              ("/v1/score", "image/png", v1_raw), ("/v1/score", "multipart/form-data; boundary=b", multipart)]
    with httpx.Client(base_url=base, timeout=30) as http:
        t0 = time.monotonic()
        sockets = [_send(base, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {length}\r\n\r\n".encode()) for path, ctype, length in stalls]
        time.sleep(0.5)
        busy = http.post("/v1/score", content=image, headers=png)
        assert busy.status_code == 429 and "gateway busy" in busy.json()["detail"], busy.text
        assert busy.headers["retry-after"] == "1"
        answers = [_answer(sock) for sock in sockets]
        waited = time.monotonic() - t0
        for (path, _, _), answer in zip(stalls, answers, strict=True):
            assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
            if path == infer:
                assert b'{"error":' in answer and b"did not arrive within" in answer, answer
            else:
                assert b"application/problem+json" in answer and b"did not arrive within" in answer, answer
        assert waited < BODY_TIMEOUT_S + 5, waited
        ok = http.post("/v1/score", content=image, headers=png)
        assert ok.status_code == 200, ok.text

        def steady() -> Iterator[bytes]:  # the whole body over about half the limit
            pieces = 8
            step = -(-len(image) // pieces)
            for i in range(pieces):
                time.sleep(BODY_TIMEOUT_S / 2 / pieces)
                yield image[i * step:(i + 1) * step]

        t0 = time.monotonic()
        slow = http.post("/v1/score", content=steady(), headers={**png, "content-length": str(len(image))})
        assert slow.status_code == 200 and time.monotonic() - t0 >= BODY_TIMEOUT_S / 2, slow.text
        metrics = http.get("/metrics").text if api == "gateway" else ""
    if api == "gateway":
        assert "anomaly_http_body_timeouts_total 4.0" in metrics, metrics
    new = log.read_text()[len(before):]
    assert new.count("WARNING") >= 4 and new.count("did not arrive within") == 4, new
    assert "Traceback" not in new, new

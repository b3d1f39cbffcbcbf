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


@pytest.fixture(scope="module")
def apis(store, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[str, Path]]]:
    """The separate gateway and the in-process HTTP API (one server): name -> (base URL, log)."""
    work = tmp_path_factory.mktemp("http-bodies")
    port = free_port()
    child, target = start_server(store.tracking_uri, work / "server.log", cache_dir=work / "cache",
                                 env={"ANOMALY_HTTP_IN_PROCESS": "true", "ANOMALY_HTTP_PORT": str(port)})
    inprocess = f"http://127.0.0.1:{port}"
    wait_http_ready(f"{inprocess}/healthz", 30)
    gateway, base = start_gateway(target, work / "gateway.log")
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

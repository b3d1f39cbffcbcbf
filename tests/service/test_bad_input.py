"""The bad-input catalogue (docs/bad-input.md), case by case, over gRPC and HTTP.

Each case is sent to the session's real server and gateway; it must get its documented gRPC
status / HTTP code and a message naming the problem, and the very next good request must
succeed. Formats the server converts (CMYK, palette, RGBA, 16-bit) must score like any
image. `test_docs_table_lists_every_case` keeps the documentation and this file in step.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"
LIMIT = 8 * 1024 * 1024  # the server's default ANOMALY_MAX_IMAGE_BYTES
PNG = "image/png"


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8))


def _bomb() -> bytes:
    """A 12 KB PNG whose header says 10000 × 10000 pixels (100 M > the 24 M limit)."""
    return _encode(Image.new("1", (10_000, 10_000)), "PNG", optimize=True)


def _sixteen_bit_tiff() -> bytes:
    arr = np.linspace(0, 65535, 64 * 64, dtype=np.uint16).reshape(64, 64)
    return _encode(Image.fromarray(arr), "TIFF")  # mode I;16


def _raw(width: int, height: int, channels: int = 3, data: bytes | None = None) -> pb.ScoreRequest:
    size = width * height * channels
    return pb.ScoreRequest(raw=pb.RawImage(data=data if data is not None else b"\0" * min(size, 1 << 20),
                                           width=width, height=height, channels=channels))


@dataclass(frozen=True)
class Case:
    """One kind of input: how to send it, and what must come back ("OK" = handled)."""

    kind: str
    grpc: Callable[[], pb.ScoreRequest] | None
    grpc_code: str
    http: Callable[[], dict] | None  # httpx.post keyword arguments for /v1/score
    http_status: int
    message: str  # regex the error message must match (ignored when handled)


def _body(data: bytes, ctype: str = PNG, **params: str) -> Callable[[], dict]:
    return lambda: {"content": data, "headers": {"content-type": ctype}, "params": params}


_CMYK = _encode(_photo().convert("CMYK"), "JPEG")
_PALETTE = _encode(_photo().quantize(16), "PNG")
_RGBA = _encode(_photo().convert("RGBA"), "PNG")
_FLOAT = _encode(Image.new("F", (32, 32), 0.5), "TIFF")
_GOOD = _encode(_photo(), "PNG")
_TRUNCATED_JPEG = _encode(_photo(), "JPEG")[:600]
_TRUNCATED_PNG = _encode(_photo(), "PNG")[:300]
_BAD_CHUNK_PNG = _GOOD[:37] + b"\0" + _GOOD[38:]  # the chunk after IHDR gets a non-ASCII name
_TEXT = b"%PDF-1.4 definitely not pixels " * 8

CASES = [
    Case("empty body", lambda: pb.ScoreRequest(encoded=b""), "INVALID_ARGUMENT", _body(b""), 400, "empty"),
    Case("no image field", lambda: pb.ScoreRequest(), "INVALID_ARGUMENT",
         lambda: {"data": {"category": "brick"}, "files": {"other": ("a.txt", b"hi", "text/plain")}},
         400, "no image|'image'"),
    Case("not an image", lambda: pb.ScoreRequest(encoded=_TEXT), "INVALID_ARGUMENT", _body(_TEXT), 400,
         "not an image"),
    Case("truncated PNG", lambda: pb.ScoreRequest(encoded=_TRUNCATED_PNG), "INVALID_ARGUMENT",
         _body(_TRUNCATED_PNG), 400, "corrupt or truncated"),
    Case("PNG with a corrupt chunk name", lambda: pb.ScoreRequest(encoded=_BAD_CHUNK_PNG),
         "INVALID_ARGUMENT", _body(_BAD_CHUNK_PNG), 400, "not an image|corrupt or truncated"),
    Case("truncated JPEG", lambda: pb.ScoreRequest(encoded=_TRUNCATED_JPEG), "INVALID_ARGUMENT",
         _body(_TRUNCATED_JPEG, "image/jpeg"), 400, "corrupt or truncated"),
    Case("over the byte limit", lambda: pb.ScoreRequest(encoded=b"\x89PNG" + b"\0" * LIMIT),
         "INVALID_ARGUMENT", _body(b"\x89PNG" + b"\0" * LIMIT), 413, "limit is 8388608"),
    Case("oversize gRPC message", lambda: pb.ScoreRequest(encoded=b"\0" * (LIMIT + 128 * 1024)),
         "RESOURCE_EXHAUSTED", None, 0, "larger than max"),
    Case("decompression bomb (pixel limit)", lambda: pb.ScoreRequest(encoded=_bomb()), "INVALID_ARGUMENT",
         lambda: _body(_bomb())(), 400, "100000000 pixels; the limit is 24000000"),
    Case("zero dimensions (raw)", lambda: _raw(0, 64), "INVALID_ARGUMENT", None, 0, "zero size"),
    Case("huge dimensions (raw)", lambda: _raw(100_000, 100_000), "INVALID_ARGUMENT", None, 0,
         "limit is 24000000 pixels"),
    Case("raw byte length mismatch", lambda: _raw(4, 4, data=b"\0" * 10), "INVALID_ARGUMENT", None, 0,
         "byte length"),
    Case("raw channel count", lambda: _raw(4, 4, channels=2), "INVALID_ARGUMENT", None, 0, "2 channels"),
    Case("32-bit float TIFF", lambda: pb.ScoreRequest(encoded=_FLOAT), "INVALID_ARGUMENT",
         _body(_FLOAT, "image/tiff"), 400, "32-bit float"),
    Case("CMYK JPEG (converted)", lambda: pb.ScoreRequest(encoded=_CMYK), "OK",
         _body(_CMYK, "image/jpeg"), 200, ""),
    Case("palette PNG (converted)", lambda: pb.ScoreRequest(encoded=_PALETTE), "OK",
         _body(_PALETTE), 200, ""),
    Case("RGBA PNG (alpha dropped)", lambda: pb.ScoreRequest(encoded=_RGBA), "OK", _body(_RGBA), 200, ""),
    Case("16-bit TIFF (scaled to 8 bits)", lambda: pb.ScoreRequest(encoded=_sixteen_bit_tiff()), "OK",
         lambda: _body(_sixteen_bit_tiff(), "image/tiff")(), 200, ""),
    Case("unknown category", lambda: pb.ScoreRequest(encoded=_GOOD, category="bolts"), "INVALID_ARGUMENT",
         _body(_GOOD, category="bolts"), 400, "unknown category 'bolts'"),
    Case("unknown model", lambda: pb.ScoreRequest(encoded=b"x", model="no-such-model"), "NOT_FOUND",
         _body(b"x", model="no-such-model"), 404, "no-such-model"),
    Case("unknown alias", lambda: pb.ScoreRequest(encoded=b"x", alias="no-such-alias"), "NOT_FOUND",
         _body(b"x", alias="no-such-alias"), 404, "no-such-alias"),
    Case("unknown version", lambda: pb.ScoreRequest(encoded=b"x", version=999), "NOT_FOUND",
         _body(b"x", version="999"), 404, "999"),
    Case("alias and version both", lambda: pb.ScoreRequest(encoded=b"x", alias="champion", version=1),
         "INVALID_ARGUMENT", _body(b"x", alias="champion", version="1"), 400, "not both"),
    Case("version not a number", None, "", _body(b"x", version="abc"), 400, "version"),
    Case("version out of range", None, "", _body(_GOOD, version="-1"), 400, "between 0 and 4294967295"),
    Case("request id too long", lambda: pb.ScoreRequest(encoded=_GOOD, request_id="x" * 129),
         "INVALID_ARGUMENT", _body(_GOOD, request_id="x" * 129), 400, "request_id is 129 characters long"),
    Case("control character in request id", lambda: pb.ScoreRequest(encoded=_GOOD, request_id="SN-1\nFAKE"),
         "INVALID_ARGUMENT", _body(_GOOD, request_id="SN-1\nFAKE"), 400,
         "request_id contains the non-printable character U\\+000A"),
    Case("station too long", lambda: pb.ScoreRequest(encoded=_GOOD, station="s" * 200),
         "INVALID_ARGUMENT", _body(_GOOD, station="s" * 200), 400, "station is 200 characters long"),
    Case("control character in station", lambda: pb.ScoreRequest(encoded=_GOOD, station="line\x1b[31m"),
         "INVALID_ARGUMENT", _body(_GOOD, station="line\x1b[31m"), 400, "station contains the non-printable"),
    Case("multipart with two files", None, "",
         lambda: {"files": [("image", ("a.png", _GOOD, PNG)), ("image", ("b.png", _GOOD, PNG))]},
         400, "Too many files"),
    Case("multipart with too many fields", None, "",
         lambda: {"files": {"image": ("a.png", _GOOD, PNG)}, "data": {f"f{i}": "x" for i in range(40)}},
         400, "Too many fields"),
    Case("wrong content type", None, "", lambda: {"content": b"x", "headers": {"content-type": "text/plain"}},
         415, "content type 'text/plain'"),
    Case("malformed JSON (not a JSON API)", None, "",
         lambda: {"content": b'{"image": ', "headers": {"content-type": "application/json"}}, 415,
         "application/json"),
    Case("malformed multipart", None, "",
         lambda: {"content": b"--XYZ\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nno end",
                  "headers": {"content-type": "multipart/form-data; boundary=XYZ"}}, 400, "multipart"),
]


@pytest.fixture(scope="module")
def stub(grpc_target: str):
    with grpc.insecure_channel(grpc_target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield pb_grpc.AnomalyDetectionStub(ch)


@pytest.fixture(scope="module")
def good(good_and_defect) -> bytes:
    return good_and_defect[0][0].read_bytes()


def _grpc_cases() -> list:
    return [pytest.param(c, id=c.kind) for c in CASES if c.grpc is not None]


def _http_cases() -> list:
    return [pytest.param(c, id=c.kind) for c in CASES if c.http is not None]


@pytest.mark.parametrize("case", _grpc_cases())
def test_grpc(case: Case, stub, good: bytes) -> None:
    if case.grpc_code == "OK":
        r = stub.Score(case.grpc(), timeout=30)
        assert np.isfinite(r.score) and r.model.version
    else:
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(case.grpc(), timeout=30)
        assert info.value.code().name == case.grpc_code, info.value.details()
        assert re.search(case.message, info.value.details()), info.value.details()
    assert stub.Score(pb.ScoreRequest(encoded=good), timeout=30).model.version  # still serving


@pytest.mark.parametrize("case", _http_cases())
def test_http(case: Case, http_base: str, good: bytes) -> None:
    with httpx.Client(base_url=http_base, timeout=60) as http:
        r = http.post("/v1/score", **case.http())
        assert r.status_code == case.http_status, r.text[:500]
        if case.http_status == 200:
            assert np.isfinite(r.json()["score"])
        else:
            assert r.headers["content-type"].startswith("application/problem+json")
            body = r.json()
            assert body["status"] == case.http_status and re.search(case.message, body["detail"]), body
        ok = http.post("/v1/score", content=good, headers={"content-type": PNG})
        assert ok.status_code == 200  # still serving


def test_docs_table_lists_every_case() -> None:
    text = DOC.read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    missing = [c.kind for c in CASES if c.kind not in rows]
    assert not missing, f"docs/bad-input.md lacks rows for {missing}"
    assert len(CASES) >= 15

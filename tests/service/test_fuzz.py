"""Bounded fuzzing: property tests (hypothesis) of image decoding and request parsing, and
schemathesis against the gateway's own OpenAPI document on the session's real gateway.

The property: whatever the bytes or fields, the answer is a value or the service's own
`InvalidInput` / problem+json, never another exception, never a 5xx, never a crash; and
the server answers a good request afterwards. Budgets are fixed and small (CI time).
"""

from __future__ import annotations

import base64
import copy
import io
import json

import httpx
import numpy as np
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from service.errors import InvalidInput
from service.runtime.imaging import decode_image, raw_to_rgb

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _decodes_or_refuses(data: bytes, draft: tuple[int, int] | None = None) -> None:
    try:
        rgb = decode_image(data, max_bytes=1 << 20, max_pixels=1 << 22, draft=draft)
    except InvalidInput:
        return
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.size > 0


@FAST
@given(st.binary(max_size=2048))
def test_decode_arbitrary_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@FAST
@given(st.lists(st.tuples(st.integers(0, len(PNG) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(8, len(PNG)))
def test_decode_mutated_png(flips: list[tuple[int, int]], keep: int) -> None:
    data = bytearray(PNG)
    for pos, value in flips:
        data[pos] = value
    _decodes_or_refuses(bytes(data[:keep]))


@FAST
@given(st.lists(st.tuples(st.integers(0, len(JPEG) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(8, len(JPEG)), st.sampled_from([None, (12, 20), (24, 40), (48, 80)]))
def test_decode_mutated_jpeg_at_reduced_scale(flips: list[tuple[int, int]], keep: int,
                                              draft: tuple[int, int] | None) -> None:
    """The reduced-size JPEG decoding (libjpeg's DCT scaling) on damaged files: decoded or
    refused with InvalidInput, never another error."""
    data = bytearray(JPEG)
    for pos, value in flips:
        data[pos] = value
    _decodes_or_refuses(bytes(data[:keep]), draft)


@FAST
@given(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 6), st.sampled_from([0, 1, 8, 12, 16, 32]),
       st.integers(0, 4096))
def test_raw_pixels_arbitrary_fields(width: int, height: int, channels: int, bits: int, n: int) -> None:
    try:
        rgb = raw_to_rgb(b"\x7f" * n, width, height, channels, bits, max_pixels=1 << 20)
    except InvalidInput:
        return
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(params=st.dictionaries(st.sampled_from(["model", "alias", "version", "category", "request_id",
                                                "return_anomaly_map", "station", "junk"]),
                              st.text(max_size=40), max_size=5),
       ctype=st.sampled_from(["image/png", "application/octet-stream", "multipart/form-data",
                              "multipart/form-data; boundary=x", "application/json", "", "text/plain"]),
       body=st.binary(max_size=256))
def test_gateway_score_parsing(http_base: str, params: dict, ctype: str, body: bytes) -> None:
    """Arbitrary query fields, content types and bodies: 2xx or 4xx problem+json, never 5xx."""
    r = httpx.post(f"{http_base}/v1/score", params=params, content=body,
                   headers={"content-type": ctype} if ctype else {}, timeout=30)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/problem+json")


def test_gateway_openapi(http_base: str) -> None:
    """Every operation of the gateway's OpenAPI document, 25 schemathesis cases each: no 5xx.

    Driven through `as_strategy`: schemathesis' pytest fixture loader fails under pytest 9.
    """
    schema = schemathesis.openapi.from_url(f"{http_base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/score", "/v1/models", "/v1/models/{name}"}
    for operation in operations:
        @given(operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:  # noqa: ANN001
            case.call_and_validate(checks=[not_a_server_error])

        fuzz()


def test_gateway_v2_openapi(http_base: str) -> None:
    """The Open Inference Protocol routes that take a body (infer, repository index, load,
    unload), from the request bodies the gateway documents: bodies that follow the schema
    and bodies that break it (schemathesis' positive and negative modes), 50 cases each for
    infer and 20 for the others, for the served model: no 5xx, and every error in the
    protocol's `{"error": …}` shape. Generic schema fuzzing rarely reaches the parser's
    corners: `test_gateway_v2_mutated_requests` aims there."""
    schema = schemathesis.openapi.from_url(f"{http_base}/openapi.json")
    operations = [op for op in (result.ok() for result in schema.get_all_operations())
                  if op.path.startswith("/v2/") and op.method.upper() == "POST"]
    assert {op.path for op in operations} == {
        "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer",
        "/v2/repository/index", "/v2/repository/models/{model}/load", "/v2/repository/models/{model}/unload"}
    assert all(op.body for op in operations), "every V2 POST documents its request body"
    for operation in operations:
        pinned = {"model": "anomaly-detector"} if "{model}" in operation.path else None
        examples = 50 if operation.path.endswith("/infer") else 20
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(operation.as_strategy(generation_mode=mode, path_parameters=pinned))
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:  # noqa: ANN001
                response = case.call_and_validate(checks=[not_a_server_error])
                if response.status_code >= 400:
                    assert "error" in response.json(), response.text[:300]

            fuzz()


GOOD_V2 = {
    "id": "fuzz",
    "parameters": {"category": "brick", "return_anomaly_map": False, "binary_data_output": False, "x": 1},
    "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"x": "y"},
                "data": [base64.b64encode(PNG).decode()]}],
    "outputs": [{"name": "score", "parameters": {"binary_data": False}}, {"name": "is_anomalous"}],
}


def _places(doc: object, at: tuple = ()) -> list[tuple]:
    """Every value's path (keys and indexes) in a JSON document, and a new key in each object."""
    places = [at]
    if isinstance(doc, dict):
        places.append((*at, "added"))
        for key, value in doc.items():
            places += _places(value, (*at, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            places += _places(value, (*at, index))
    return places


HOSTILE = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 2**32, -1, 0, True, False, None, 0.5, 1e300, "", {}, [],
                     [[]], {"b64": 5}, "%%%"]),
    st.text(st.characters(categories=["Cs"]) | st.characters(), max_size=6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(-(2**64), 2**64) | st.text(max_size=3) | st.none(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers() | st.text(max_size=3) | st.booleans(), max_size=2),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(where=st.sampled_from(_places(GOOD_V2)), value=HOSTILE, tail=st.sampled_from([b"", b"\0", b"junk"]))
def test_gateway_v2_mutated_requests(http_base: str, where: tuple, value: object, tail: bytes) -> None:
    """A good V2 inference request with one value anywhere in it (or a new key) made hostile,
    and sometimes bytes after its JSON: 200 or a 4xx `{"error": …}`, never a 5xx."""
    doc: object = copy.deepcopy(GOOD_V2)
    if where:
        parent = doc
        for step in where[:-1]:
            parent = parent[step]
        parent[where[-1]] = value
    else:
        doc = value
    body = json.dumps(doc).encode()
    headers = {"content-type": "application/json"}
    if tail:
        headers["Inference-Header-Content-Length"] = str(len(body))
    r = httpx.post(f"{http_base}/v2/models/anomaly-detector/infer", content=body + tail, headers=headers,
                   timeout=30)
    assert r.status_code < 500, (where, value, r.status_code, r.text[:300])
    assert r.status_code == 200 or "error" in r.json(), r.text[:300]


def test_still_serving_after_fuzzing(http_base: str, good_and_defect) -> None:
    r = httpx.post(f"{http_base}/v1/score", content=good_and_defect[0][0].read_bytes(),
                   headers={"content-type": "image/png"}, timeout=30)
    assert r.status_code == 200

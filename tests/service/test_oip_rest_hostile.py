"""Hostile bodies for the Open Inference Protocol (V2) REST routes: every bad body is a 400
with the protocol's `{"error": "…"}` saying what is wrong, never a 5xx (which the SDK would
retry as transient), and never a silent acceptance; each followed by a good request.

Each case runs twice: against `service.protocol.rest.oip_body.infer_request` alone (fast, no server), when
the gateway itself is to refuse it, and through the session's real gateway."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from anomaly.oip.tensors import serialize_bytes
from service.protocol.rest import oip_body
from service.protocol.rest.forwarding import Problem

INFER = "/v2/models/anomaly-detector/infer"
INT64_MAX = 2**63 - 1
DEEP = 20_000  # far past Python's recursion limit (1000), and in the repository routes' 64 KiB
LIMIT = 64  # the documented depth limit, oip_body.MAX_JSON_DEPTH


@dataclass(frozen=True)
class Case:
    """One hostile body: how to build it from a good image, what to send it with, and the
    words the `error` must hold. `gateway`: the gateway refuses it before the server sees it."""

    body: Callable[[bytes], bytes]
    text: str
    headers: dict[str, str] = field(default_factory=dict)
    route: str = INFER
    status: int = 400
    gateway: bool = True


def _b64(image: bytes) -> str:
    return base64.b64encode(image).decode()


def _input(image: bytes, **over: object) -> dict:
    tensor: dict = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [_b64(image)]}
    tensor.update(over)
    return {k: v for k, v in tensor.items() if v is not None}


def _doc(image: bytes, tensor: dict | None = None, **over: object) -> bytes:
    doc: dict = {"inputs": [_input(image) if tensor is None else tensor]}
    doc.update(over)
    return json.dumps(doc).encode()


def _pixels(values: list) -> Callable[[bytes], bytes]:
    """A UINT8 [1, 4, 4, 3] pixel input whose 48 values end with `values`."""
    data = [128] * (48 - len(values)) + values
    tensor = {"name": "image", "datatype": "UINT8", "shape": [1, 4, 4, 3], "data": data}
    return lambda image: _doc(image, tensor)


def _binary(extra: bytes = b"", size_delta: int = 0, **params: object) -> Callable[[bytes], bytes]:
    """The image as a binary tensor, its `binary_data_size` off by `size_delta`, then `extra`."""

    def build(image: bytes) -> bytes:
        raw = serialize_bytes([image])
        tensor = {"name": "image", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": len(raw) + size_delta, **params}}
        return _doc(image, tensor) + raw + extra

    return build


def _binary_tensor(image: bytes) -> dict:
    return {"name": "image", "datatype": "BYTES", "shape": [1],
            "parameters": {"binary_data_size": len(serialize_bytes([image]))}}


def _nested(depth: int, inner: str) -> str:
    return "[" * depth + inner + "]" * depth


def _deep_data(image: bytes, depth: int) -> bytes:
    """The image as the one element of `data` nested in `depth` lists (of shape [1, 1, …]
    when that is short): the whole document is `depth + 3` deep (itself, `inputs`, the input)."""
    data = _nested(depth, json.dumps(_b64(image)))
    shape = json.dumps([1] * depth if depth <= LIMIT else [1])
    return ('{"inputs": [{"name": "image", "datatype": "BYTES", "shape": ' + shape + ', "data": ' + data
            + "}]}").encode()


BINARY = "binary"  # marks a case sent with the Inference-Header-Content-Length of its JSON

CASES: dict[str, Case] = {
    # -- JSON itself -------------------------------------------------------------------------
    "deeply nested arrays": Case(lambda i: _deep_data(i, DEEP), "nested deeper than"),
    "deeply nested objects": Case(
        lambda i: ('{"parameters": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + ', "inputs": []}').encode(),
        "nested deeper than"),
    "one level past the depth limit": Case(lambda i: _deep_data(i, LIMIT - 2), "nested deeper than"),
    "an integer of 5000 digits": Case(lambda i: _doc(i)[:-1] + b', "x": ' + b"7" * 5000 + b"}",
                                      "not JSON"),
    "NaN": Case(lambda i: _doc(i)[:-1] + b', "parameters": {"x": NaN}}', "not JSON"),
    "Infinity in data": Case(lambda i: _doc(i, {"name": "image", "datatype": "FP32", "shape": [1],
                                                "data": [0.0]}).replace(b"0.0", b"Infinity"), "not JSON"),
    "empty body": Case(lambda i: b"", "not JSON"),
    "not UTF-8": Case(lambda i: b'{"inputs": "\xff"}', "not JSON"),
    "a JSON array": Case(lambda i: b"[]", "JSON object"),
    # -- Inference-Header-Content-Length ---------------------------------------------------
    "header length negative": Case(lambda i: _doc(i), "Inference-Header-Content-Length",
                                   {"Inference-Header-Content-Length": "-1"}),
    "header length not a number": Case(lambda i: _doc(i), "Inference-Header-Content-Length",
                                       {"Inference-Header-Content-Length": "twelve"}),
    "header length with underscores": Case(lambda i: _doc(i), "Inference-Header-Content-Length",
                                           {"Inference-Header-Content-Length": "1_0"}),
    "header length with a sign": Case(lambda i: _doc(i), "Inference-Header-Content-Length",
                                      {"Inference-Header-Content-Length": "+1"}),
    "header length past the body": Case(lambda i: _doc(i), "Inference-Header-Content-Length",
                                        {"Inference-Header-Content-Length": str(10**30)}),
    # -- the binary section ------------------------------------------------------------------
    "extra bytes after the binary tensors": Case(_binary(extra=b"junk"), "4 byte(s) more", {"_": BINARY}),
    "missing binary bytes": Case(_binary(size_delta=+5), "binary_data_size", {"_": BINARY}),
    "binary bytes with no binary input": Case(lambda i: _doc(i) + b"\0\0\0", "3 byte(s) more", {"_": BINARY}),
    "binary_data_size a boolean": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "BYTES", "shape": [1],
                           "parameters": {"binary_data_size": True}}) + b"\0",
        "binary_data_size", {"_": BINARY}),
    "binary_data_size negative": Case(_binary(size_delta=-10**6), "binary_data_size", {"_": BINARY}),
    "binary_data_size beyond int64": Case(_binary(size_delta=2**64), "binary_data_size", {"_": BINARY}),
    "binary_data_size a float": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "BYTES", "shape": [1],
                           "parameters": {"binary_data_size": 1.5}}),
        "binary_data_size", {"_": BINARY}),
    "binary data and JSON data both": Case(
        lambda i: _doc(i, {**_input(i), "parameters": {"binary_data_size": len(serialize_bytes([i]))}})
        + serialize_bytes([i]), "both", {"_": BINARY}),
    "binary size not the shape's": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "UINT8", "shape": [1, 4, 4, 3],
                           "parameters": {"binary_data_size": 10}}) + b"\0" * 10,
        "48 bytes", {"_": BINARY}),
    "binary BYTES elements not the shape's": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "BYTES", "shape": [2],
                           "parameters": {"binary_data_size": len(serialize_bytes([i]))}})
        + serialize_bytes([i]), "holds 1 element(s)", {"_": BINARY}),
    "binary datatype unknown": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "FP128", "shape": [1],
                           "parameters": {"binary_data_size": 16}}) + b"\0" * 16,
        "unknown datatype", {"_": BINARY}),
    # -- request parameters ------------------------------------------------------------------
    "parameters a string": Case(lambda i: _doc(i, parameters="x"), "parameters must be a JSON object"),
    "parameters a list": Case(lambda i: _doc(i, parameters=[]), "parameters must be a JSON object"),
    "parameters false": Case(lambda i: _doc(i, parameters=False), "parameters must be a JSON object"),
    "parameter beyond int64": Case(lambda i: _doc(i, parameters={"x": 2**70}), "int64"),
    "parameter below int64": Case(lambda i: _doc(i, parameters={"x": -(2**63) - 1}), "int64"),
    "parameter an object": Case(lambda i: _doc(i, parameters={"x": {"a": 1}}), "boolean, number or string"),
    "parameter null": Case(lambda i: _doc(i, parameters={"x": None}), "boolean, number or string"),
    "parameter key not UTF-8": Case(lambda i: _doc(i, parameters={"\ud800": 1}), "UTF-8"),
    "parameter value not UTF-8": Case(lambda i: _doc(i, parameters={"category": "\udfff"}), "UTF-8"),
    "binary_data_output a string": Case(lambda i: _doc(i, parameters={"binary_data_output": "no"}),
                                        "binary_data_output must be a boolean"),
    "return_anomaly_map a number": Case(lambda i: _doc(i, parameters={"return_anomaly_map": 3}),
                                        "return_anomaly_map must be a boolean"),
    "category a number": Case(lambda i: _doc(i, parameters={"category": 5}), "category must be a string"),
    "station a list": Case(lambda i: _doc(i, parameters={"station": ["a"]}), "station must be a string"),
    # -- id ------------------------------------------------------------------------------------
    "id an object": Case(lambda i: _doc(i, id={"a": 1}), "id must be a string"),
    "id a number": Case(lambda i: _doc(i, id=5), "id must be a string"),
    "id not UTF-8": Case(lambda i: _doc(i, id="\ud800"), "UTF-8"),
    "id of 100 000 characters": Case(lambda i: _doc(i, id="x" * 100_000), "at most 128", gateway=False),
    # -- inputs ------------------------------------------------------------------------------
    "no inputs": Case(lambda i: b'{"id": "a"}', "list of inputs"),
    "inputs an object": Case(lambda i: b'{"inputs": {"name": "image"}}', "list of inputs"),
    "an input not an object": Case(lambda i: b'{"inputs": [5]}', "needs a name, a datatype and a shape"),
    "input name not UTF-8": Case(lambda i: _doc(i, _input(i, name="\ud800")), "UTF-8"),
    "input datatype a number": Case(lambda i: _doc(i, _input(i, datatype=8)), "needs a name, a datatype"),
    "input datatype unknown": Case(lambda i: _doc(i, _input(i, datatype="FP128")), "unknown datatype"),
    "input parameters a string": Case(lambda i: _doc(i, _input(i, parameters="x")),
                                      "parameters must be a JSON object"),
    "input parameter beyond int64": Case(lambda i: _doc(i, _input(i, parameters={"x": 2**64})), "int64"),
    "shape a number": Case(lambda i: _doc(i, _input(i, shape=1)), "shape"),
    "shape of booleans": Case(lambda i: _doc(i, _input(i, shape=[True])), "shape"),
    "shape of floats": Case(lambda i: _doc(i, _input(i, shape=[1.0])), "shape"),
    "shape dimension beyond int64": Case(lambda i: _doc(i, _input(i, shape=[2**70])), "int64"),
    "shape dimension negative": Case(lambda i: _doc(i, _input(i, shape=[-1])), "negative"),
    "shape product past int64 (wraps to 0)": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "UINT8", "shape": [1, 2**31, 2**31, 4], "data": []}),
        "element"),
    "shape product past int64, binary": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "UINT8", "shape": [2**32, 2**32],
                           "parameters": {"binary_data_size": 0}}), "element", {"_": BINARY}),
    "data a string": Case(lambda i: _doc(i, _input(i, data=_b64(i))), "data must be a list"),
    "data null": Case(lambda i: _doc(i, {"name": "image", "datatype": "BYTES", "shape": [1], "data": None}),
                      "data must be a list"),
    "data ragged": Case(lambda i: _doc(i, {"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3],
                                           "data": [[1, 2], [3]]}), "ragged"),
    "data an object in a list": Case(_pixels([{"a": 1}]), "UINT8"),
    "data a float for UINT8": Case(_pixels([1.5]), "UINT8"),
    "data a boolean for UINT8": Case(_pixels([True]), "UINT8"),
    "data out of range for UINT8": Case(_pixels([256]), "UINT8"),
    "data null element for UINT8": Case(_pixels([None]), "UINT8"),
    "data beyond float range": Case(lambda i: _doc(i, {"name": "image", "datatype": "FP32", "shape": [1],
                                                       "data": [10**400]}), "FP32"),
    "data a number for BOOL": Case(lambda i: _doc(i, {"name": "image", "datatype": "BOOL", "shape": [1],
                                                      "data": [1]}), "BOOL"),
    "data nested unlike the shape": Case(
        lambda i: _doc(i, {"name": "image", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [[1, 2, 3]]}),
        "nested as [1, 3]"),
    "data more values than the shape": Case(lambda i: _doc(i, _input(i, data=[_b64(i), _b64(i)])),
                                            "2 value(s) for shape [1]"),
    "BYTES element a number": Case(lambda i: _doc(i, _input(i, data=[5])), "base64"),
    "BYTES element not base64": Case(lambda i: _doc(i, _input(i, data=["%%%"])), "not valid base64"),
    # -- outputs -----------------------------------------------------------------------------
    "outputs a number": Case(lambda i: _doc(i, outputs=5), "outputs must be a list"),
    "outputs a string": Case(lambda i: _doc(i, outputs="score"), "outputs must be a list"),
    "an output without a name": Case(lambda i: _doc(i, outputs=[{"name": 5}]), "needs a name"),
    "output name not UTF-8": Case(lambda i: _doc(i, outputs=[{"name": "\ud800"}]), "UTF-8"),
    "output parameters a string": Case(lambda i: _doc(i, outputs=[{"name": "score", "parameters": "x"}]),
                                       "parameters must be a JSON object"),
    "output binary_data a string": Case(
        lambda i: _doc(i, outputs=[{"name": "score", "parameters": {"binary_data": "no"}}]),
        "binary_data must be a boolean"),
    "output parameter beyond int64": Case(
        lambda i: _doc(i, outputs=[{"name": "score", "parameters": {"classification": 2**63}}]), "int64"),
    "unknown output name": Case(lambda i: _doc(i, outputs=[{"name": "nope"}]), "unknown output",
                                gateway=False),
    # -- the repository routes' JSON bodies ---------------------------------------------------
    "index: deeply nested": Case(lambda i: ('{"ready": true, "x": ' + _nested(DEEP, "") + "}").encode(),
                                 "nested deeper than", route="/v2/repository/index"),
    "index: ready a string": Case(lambda i: b'{"ready": "no"}', "ready must be a boolean",
                                  route="/v2/repository/index"),
    "load: deeply nested": Case(lambda i: ('{"parameters": {"version": "1", "x": ' + _nested(DEEP, "1")
                                           + "}}").encode(),
                                "nested deeper than", route="/v2/repository/models/anomaly-detector/load"),
    "load: version an object": Case(lambda i: b'{"parameters": {"version": {"a": 1}}}',
                                    "version must be", route="/v2/repository/models/anomaly-detector/load"),
    "load: version not UTF-8": Case(lambda i: b'{"parameters": {"version": "\\ud800"}}', "UTF-8",
                                    route="/v2/repository/models/anomaly-detector/load"),
    "unload: parameters a list": Case(lambda i: b'{"parameters": [1]}', "parameters must be a JSON object",
                                      route="/v2/repository/models/anomaly-detector/unload"),
}


def _headers(case: Case, body: bytes) -> dict[str, str]:
    """The case's headers; a binary case's header length is where its JSON ends (the first
    `}` that closes the document: its binary part follows)."""
    headers = {k: v for k, v in case.headers.items() if k != "_"}
    if case.headers.get("_") == BINARY:
        headers["Inference-Header-Content-Length"] = str(_json_end(body))
    return headers


def _json_end(body: bytes) -> int:
    """The length of the JSON document at the start of `body`."""
    text = body.decode("latin-1")
    _, end = json.JSONDecoder().raw_decode(text)
    return end


@pytest.fixture(scope="module")
def image(good_and_defect: tuple[list[Path], list[Path]]) -> bytes:
    return good_and_defect[0][0].read_bytes()


def _good(image: bytes) -> dict:
    return {"id": "after-hostile", "inputs": [_input(image)]}


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.gateway and c.route == INFER])
def test_the_parser_refuses(name: str) -> None:
    """The translator alone: a `Problem` 400, never another exception."""
    case, image = CASES[name], b"\x89PNG not really"
    body = case.body(image)
    headers = _headers(case, body)
    with pytest.raises(Problem) as err:
        oip_body.infer_request(body, headers.get("Inference-Header-Content-Length"), "anomaly-detector", "")
    assert err.value.status == 400, err.value.detail
    assert case.text.lower() in err.value.detail.lower(), err.value.detail


def test_the_depth_limit_itself() -> None:
    """A document exactly `MAX_JSON_DEPTH` deep is parsed; one level more is not, and
    brackets inside strings do not count."""
    assert oip_body.MAX_JSON_DEPTH == LIMIT
    at_limit = _deep_data(b"x", LIMIT - 3)
    request, _, _ = oip_body.infer_request(at_limit, None, "m", "")
    assert request.raw_input_contents[0] == serialize_bytes([b"x"])
    with pytest.raises(Problem, match="nested deeper than"):
        oip_body.infer_request(_deep_data(b"x", LIMIT - 2), None, "m", "")
    in_strings = json.dumps({"id": "[" * 10_000, "inputs": [_input(b"x")], "k": '\\"[{' * 1000}).encode()
    assert oip_body.infer_request(in_strings, None, "m", "")[0].id == "[" * 10_000


def _depth(value: object) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


TRICKY = 'ab"\\[]{}\u00e9/'  # quotes, backslashes and brackets inside strings; a 2-byte character
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet=TRICKY, max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(alphabet=TRICKY, max_size=4), inner,
                                                                max_size=4),
    max_leaves=40,
)


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES, st.sampled_from([2, 3, 7, 64, 1 << 18]), st.integers(0, 8), st.booleans())
def test_the_depth_scan_agrees_with_the_parser(value: object, chunk: int, limit: int, ascii: bool) -> None:
    """The bracket scan on the raw bytes says what the parsed document's depth says, whatever
    the strings hold and wherever the chunks split it (escaped quotes across a boundary)."""
    text = json.dumps(value, ensure_ascii=ascii).encode()
    with mock.patch.object(oip_body, "_SCAN_CHUNK", chunk):
        assert oip_body.nested_deeper_than(text, limit) == (_depth(value) > limit), text


@pytest.mark.parametrize("name", list(CASES))
def test_the_gateway_answers_400_then_serves(http_base: str, image: bytes, name: str) -> None:
    """Through the real gateway: the status, the protocol's error body naming the problem,
    and a good request answered afterwards."""
    case = CASES[name]
    body = case.body(image)
    with httpx.Client(base_url=http_base, timeout=60) as http:
        r = http.post(case.route, content=body,
                      headers={"content-type": "application/json", **_headers(case, body)})
        assert r.status_code == case.status, (r.status_code, r.text[:300])
        assert case.text.lower() in r.json()["error"].lower(), r.json()
        good = http.post(INFER, json=_good(image))
        assert good.status_code == 200, good.text
        assert good.json()["id"] == "after-hostile" and len(good.json()["outputs"]) == 4


def test_good_bodies_still_pass(http_base: str, image: bytes) -> None:
    """What the stricter parser must keep accepting: nested `data`, `{"b64": …}`, a string
    `return_anomaly_map`, a known output in binary, exact binary tensors, pixels as UINT8."""
    raw = serialize_bytes([image])
    with httpx.Client(base_url=http_base, timeout=60) as http:
        r = http.post(INFER, json={"inputs": [_input(image, data=[{"b64": _b64(image)}])],
                                   "parameters": {"return_anomaly_map": "false", "category": "brick",
                                                  "x-trace": 2**63 - 1, "ratio": 0.5, "on": True}})
        assert r.status_code == 200, r.text
        outputs = [{"name": "score", "parameters": {"binary_data": True}}, {"name": "is_anomalous"}]
        header = _doc(image, _binary_tensor(image), outputs=outputs)
        r = http.post(INFER, content=header + raw,
                      headers={"Inference-Header-Content-Length": str(len(header))})
        assert r.status_code == 200, r.text
        split = int(r.headers["inference-header-content-length"])
        meta = json.loads(r.content[:split])
        assert [o["name"] for o in meta["outputs"]] == ["score", "is_anomalous"]
        assert len(r.content) - split == meta["outputs"][0]["parameters"]["binary_data_size"] == 4
        pixels = {"name": "image", "datatype": "UINT8", "shape": [1, 4, 4, 3], "data": [[[[7] * 3] * 4] * 4]}
        r = http.post(INFER, json={"inputs": [pixels]})
        assert r.status_code == 200, r.text

"""Open Inference Protocol (V2) inference bodies over HTTP: JSON (and binary tensors) to a
`ModelInferRequest`, and a `ModelInferResponse` back to JSON (and binary tensors), for the
routes of `service.protocol.rest.oip`. A body that breaks a rule below is a 400 saying what
is wrong (`Problem`), never a 5xx.

Inference bodies are JSON, or JSON followed by binary tensors (the binary-data extension:
the `Inference-Header-Content-Length` header gives the JSON's length, and each input with
a `binary_data_size` parameter takes that many bytes, in order). In JSON, a BYTES element
is base64 text, or `{"b64": "…"}`. Outputs come back as JSON `data`, or binary when asked
for (`binary_data` on the output, or `binary_data_output` on the request).

What a body must be, else it is a 400 saying what is wrong (never a 5xx, which clients
retry as transient):

- UTF-8 JSON (RFC 8259: no `NaN`/`Infinity`), its arrays and objects nested at most
  `MAX_JSON_DEPTH` (64) deep, counted on the raw bytes before parsing.
- Integers (shape dimensions, `binary_data_size`, integer parameters) within int64; shape
  dimensions and sizes non-negative; a boolean is no integer. A shape's element count is
  worked out in Python integers and must be within int64 too.
- `parameters` (of the request, an input or an output) a JSON object of booleans, numbers
  and strings; the known ones of their type: `binary_data_output`, `binary_data` booleans,
  `binary_data_size` a non-negative integer, `category`, `station` strings,
  `return_anomaly_map` a boolean (or the text `true`/`false`).
- `id`, names, datatypes and string parameters text that UTF-8 can carry.
- An input's `data` a list, flat or nested exactly as its shape, of values of its datatype
  (in range; integers for integer types, booleans for BOOL), as many as the shape holds;
  or, instead, a `binary_data_size`: for a fixed-size datatype exactly its shape's bytes,
  for BYTES exactly its shape's element count.
- The binary section exactly the sum of the inputs' `binary_data_size`: no byte missing and
  none left over; `Inference-Header-Content-Length` decimal digits within the body.

This module is longer than most (about 430 lines): each rule above is checked at the place
the body is read, so that a rule and its check are found together; the routes are apart.
"""


from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from fastapi.responses import JSONResponse, Response

from anomaly.oip import inference_pb2 as v2
from anomaly.oip.tensors import (
    DTYPES,
    INT64_MAX,
    INT64_MIN,
    TensorError,
    bytes_count,
    element_count,
    from_raw,
    serialize_bytes,
    to_raw,
)
from service.protocol.rest.forwarding import Problem

HEADER_LENGTH = "inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"
MAX_JSON_DEPTH = 64  # arrays and objects in one another; UINT8 [N,H,W,C] data nested as its shape: 7
DATATYPES = (*DTYPES, "BYTES")
# The parameters this service reads, and what each must be: (accepted types, in words).
REQUEST_PARAMETERS: dict[str, tuple[tuple[type, ...], str]] = {
    "binary_data_output": ((bool,), "a boolean"),
    "category": ((str,), "a string"),
    "station": ((str,), "a string"),
    "return_anomaly_map": ((bool, str), "a boolean (or the text true/false)"),
}
INPUT_PARAMETERS: dict[str, tuple[tuple[type, ...], str]] = {
    "binary_data_size": ((int,), "a non-negative integer"),
}
OUTPUT_PARAMETERS: dict[str, tuple[tuple[type, ...], str]] = {"binary_data": ((bool,), "a boolean")}

_SCAN_CHUNK = 1 << 18  # bytes of the body looked at together by the depth scan
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_STEP = np.zeros(256, np.int8)  # +1 opens an array or object, -1 closes one
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1


def bad_request(message: str) -> Problem:
    """A 400 answer saying what is wrong with the body."""
    return Problem(400, "Invalid Argument", message, "INVALID_ARGUMENT")


def shown(value: object, width: int = 60) -> str:
    """`value` for an error message, cut to `width` characters."""
    if isinstance(value, int) and len(str(value)) > width:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _slash_runs(slashes: np.ndarray, carry: int) -> np.ndarray:
    """For each backslash of a chunk (`slashes`: their offsets), how many backslashes in a row
    end at it, with the `carry` that end the chunk before when its run starts the chunk."""
    index = np.arange(slashes.size)
    starts = np.ones(slashes.size, bool)
    starts[1:] = np.diff(slashes) != 1
    first = np.maximum.accumulate(np.where(starts, index, 0))  # where each one's run begins
    return index - first + 1 + np.where(slashes[first] == 0, carry, 0)


def _escaped(quotes: np.ndarray, slashes: np.ndarray, runs: np.ndarray, carry: int) -> np.ndarray:
    """Which of a chunk's quotes (their offsets) follow an odd run of backslashes."""
    carried = (quotes == 0) & (carry % 2 == 1)
    if not slashes.size:
        return carried
    at = np.minimum(np.searchsorted(slashes, quotes - 1), slashes.size - 1)
    return np.where(slashes[at] == quotes - 1, runs[at] % 2 == 1, carried)


def nested_deeper_than(text: bytes, limit: int) -> bool:
    """Whether the arrays and objects of JSON `text` nest more than `limit` deep (brackets in
    strings do not count), looked at on the bytes with numpy, chunk by chunk, before parsing:
    a few passes over the bytes and memory for the quotes, backslashes and brackets of one chunk.

    Where `text` is not JSON the answer holds up to its first error, as far as a parser goes.
    """
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    data = np.frombuffer(text, np.uint8)
    depth, in_string, carry = 0, 0, 0  # at the chunk's start (carry: the backslashes ending the last)
    for start in range(0, data.size, _SCAN_CHUNK):
        chunk = data[start : start + _SCAN_CHUNK]
        quotes, slashes = np.flatnonzero(chunk == _QUOTE), np.flatnonzero(chunk == _BACKSLASH)
        runs = _slash_runs(slashes, carry)
        quotes = quotes[~_escaped(quotes, slashes, runs, carry)]
        brackets = np.flatnonzero(_STEP[chunk])
        outside = brackets[(np.searchsorted(quotes, brackets) + in_string) % 2 == 0]
        levels = depth + np.cumsum(_STEP[chunk[outside]], dtype=np.int64)
        if levels.size:
            if int(levels.max()) > limit:
                return True
            depth = int(levels[-1])
        in_string = (in_string + quotes.size) % 2
        carry = int(runs[-1]) if slashes.size and slashes[-1] == chunk.size - 1 else 0
    return False


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def load_json(body: bytes, what: str) -> object:
    """A JSON body parsed, or a 400 saying why not (`what`: the body in the message).

    Raises:
        Problem: 400 for text that is not UTF-8, not JSON, or nested more than
            `MAX_JSON_DEPTH` deep.
    """
    if nested_deeper_than(body, MAX_JSON_DEPTH):
        raise bad_request(f"{what} is nested deeper than {MAX_JSON_DEPTH} arrays and objects")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise bad_request(f"{what} is not JSON: not UTF-8 ({exc})") from None
    except RecursionError:  # not reached after the scan; a parse must never be a 500
        raise bad_request(f"{what} is nested deeper than {MAX_JSON_DEPTH} arrays and objects") from None
    except ValueError as exc:  # JSONDecodeError, the integer digit limit, NaN
        raise bad_request(f"{what} is not JSON: {exc}") from None


def text_value(value: object, what: str) -> str:
    """A JSON string that protobuf can carry (UTF-8: no lone surrogate)."""
    if not isinstance(value, str):
        raise bad_request(f"{what} must be a string, got {shown(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{what} is not valid UTF-8 text ({exc.reason} at position {exc.start})") from None
    return value


def int64(value: object, what: str, minimum: int = INT64_MIN) -> int:
    """A JSON integer (not a boolean) from `minimum` to the int64 maximum."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{what} must be an integer, got {shown(value)}")
    if not minimum <= value <= INT64_MAX:
        raise bad_request(f"{what} {shown(value)} is outside {minimum}..{INT64_MAX} (int64)")
    return value


def _parameters(
    value: object, where: str, known: dict[str, tuple[tuple[type, ...], str]]
) -> dict[str, bool | int | float | str]:
    """A `parameters` object checked: booleans, int64 integers, numbers and UTF-8 strings,
    the `known` keys of their type (`where` begins the messages, e.g. "input 'image': ")."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{where}parameters must be a JSON object, got {shown(value)}")
    checked: dict[str, bool | int | float | str] = {}
    for key, item in value.items():
        text_value(key, f"{where}a parameter name")
        if key in known:
            types, words = known[key]
            if not isinstance(item, types) or (isinstance(item, bool) and bool not in types):
                raise bad_request(f"{where}parameter {key} must be {words}, got {shown(item)}")
        if isinstance(item, bool | float):
            pass
        elif isinstance(item, int):
            int64(item, f"{where}parameter {key!r}")
        elif isinstance(item, str):
            text_value(item, f"{where}parameter {key!r}")
        else:
            raise bad_request(f"{where}parameter {key!r} must be a boolean, number or string, "
                              f"got {shown(item)}")
        checked[key] = item
    return checked


def _set_parameter(target: Any, key: str, value: bool | int | float | str) -> None:
    """A checked JSON parameter → an `InferParameter` map entry."""
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value


def _shape(value: object, name: str) -> tuple[list[int], int]:
    """An input's shape checked (a list of int64 dimensions, none negative) and how many
    elements it holds (at most the int64 maximum; worked out in Python integers)."""
    if not isinstance(value, list):
        raise bad_request(f"input {name!r}: the shape must be a list of integers, got {shown(value)}")
    dims = [int64(d, f"input {name!r}: shape dimension") for d in value]
    try:
        return dims, element_count(dims)
    except TensorError as exc:
        raise bad_request(f"input {name!r}: {exc}") from None


def _flatten(data: list, name: str) -> tuple[list, list[int]]:
    """The values of (possibly nested) `data` in row-major order, and the shape its nesting
    gives; nesting at most `MAX_JSON_DEPTH` deep (the body's depth bounds it)."""
    rows, shape = [data], []
    while rows and all(isinstance(r, list) for r in rows):
        lengths = {len(r) for r in rows}
        if len(lengths) > 1:
            raise bad_request(f"input {name!r}: data is ragged (lists of {sorted(lengths)[:4]} values "
                              "side by side)")
        shape.append(lengths.pop())
        rows = [x for r in rows for x in r]
    if any(isinstance(r, list) for r in rows):
        raise bad_request(f"input {name!r}: data is ragged (lists beside values at depth {len(shape) + 1})")
    return rows, shape


def _bytes_element(value: object, name: str) -> bytes:
    text = value.get("b64") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise bad_request(f'input {name!r}: a BYTES element in JSON is base64 text or {{"b64": …}}, '
                          f"got {shown(value)}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"input {name!r}: a BYTES element is not valid base64 ({exc})") from None


def _numbers(values: list, datatype: str, name: str) -> np.ndarray:
    """JSON values → an array of `datatype`: booleans for BOOL, integers in range for the
    integer types, finite numbers (not booleans) for the floating-point ones."""
    dtype = DTYPES[datatype]
    allowed = {bool} if dtype.kind == "b" else {int} if dtype.kind in "iu" else {int, float}
    odd_types = set(map(type, values)) - allowed
    if odd_types:
        at = next(i for i, v in enumerate(values) if type(v) in odd_types)
        raise bad_request(f"input {name!r}: data does not fit datatype {datatype}: {shown(values[at])} "
                          f"at position {at}")
    if dtype.kind == "b":
        return np.asarray(values, dtype=dtype)
    if dtype.kind in "iu":
        info, low, high = np.iinfo(dtype), min(values, default=0), max(values, default=0)
        if low < info.min or high > info.max:
            raise bad_request(f"input {name!r}: data does not fit datatype {datatype}: "
                              f"{shown(low if low < info.min else high)} is outside {info.min}..{info.max}")
        return np.asarray(values, dtype=dtype)
    try:
        with np.errstate(over="ignore"):
            array = np.asarray(values, dtype=np.float64).astype(dtype)
    except OverflowError:  # an integer past the float range
        array = np.asarray([np.inf])
    if not np.isfinite(array).all():
        raise bad_request(f"input {name!r}: data does not fit datatype {datatype} (a value beyond its range)")
    return array


def _raw_input(tensor: dict, name: str, binary: memoryview, offset: int) -> tuple[list[int], bytes, int]:
    """One JSON input's checked shape and its data in raw form, from its `data` or from the
    binary section at `offset` (and the offset after it)."""
    datatype = tensor["datatype"]
    if datatype not in DATATYPES:
        raise bad_request(f"input {name!r}: unknown datatype {shown(datatype)}; "
                          f"the protocol's are {list(DATATYPES)}")
    shape, count = _shape(tensor["shape"], name)
    parameters = _parameters(tensor.get("parameters"), f"input {name!r}: ", INPUT_PARAMETERS)
    size = parameters.get("binary_data_size")
    if size is not None:
        size = int64(size, f"input {name!r}: binary_data_size", 0)
        if "data" in tensor:
            raise bad_request(f"input {name!r} has both data and a binary_data_size parameter; send one")
        if offset + size > len(binary):
            raise bad_request(f"input {name!r}: binary_data_size {size} runs past the {len(binary) - offset} "
                              "binary bytes left")
        raw = bytes(binary[offset : offset + size])
        try:
            if datatype == "BYTES":
                held = bytes_count(raw)
                if held != count:
                    raise TensorError(f"BYTES data holds {held} element(s); the shape {shape} says {count}")
            elif size != count * DTYPES[datatype].itemsize:
                raise TensorError(f"{datatype} of shape {shape} needs {count * DTYPES[datatype].itemsize} "
                                  f"bytes, got binary_data_size {size}")
        except TensorError as exc:
            raise bad_request(f"input {name!r}: {exc}") from None
        return shape, raw, offset + size
    if "data" not in tensor:
        raise bad_request(f"input {name!r} has neither data nor a binary_data_size parameter")
    data = tensor["data"]
    if not isinstance(data, list):
        raise bad_request(f"input {name!r}: data must be a list (flat, or nested as the shape), "
                          f"got {shown(data)}")
    values, nested = _flatten(data, name)
    if len(nested) > 1 and nested != shape:
        raise bad_request(f"input {name!r}: data nested as {nested} but the shape is {shape}")
    if len(values) != count:
        raise bad_request(f"input {name!r}: {len(values)} value(s) for shape {shape} ({count} element(s))")
    if datatype == "BYTES":
        return shape, serialize_bytes([_bytes_element(v, name) for v in values]), offset
    return shape, to_raw(_numbers(values, datatype, name), datatype), offset


def _header_split(header_length: str | None, size: int) -> int:
    """Where the JSON ends: the `Inference-Header-Content-Length` (decimal digits, at most
    the body's `size`), or the whole body without one."""
    if header_length is None:
        return size
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise bad_request("Inference-Header-Content-Length must be a non-negative decimal integer, "
                          f"got {shown(header_length)}")
    if int(text) > size:
        raise bad_request(f"Inference-Header-Content-Length {text} is beyond the {size}-byte body")
    return int(text)


def infer_request(
    body: bytes,
    header_length: str | None,
    model: str,
    version: str,
) -> tuple[v2.ModelInferRequest, set[str], bool]:
    """A REST inference body → (the gRPC request, outputs wanted in binary, all in binary).

    Raises:
        Problem: 400 for a body that is not a V2 inference request (the module docstring
            lists the rules; the message says which one it breaks).
    """
    split = _header_split(header_length, len(body))
    doc = load_json(body[:split], "the inference request")
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise bad_request("the inference request must be a JSON object with a list of inputs")
    rid = "" if doc.get("id") is None else text_value(doc["id"], "id")
    request = v2.ModelInferRequest(model_name=model, model_version=version, id=rid)
    parameters = _parameters(doc.get("parameters"), "", REQUEST_PARAMETERS)
    all_binary = bool(parameters.pop("binary_data_output", False))
    for key, value in parameters.items():
        _set_parameter(request.parameters, key, value)
    binary, offset = memoryview(body)[split:], 0
    for tensor in doc["inputs"]:
        if (
            not isinstance(tensor, dict)
            or not isinstance(tensor.get("name"), str)
            or not isinstance(tensor.get("datatype"), str)
            or not isinstance(tensor.get("shape"), list)
        ):
            raise bad_request("each input needs a name, a datatype and a shape (a list of integers)")
        name = text_value(tensor["name"], "an input name")
        shape, raw, offset = _raw_input(tensor, name, binary, offset)
        request.inputs.add(name=name, datatype=tensor["datatype"], shape=shape)
        request.raw_input_contents.append(raw)
    if offset != len(binary):
        raise bad_request(f"the body has {len(binary) - offset} byte(s) more than the inputs' "
                          f"binary_data_size parameters account for ({offset} after the {split}-byte JSON)")
    outputs = doc.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise bad_request(f"outputs must be a list of objects, got {shown(outputs)}")
    wanted_binary: set[str] = set()
    for output in outputs or []:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise bad_request("each requested output needs a name")
        name = text_value(output["name"], "an output name")
        if _parameters(output.get("parameters"), f"output {name!r}: ", OUTPUT_PARAMETERS).get("binary_data"):
            wanted_binary.add(name)
        request.outputs.add(name=name)
    return request, wanted_binary, all_binary


def infer_answer(response: v2.ModelInferResponse, wanted_binary: set[str], all_binary: bool) -> Response:
    """The server's ModelInferResponse → the REST answer (JSON, or JSON + binary tensors)."""
    outputs, chunks = [], []
    for i, tensor in enumerate(response.outputs):
        raw = response.raw_output_contents[i]
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if all_binary or tensor.name in wanted_binary:
            out["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            out["data"] = from_raw(raw, tensor.datatype, tensor.shape).reshape(-1).tolist()
        outputs.append(out)
    doc = {"model_name": response.model_name, "model_version": response.model_version, "outputs": outputs}
    if response.id:
        doc["id"] = response.id
    if not chunks:
        return JSONResponse(doc)
    header = json.dumps(doc).encode()
    return Response(
        header + b"".join(chunks),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )


# Request bodies in the OpenAPI document (the routes read their bodies themselves: these
# describe them, for clients and for the schemathesis fuzzing of tests/service/test_fuzz.py).

"""The Open Inference Protocol (V2) over HTTP/REST, on the gateway: a thin translator to the
server's `inference.GRPCInferenceService` (no model logic here; `service.oip` has the
mapping). Errors answer the protocol's `{"error": "…"}` with the HTTP status of the gRPC
code behind them.

Routes: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`,
`GET /v2/models/{m}[/versions/{v}]`, `GET …/ready`, `POST …/infer`, `GET …/stats`,
`POST /v2/repository/index`, `POST /v2/repository/models/{m}/load` and `…/unload`.

Inference bodies are JSON, or JSON followed by binary tensors (the binary-data extension:
the `Inference-Header-Content-Length` header gives the JSON's length, and each input with
a `binary_data_size` parameter takes that many bytes, in order). In JSON, a BYTES element
is base64 text, or `{"b64": "…"}`. Outputs come back as JSON `data`, or binary when asked
for (`binary_data` on the output, or `binary_data_output` on the request).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from anomaly.http_json import to_json
from anomaly.oip import inference_pb2 as v2
from anomaly.oip.tensors import DTYPES, TensorError, element_count, from_raw, serialize_bytes, to_raw
from service import http_body
from service.forwarding import Problem, forward, reserved_body

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])
HEADER_LENGTH = "inference-header-content-length"
BINARY_EXTENSION = "binary_tensor_data"


def _bad(message: str) -> Problem:
    return Problem(400, "Invalid Argument", message, "INVALID_ARGUMENT")


async def _v2(request: Request, method: str, message: object) -> Any:
    return await forward(request, request.app.state.v2, method, message)


def _set_parameter(target: Any, key: str, value: object) -> None:
    """A JSON parameter → an `InferParameter` map entry."""
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise _bad(f"parameter {key!r} must be a boolean, number or string")


def _bytes_element(value: object, name: str) -> bytes:
    text = value.get("b64") if isinstance(value, dict) else value
    if not isinstance(text, str):
        raise _bad(f'input {name!r}: a BYTES element in JSON is base64 text or {{"b64": …}}')
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"input {name!r}: a BYTES element is not valid base64 ({exc})") from None


def _raw_input(tensor: dict, binary: memoryview, offset: int) -> tuple[bytes, int]:
    """One JSON input's data in raw form, from its `data` or from the binary section."""
    name, datatype, shape = tensor["name"], tensor["datatype"], tensor["shape"]
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise _bad(
                f"input {name!r}: binary_data_size {size!r} runs past the {len(binary)} binary bytes sent"
            )
        return bytes(binary[offset : offset + size]), offset + size
    if "data" not in tensor:
        raise _bad(f"input {name!r} has neither data nor a binary_data_size parameter")
    flat = np.asarray(tensor["data"], dtype=object).reshape(-1)
    if datatype == "BYTES":
        return serialize_bytes([_bytes_element(v, name) for v in flat]), offset
    if datatype not in DTYPES:
        raise _bad(f"input {name!r}: unknown datatype {datatype!r}")
    try:
        array = np.asarray(flat.tolist(), dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise _bad(f"input {name!r}: data does not fit datatype {datatype} ({exc})") from None
    try:
        expected = element_count(shape)
    except TensorError as exc:
        raise _bad(f"input {name!r}: {exc}") from None
    if array.size != expected:
        raise _bad(f"input {name!r}: {array.size} value(s) for shape {shape}")
    return to_raw(array, datatype), offset


def infer_request(
    body: bytes,
    header_length: str | None,
    model: str,
    version: str,
) -> tuple[v2.ModelInferRequest, set[str], bool]:
    """A REST inference body → (the gRPC request, outputs wanted in binary, all in binary).

    Raises:
        Problem: 400 for a body that is not a V2 inference request.
    """
    try:
        split = int(header_length) if header_length is not None else len(body)
    except ValueError:
        raise _bad(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 <= split <= len(body):
        raise _bad(f"Inference-Header-Content-Length {split} is beyond the {len(body)}-byte body")
    try:
        doc = json.loads(body[:split])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the inference request is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise _bad("the inference request must be a JSON object with a list of inputs")
    request = v2.ModelInferRequest(model_name=model, model_version=version, id=str(doc.get("id") or ""))
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("parameters must be a JSON object")
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
            or not all(isinstance(d, int) for d in tensor["shape"])
        ):
            raise _bad("each input needs a name, a datatype and a shape (a list of integers)")
        raw, offset = _raw_input(tensor, binary, offset)
        request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        request.raw_input_contents.append(raw)
    wanted_binary: set[str] = set()
    for output in doc.get("outputs") or []:
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise _bad("each requested output needs a name")
        request.outputs.add(name=output["name"])
        if (output.get("parameters") or {}).get("binary_data"):
            wanted_binary.add(output["name"])
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


@router.get("/health/live")
async def live(request: Request) -> dict:
    """Liveness (the server answers ServerLive)."""
    return {"live": (await _v2(request, "ServerLive", v2.ServerLiveRequest())).live}


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 when the server's default model is serving, else 400."""
    is_ready = (await _v2(request, "ServerReady", v2.ServerReadyRequest())).ready
    return JSONResponse(
        {"ready": is_ready} if is_ready else {"error": "server not ready"},
        status_code=200 if is_ready else 400,
    )


@router.get("")
async def server_metadata(request: Request) -> dict:
    """Name, version and protocol extensions."""
    meta = await _v2(request, "ServerMetadata", v2.ServerMetadataRequest())
    return {"name": meta.name, "version": meta.version, "extensions": [*meta.extensions, BINARY_EXTENSION]}


@router.get("/models/stats")
@router.get("/models/{model}/stats")
@router.get("/models/{model}/versions/{version}/stats")
async def statistics(request: Request, model: str = "", version: str = "") -> dict:
    """Per loaded version: images scored, failures, and time spent (Triton's statistics extension)."""
    stats = await _v2(request, "ModelStatistics", v2.ModelStatisticsRequest(name=model, version=version))
    return to_json(stats)


@router.get("/models/{model}")
@router.get("/models/{model}/versions/{version}")
async def model_metadata(request: Request, model: str, version: str = "") -> dict:
    """Inputs, outputs and the version a model name (and version or alias) resolves to."""
    meta = await _v2(request, "ModelMetadata", v2.ModelMetadataRequest(name=model, version=version))

    def tensors(items: Any) -> list[dict]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": tensors(meta.inputs),
        "outputs": tensors(meta.outputs),
    }


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(request: Request, model: str, version: str = "") -> JSONResponse:
    """200 when the model is loaded, else 400."""
    is_ready = (await _v2(request, "ModelReady", v2.ModelReadyRequest(name=model, version=version))).ready
    body = {"name": model, "ready": True} if is_ready else {"error": f"model {model} is not ready"}
    return JSONResponse(body, status_code=200 if is_ready else 400)


@router.post("/models/{model}/infer")
@router.post("/models/{model}/versions/{version}/infer")
async def infer(request: Request, model: str, version: str = "") -> Response:
    """Score the request's images (see the module docstring for the body)."""
    settings = request.app.state.settings
    # Base64 in JSON takes 4/3 of the image bytes: room for that, and the header.
    limit = http_body.body_limit(request, 2 * settings.max_image_bytes)
    async with reserved_body(request, limit):
        body = await http_body.read_body(request, limit)
        message, wanted_binary, all_binary = infer_request(
            body, request.headers.get(HEADER_LENGTH), model, version
        )
        del body
        if message.ByteSize() > settings.max_image_bytes + 64 * 1024:
            raise Problem(
                413,
                "Payload Too Large",
                f"the request's tensors take {message.ByteSize()} bytes; "
                f"the server accepts {settings.max_image_bytes} (ANOMALY_MAX_IMAGE_BYTES)",
                "INVALID_ARGUMENT",
            )
        response = await _v2(request, "ModelInfer", message)
    try:
        return infer_answer(response, wanted_binary, all_binary)
    except TensorError as exc:  # the server answered a shape its data does not fill
        raise Problem(502, "Bad Gateway", f"the server's answer is malformed: {exc}", "INTERNAL") from exc


@router.post("/repository/index")
async def repository_index(request: Request) -> list[dict]:
    """Loaded versions (READY) and watched aliases serving nothing (UNAVAILABLE)."""
    body = await _json_body(request)
    index = await _v2(request, "RepositoryIndex", v2.RepositoryIndexRequest(ready=bool(body.get("ready"))))
    return [
        {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models
    ]


async def _json_body(request: Request) -> dict:
    body = await http_body.read_body(request, 64 * 1024)
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad("the body must be a JSON object")
    return doc


def _repository_parameters(doc: dict) -> dict[str, str]:
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _bad("parameters must be a JSON object")
    version = parameters.get("version")
    return {"version": str(version)} if version not in (None, "") else {}


async def _repository(request: Request, method: str, message: Any) -> dict:
    for key, value in _repository_parameters(await _json_body(request)).items():
        message.parameters[key].string_param = value
    await _v2(request, method, message)
    return {}


@router.post("/repository/models/{model}/load")
async def load(request: Request, model: str) -> dict:
    """Load a model (parameter `version`: a number or an alias) and keep it loaded."""
    return await _repository(request, "RepositoryModelLoad", v2.RepositoryModelLoadRequest(model_name=model))


@router.post("/repository/models/{model}/unload")
async def unload(request: Request, model: str) -> dict:
    """Unload a model version (refused for one a watched alias serves)."""
    message = v2.RepositoryModelUnloadRequest(model_name=model)
    return await _repository(request, "RepositoryModelUnload", message)

"""The Open Inference Protocol (V2) over HTTP/REST, on the gateway: a thin translator to the
server's `inference.GRPCInferenceService` (no model logic here; `service.protocol.grpc.oip` has the
mapping). Errors answer the protocol's `{"error": "…"}` with the HTTP status of the gRPC
code behind them.

Routes: `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2`,
`GET /v2/models/{m}[/versions/{v}]`, `GET …/ready`, `POST …/infer`, `GET …/stats`,
`POST /v2/repository/index`, `POST /v2/repository/models/{m}/load` and `…/unload`.

Inference bodies (JSON, or JSON followed by binary tensors) are read and written by
`service.protocol.rest.oip_body`, which says what a body must be.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from anomaly.http_json import to_json
from anomaly.oip import inference_pb2 as v2
from anomaly.oip.tensors import (
    INT64_MAX,
    INT64_MIN,
    TensorError,
)
from service.protocol.rest import http_body
from service.protocol.rest.forwarding import Problem, forward, reserved_body
from service.protocol.rest.oip_body import (
    BINARY_EXTENSION,
    DATATYPES,
    HEADER_LENGTH,
    bad_request,
    infer_answer,
    infer_request,
    int64,
    load_json,
    shown,
    text_value,
)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])


async def _v2(request: Request, method: str, message: object) -> Any:
    return await forward(request, request.app.state.v2, method, message)


_SCALAR = {"anyOf": [{"type": "boolean"}, {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
                     {"type": "number"}, {"type": "string"}]}


def _parameters_schema(known: dict[str, dict]) -> dict:
    return {"type": "object", "properties": known, "additionalProperties": _SCALAR}


_INPUT = {
    "type": "object",
    "required": ["name", "datatype", "shape"],
    "properties": {
        "name": {"type": "string"},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": INT64_MAX}},
        "parameters": _parameters_schema(
            {"binary_data_size": {"type": "integer", "minimum": 0, "maximum": INT64_MAX}}),
        "data": {"type": "array", "description": "the values, flat or nested as the shape; BYTES "
                 'elements as base64 text or {"b64": …}'},
    },
}
_INFER_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": _parameters_schema({
            "binary_data_output": {"type": "boolean"},
            "category": {"type": "string"},
            "station": {"type": "string"},
            "return_anomaly_map": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
        }),
        "inputs": {"type": "array", "items": _INPUT},
        "outputs": {"type": "array", "items": {
            "type": "object", "required": ["name"],
            "properties": {"name": {"type": "string"},
                           "parameters": _parameters_schema({"binary_data": {"type": "boolean"}})}}},
    },
}
INFER_BODY = {"parameters": [{
    "name": "Inference-Header-Content-Length", "in": "header", "required": False,
    "description": "with binary tensors after the JSON: the JSON's length in bytes",
    "schema": {"type": "integer", "minimum": 0}}], "requestBody": {"required": True, "content": {
    "application/json": {"schema": _INFER_REQUEST},
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary",
        "description": "the binary-data extension: the JSON request (its length in the "
                       "Inference-Header-Content-Length header), then the inputs' bytes"}},
}}}
INDEX_BODY = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"ready": {"type": "boolean"}}}}}}}
REPOSITORY_BODY = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"parameters": {"type": "object", "properties": {"version": {
        "anyOf": [{"type": "string"}, {"type": "integer", "minimum": 0, "maximum": INT64_MAX}],
        "description": "a version number or an alias"}}}}}}}}}


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


@router.post("/models/{model}/infer", openapi_extra=INFER_BODY)
@router.post("/models/{model}/versions/{version}/infer", openapi_extra=INFER_BODY)
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


@router.post("/repository/index", openapi_extra=INDEX_BODY)
async def repository_index(request: Request) -> list[dict]:
    """Loaded versions (READY) and watched aliases serving nothing (UNAVAILABLE)."""
    ready = (await _json_body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise bad_request(f"ready must be a boolean, got {shown(ready)}")
    index = await _v2(request, "RepositoryIndex", v2.RepositoryIndexRequest(ready=ready))
    return [
        {"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in index.models
    ]


async def _json_body(request: Request) -> dict:
    body = await http_body.read_body(request, 64 * 1024)
    if not body.strip():
        return {}
    doc = load_json(body, "the body")
    if not isinstance(doc, dict):
        raise bad_request("the body must be a JSON object")
    return doc


def _repository_parameters(doc: dict) -> dict[str, str]:
    """The `version` parameter of a load or unload body: a version number or an alias."""
    parameters = doc.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise bad_request(f"parameters must be a JSON object, got {shown(parameters)}")
    version = parameters.get("version")
    if version is None or version == "":
        return {}
    if isinstance(version, int) and not isinstance(version, bool):
        return {"version": str(int64(version, "parameter version", 0))}
    if not isinstance(version, str):
        raise bad_request("parameter version must be a version number or an alias (a string), "
                          f"got {shown(version)}")
    return {"version": text_value(version, "parameter version")}


async def _repository(request: Request, method: str, message: Any) -> dict:
    for key, value in _repository_parameters(await _json_body(request)).items():
        message.parameters[key].string_param = value
    await _v2(request, method, message)
    return {}


@router.post("/repository/models/{model}/load", openapi_extra=REPOSITORY_BODY)
async def load(request: Request, model: str) -> dict:
    """Load a model (parameter `version`: a number or an alias) and keep it loaded."""
    return await _repository(request, "RepositoryModelLoad", v2.RepositoryModelLoadRequest(model_name=model))


@router.post("/repository/models/{model}/unload", openapi_extra=REPOSITORY_BODY)
async def unload(request: Request, model: str) -> dict:
    """Unload a model version (refused for one a watched alias serves)."""
    message = v2.RepositoryModelUnloadRequest(model_name=model)
    return await _repository(request, "RepositoryModelUnload", message)

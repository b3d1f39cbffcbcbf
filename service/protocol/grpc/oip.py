"""The Open Inference Protocol (V2, KServe / Triton) over gRPC: `inference.GRPCInferenceService`
on the same port and the same data plane as `anomaly.v1`.

The mapping (docs/api.md, "Open Inference Protocol", says the same for users):

- model name = registered model; model version = a version number or an alias ("" = the
  server's default alias, `ANOMALY_MODEL_ALIAS`).
- input `image`: BYTES `[N]`, each element an encoded image (PNG, JPEG, …; the OpenVINO
  Model Server convention), or UINT8 `[N, H, W, C]` pixels (C = 1, 3 or 4).
- request parameters `category`, `station`, `return_anomaly_map`; the request `id` is the
  request id (`id/0`, `id/1`, … for the images of a batch).
- outputs `score`, `normalized_score`, `threshold` (FP32 `[N]`), `is_anomalous` (BOOL `[N]`)
  and, when asked for (as an output or by `return_anomaly_map`), `anomaly_map` (UINT8
  `[N, H, W]`, the images must then share one size).

Every image goes through `DataPlane.score`, as an `anomaly.v1` `Score` would: admission,
limits, batching (the N images of a request are submitted together) and the inspection
log. The repository extension loads (and pins), unloads and lists versions of the same
model repository; a version a watched alias serves is never unloaded.
"""

from __future__ import annotations

import asyncio
import io
import time
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

import grpc
import numpy as np

from anomaly.oip import inference_pb2 as v2
from anomaly.oip import inference_pb2_grpc as v2_grpc
from anomaly.oip.tensors import TensorError, deserialize_bytes, to_raw
from service.dataplane.data_plane import DataPlane, LoadedModel, ModelSpec, RawPixels, ScoreInput, ScoreOutput
from service.errors import InvalidInput, ModelNotFound, answering

Context = grpc.aio.ServicerContext
SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
IMAGE = "image"
OUTPUTS = {
    "score": "FP32",
    "normalized_score": "FP32",
    "threshold": "FP32",
    "is_anomalous": "BOOL",
    "anomaly_map": "UINT8",
}
EXTENSIONS = ["model_repository", "statistics"]
MAX_IMAGES = 64  # images in one request
MAX_VERSION = 2**32 - 1  # as anomaly.v1's uint32 version
PLATFORM = "onnxruntime_onnx"


def server_version() -> str:
    """The installed edge-anomaly version (ServerMetadata)."""
    try:
        return package_version("edge-anomaly")
    except PackageNotFoundError:
        return "0"


def split_version(version: str) -> tuple[int, str]:
    """A V2 model version → (version number, alias): ASCII digits are a number, anything
    else an alias, "" the default alias."""
    version = version.strip()
    if version.isascii() and version.isdigit():
        if int(version) > MAX_VERSION:
            raise InvalidInput(f"model version {version} is out of range (at most {MAX_VERSION})")
        return int(version), ""
    return 0, version


def model_spec(plane: DataPlane, name: str, version: str) -> ModelSpec:
    """A V2 (model name, model version) → the data plane's spec."""
    number, alias = split_version(version)
    return plane.spec(name, alias=alias, version=number)


def _parameter(parameters: object, key: str) -> object:
    """The value of an `InferParameter` / `ModelRepositoryParameter` map entry, or None."""
    if key not in parameters:  # type: ignore[operator]
        return None
    p = parameters[key]  # type: ignore[index]
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def image_inputs(request: v2.ModelInferRequest) -> list[bytes | RawPixels]:
    """The images of a ModelInfer request: encoded bytes or raw pixels, one per element.

    Raises:
        InvalidInput: no `image` input, another input, a wrong datatype or shape, or data
            that does not match the shape.
    """
    names = [t.name for t in request.inputs]
    if names != [IMAGE]:
        raise InvalidInput(
            f"ModelInfer needs exactly one input named {IMAGE!r} (BYTES [N] encoded images or "
            f"UINT8 [N,H,W,C] pixels); got {names or 'none'}"
        )
    tensor = request.inputs[0]
    shape = list(tensor.shape)
    if request.raw_input_contents and len(request.raw_input_contents) != 1:
        raise InvalidInput(f"raw_input_contents has {len(request.raw_input_contents)} entries for 1 input")
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    try:
        if tensor.datatype == "BYTES":
            if len(shape) != 1:
                raise InvalidInput(f"input {IMAGE!r} of datatype BYTES must have shape [N], got {shape}")
            count = _count(shape[0])
            items = deserialize_bytes(raw, count) if raw is not None else list(tensor.contents.bytes_contents)
            if len(items) != count:
                raise InvalidInput(f"input {IMAGE!r} has {len(items)} element(s); its shape says {count}")
            return list(items)
        if tensor.datatype == "UINT8":
            if len(shape) != 4 or shape[3] not in (1, 3, 4):
                raise InvalidInput(
                    f"input {IMAGE!r} of datatype UINT8 must have shape [N,H,W,C] with "
                    f"C = 1, 3 or 4, got {shape}"
                )
            count, (height, width, channels) = _count(shape[0]), shape[1:]
            per_image = height * width * channels
            if raw is not None:
                data = bytes(raw)
            else:
                values = np.asarray(tensor.contents.uint_contents, dtype=np.int64)
                if values.size and (values.min() < 0 or values.max() > 255):
                    raise InvalidInput(f"input {IMAGE!r} is UINT8 but holds values outside 0..255")
                data = values.astype(np.uint8).tobytes()
            if len(data) != count * per_image:
                raise InvalidInput(
                    f"input {IMAGE!r} of shape {shape} needs {count * per_image} bytes of "
                    f"UINT8 data, got {len(data)}"
                )
            return [
                RawPixels(data[i * per_image : (i + 1) * per_image], width, height, channels)
                for i in range(count)
            ]
    except TensorError as exc:
        raise InvalidInput(f"input {IMAGE!r}: {exc}") from exc
    raise InvalidInput(
        f"input {IMAGE!r} must be BYTES [N] (encoded images) or UINT8 [N,H,W,C] (pixels), "
        f"got datatype {tensor.datatype or '(none)'}"
    )


def _count(n: int) -> int:
    if not 1 <= n <= MAX_IMAGES:
        raise InvalidInput(f"a request carries 1 to {MAX_IMAGES} images, not {n}")
    return n


def wanted_outputs(request: v2.ModelInferRequest) -> list[str]:
    """The outputs to return, in order: those requested, or all but the map (the map too
    when `return_anomaly_map` is set).

    Raises:
        InvalidInput: an output this model does not have.
    """
    if request.outputs:
        names = [o.name for o in request.outputs]
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise InvalidInput(f"unknown output(s) {unknown}; this model has {list(OUTPUTS)}")
        return names
    names = [n for n in OUTPUTS if n != "anomaly_map"]
    if _flag(_parameter(request.parameters, "return_anomaly_map")):
        names.append("anomaly_map")
    return names


def score_inputs(
    request: v2.ModelInferRequest, images: list[bytes | RawPixels], with_map: bool, deadline: float | None
) -> list[ScoreInput]:
    """One data-plane input per image, with the request's model, parameters and id."""
    params = request.parameters
    category = _parameter(params, "category")
    station = _parameter(params, "station")
    for name, value in (("category", category), ("station", station)):
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"parameter {name!r} must be a string")
    number, alias = split_version(request.model_version)
    ids = (
        [request.id]
        if len(images) == 1
        else [f"{request.id}/{i}" if request.id else "" for i in range(len(images))]
    )
    return [
        ScoreInput(
            encoded=image if isinstance(image, bytes) else None,
            raw=image if isinstance(image, RawPixels) else None,
            model=request.model_name,
            version=number,
            alias=alias,
            category=str(category or ""),
            station=str(station or ""),
            return_anomaly_map=with_map,
            request_id=rid,
            deadline=deadline,
        )
        for image, rid in zip(images, ids, strict=True)
    ]


def _map_array(png: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("L"))


def infer_response(
    request: v2.ModelInferRequest, outputs: list[ScoreOutput], names: list[str]
) -> v2.ModelInferResponse:
    """Data-plane answers → a ModelInferResponse (raw output contents, as Triton answers)."""
    decisions = [o.decision for o in outputs]
    values: dict[str, np.ndarray] = {
        "score": np.array([d.score for d in decisions], np.float32),
        "normalized_score": np.array([d.normalized_score for d in decisions], np.float32),
        "threshold": np.array([d.threshold for d in decisions], np.float32),
        "is_anomalous": np.array([d.is_anomalous for d in decisions], np.bool_),
    }
    if "anomaly_map" in names:
        maps = [_map_array(d.anomaly_map_png) for d in decisions]
        if len({m.shape for m in maps}) > 1:
            raise InvalidInput(
                "output 'anomaly_map' needs the images of a request to share one size; got "
                f"{sorted({m.shape for m in maps})}"
            )
        values["anomaly_map"] = np.stack(maps)
    first = outputs[0].model
    response = v2.ModelInferResponse(model_name=first.name, model_version=first.version, id=request.id)
    for name in names:
        array = values[name]
        response.outputs.add(name=name, datatype=OUTPUTS[name], shape=list(array.shape))
        response.raw_output_contents.append(to_raw(array, OUTPUTS[name]))
    return response


def tensor_metadata(name: str, datatype: str, shape: list[int]) -> v2.ModelMetadataResponse.TensorMetadata:
    """One input or output of ModelMetadata."""
    return v2.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=shape)


INPUT_METADATA = [tensor_metadata(IMAGE, "BYTES", [-1])]  # UINT8 [N,H,W,C] pixels are accepted too
OUTPUT_METADATA = [
    tensor_metadata(n, t, [-1, -1, -1] if n == "anomaly_map" else [-1]) for n, t in OUTPUTS.items()
]


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """`inference.GRPCInferenceService` on top of a `DataPlane`."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def _loaded(self, spec: ModelSpec, context: grpc.aio.ServicerContext) -> LoadedModel:
        return await self.plane.get(spec, time.monotonic() + (context.time_remaining() or 30.0))

    @answering
    async def ServerLive(self, request: v2.ServerLiveRequest, context: Context) -> v2.ServerLiveResponse:
        """Always live while the process answers."""
        return v2.ServerLiveResponse(live=True)

    @answering
    async def ServerReady(self, request: v2.ServerReadyRequest, context: Context) -> v2.ServerReadyResponse:
        """Ready when the default model serves."""
        return v2.ServerReadyResponse(ready=self.plane.ready)

    @answering
    async def ServerMetadata(self, request: v2.ServerMetadataRequest,
                             context: Context) -> v2.ServerMetadataResponse:
        """Name, version and protocol extensions."""
        return v2.ServerMetadataResponse(name="edge-anomaly", version=server_version(), extensions=EXTENSIONS)

    @answering
    async def ModelReady(self, request: v2.ModelReadyRequest, context: Context) -> v2.ModelReadyResponse:
        """Ready = loaded now (a watched alias serving, or a version in memory); no load."""
        spec = model_spec(self.plane, request.name, request.version)
        return v2.ModelReadyResponse(ready=self.plane.repository.cached_model(spec) is not None)

    @answering
    async def ModelMetadata(self, request: v2.ModelMetadataRequest,
                            context: Context) -> v2.ModelMetadataResponse:
        """Inputs, outputs and the resolved version."""
        loaded = await self._loaded(model_spec(self.plane, request.name, request.version), context)
        return v2.ModelMetadataResponse(name=loaded.name, versions=[loaded.version], platform=PLATFORM,
                                        inputs=INPUT_METADATA, outputs=OUTPUT_METADATA)

    @answering
    async def ModelInfer(self, request: v2.ModelInferRequest, context: Context) -> v2.ModelInferResponse:
        """Score the request's images (see the module docstring for the mapping)."""
        return await self.infer(request, context.time_remaining())

    async def infer(self, request: v2.ModelInferRequest,
                    time_remaining: float | None) -> v2.ModelInferResponse:
        """Score the request's images together; the first failure fails the request (the
        others still finish and are recorded)."""
        names = wanted_outputs(request)
        images = image_inputs(request)
        deadline = time.monotonic() + time_remaining if time_remaining is not None else None
        inputs = score_inputs(request, images, "anomaly_map" in names, deadline)
        results = await asyncio.gather(*(self.plane.score(i) for i in inputs), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return infer_response(request, results, names)  # type: ignore[arg-type]

    @answering
    async def ModelStatistics(self, request: v2.ModelStatisticsRequest,
                              context: Context) -> v2.ModelStatisticsResponse:
        """Counts and times per loaded version (every transport's requests); never loads one."""
        wanted = None
        if request.name:
            spec = model_spec(self.plane, request.name, request.version)
            wanted = self.plane.repository.cached_model(spec)
            if wanted is None:
                raise ModelNotFound(f"{spec} is not loaded")
        response = v2.ModelStatisticsResponse()
        for m in self.plane.list_models():
            if wanted is not None and (m.name, m.version) != (wanted.name, wanted.version):
                continue
            s = self.plane.stats.get((m.name, m.version))
            stat = response.model_stats.add(name=m.name, version=m.version)
            if s is None:
                continue
            stat.last_inference, stat.inference_count, stat.execution_count = (
                s.last_inference_ms, s.success, s.success)
            st = stat.inference_stats
            st.success.count, st.success.ns = s.success, s.success_ns
            st.fail.count, st.fail.ns = s.fail, s.fail_ns
            st.queue.count, st.queue.ns = s.success, s.queue_ns
            st.compute_input.count, st.compute_input.ns = s.success, s.decode_ns
            st.compute_infer.count, st.compute_infer.ns = s.success, s.infer_ns
        return response

    @answering
    async def RepositoryIndex(self, request: v2.RepositoryIndexRequest,
                              context: Context) -> v2.RepositoryIndexResponse:
        """Loaded versions (READY) and watched aliases that serve nothing (UNAVAILABLE, with
        the reason)."""
        repo = self.plane.repository
        response = v2.RepositoryIndexResponse()
        for m in self.plane.list_models():
            response.models.add(name=m.name, version=m.version, state="READY")
        if not request.ready:
            for name, alias in self.plane.settings.watched():
                if repo.current(name, alias) is None:
                    response.models.add(name=name, version=alias, state="UNAVAILABLE",
                                        reason=repo.not_serving_reason(name, alias))
        return response

    @answering
    async def RepositoryModelLoad(self, request: v2.RepositoryModelLoadRequest,
                                  context: Context) -> v2.RepositoryModelLoadResponse:
        """Load `model_name` (parameter `version`: a number or an alias; default alias
        otherwise) and keep it in memory until unloaded: on the model-control thread, at most
        `max_pinned_models` versions pinned (beyond: RESOURCE_EXHAUSTED; `DataPlane.pin`)."""
        version = str(_parameter(request.parameters, "version") or "")
        spec = model_spec(self.plane, request.model_name, version)
        await self.plane.pin(spec, time.monotonic() + (context.time_remaining() or 30.0))
        return v2.RepositoryModelLoadResponse()

    @answering
    async def RepositoryModelUnload(self, request: v2.RepositoryModelUnloadRequest,
                                    context: Context) -> v2.RepositoryModelUnloadResponse:
        """Unload a version (parameter `version`; default alias otherwise). Refused
        (FAILED_PRECONDITION, by the repository) for a version a watched alias serves."""
        version = str(_parameter(request.parameters, "version") or "")
        spec = model_spec(self.plane, request.model_name, version)
        loaded = self.plane.repository.cached_model(spec)
        if loaded is None:
            raise ModelNotFound(f"{spec} is not loaded")
        self.plane.repository.unload(loaded.name, loaded.version)
        return v2.RepositoryModelUnloadResponse()

"""Python SDK: `AnomalyClient` (sync) and `AsyncAnomalyClient` (asyncio) over gRPC.

Shaped like httpx: `_BaseClient` builds requests and parses responses (no I/O); the two
clients mirror each other method for method and differ only in `await`. Results are
typed dataclasses. Both are context managers::

    with AnomalyClient("127.0.0.1:50051") as client:
        result = client.score("part.png", category="brick", request_id="SN-001")
        print(result.is_anomalous, result.model.version)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

ImageInput = bytes | str | Path
DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE = 64 * 1024 * 1024


@dataclass(frozen=True)
class ModelRef:
    """The model version that answered."""

    name: str
    version: str
    alias: str = ""
    architecture: str = ""
    variant: str = ""


@dataclass(frozen=True)
class ScoreResult:
    """One image's result."""

    request_id: str
    score: float
    normalized_score: float
    is_anomalous: bool
    threshold: float
    category: str
    model: ModelRef
    anomaly_map_png: bytes = b""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    """A model version as the server describes it."""

    ref: ModelRef
    input_height: int
    input_width: int
    categories: list[str]
    thresholds: dict[str, float]
    provider: str
    precision: str
    loaded_at: str
    source_uri: str


class _BaseClient:
    """Everything that does no I/O: options, request building, response parsing."""

    def __init__(self, target: str = DEFAULT_TARGET, *, model: str = "", alias: str = "",
                 timeout: float = 30.0) -> None:
        self.target = target
        self.model = model
        self.alias = alias
        self.timeout = timeout
        self._options = [("grpc.max_receive_message_length", MAX_MESSAGE),
                         ("grpc.max_send_message_length", MAX_MESSAGE)]

    @staticmethod
    def _image_bytes(image: ImageInput) -> bytes:
        if isinstance(image, bytes | bytearray | memoryview):
            return bytes(image)
        return Path(image).read_bytes()

    def _score_request(self, image: ImageInput, *, model: str, alias: str, version: int,
                       category: str, return_anomaly_map: bool, request_id: str) -> pb.ScoreRequest:
        return pb.ScoreRequest(
            encoded=self._image_bytes(image), model=model or self.model,
            alias="" if version else (alias or self.alias), version=version, category=category,
            return_anomaly_map=return_anomaly_map, request_id=request_id,
        )

    @staticmethod
    def _ref(r: pb.ModelRef) -> ModelRef:
        return ModelRef(r.name, r.version, r.alias, r.architecture, r.variant)

    def _score_result(self, r: pb.ScoreResponse) -> ScoreResult:
        t = r.timings
        return ScoreResult(
            request_id=r.request_id, score=r.score, normalized_score=r.normalized_score,
            is_anomalous=r.is_anomalous, threshold=r.threshold, category=r.category,
            model=self._ref(r.model), anomaly_map_png=r.anomaly_map_png,
            timings={"decode_ms": t.decode_ms, "queue_ms": t.queue_ms,
                     "inference_ms": t.inference_ms, "total_ms": t.total_ms},
        )

    def _model_info(self, m: pb.ModelInfo) -> ModelInfo:
        return ModelInfo(self._ref(m.ref), m.input_height, m.input_width, list(m.categories),
                         dict(m.thresholds), m.provider, m.precision, m.loaded_at, m.source_uri)


class AnomalyClient(_BaseClient):
    """Blocking gRPC client. Raises `grpc.RpcError` with the server's status and message."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._channel = grpc.insecure_channel(target, options=self._options)
        self._stub = pb_grpc.AnomalyDetectionStub(self._channel)

    def score(self, image: ImageInput, *, model: str = "", alias: str = "", version: int = 0,
              category: str = "", return_anomaly_map: bool = False, request_id: str = "",
              timeout: float | None = None) -> ScoreResult:
        """Score one image (bytes or a file path)."""
        req = self._score_request(image, model=model, alias=alias, version=version,
                                  category=category, return_anomaly_map=return_anomaly_map,
                                  request_id=request_id)
        return self._score_result(self._stub.Score(req, timeout=timeout or self.timeout))

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The model versions loaded on the server."""
        resp = self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)
        return [self._model_info(m) for m in resp.models]

    def get_model(self, *, model: str = "", alias: str = "", version: int = 0,
                  timeout: float | None = None) -> ModelInfo:
        """Describe one model version."""
        req = pb.GetModelRequest(model=model or self.model, alias=alias, version=version)
        return self._model_info(self._stub.GetModel(req, timeout=timeout or self.timeout))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> AnomalyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAnomalyClient(_BaseClient):
    """asyncio gRPC client with the same methods as `AnomalyClient`."""

    def __init__(self, target: str = DEFAULT_TARGET, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._channel = grpc.aio.insecure_channel(target, options=self._options)
        self._stub = pb_grpc.AnomalyDetectionStub(self._channel)

    async def score(self, image: ImageInput, *, model: str = "", alias: str = "", version: int = 0,
                    category: str = "", return_anomaly_map: bool = False, request_id: str = "",
                    timeout: float | None = None) -> ScoreResult:
        """Score one image (bytes or a file path)."""
        req = self._score_request(image, model=model, alias=alias, version=version,
                                  category=category, return_anomaly_map=return_anomaly_map,
                                  request_id=request_id)
        return self._score_result(await self._stub.Score(req, timeout=timeout or self.timeout))

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The model versions loaded on the server."""
        resp = await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout or self.timeout)
        return [self._model_info(m) for m in resp.models]

    async def get_model(self, *, model: str = "", alias: str = "", version: int = 0,
                        timeout: float | None = None) -> ModelInfo:
        """Describe one model version."""
        req = pb.GetModelRequest(model=model or self.model, alias=alias, version=version)
        return self._model_info(await self._stub.GetModel(req, timeout=timeout or self.timeout))

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncAnomalyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

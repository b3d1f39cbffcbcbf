"""The transport-agnostic data plane: score, list and describe models.

The gRPC servicer and (through it) the HTTP gateway only translate to and from these
calls. Blocking work — registry look-ups, image decoding, ONNX Runtime — runs in a
bounded thread pool, so the asyncio loop that serves the transport stays responsive.
Admission is bounded: beyond `max_inflight` requests the answer is `Overloaded`
(RESOURCE_EXHAUSTED / HTTP 429), never an unbounded queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from service.engine import Decision
from service.errors import InvalidInput, Overloaded
from service.imaging import decode_image, raw_to_rgb
from service.repository import LoadedModel, ModelRepository, ModelSpec
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawPixels:
    """Undecoded pixels, row-major (H, W, C)."""

    data: bytes
    width: int
    height: int
    channels: int
    bits: int = 8


@dataclass
class ScoreInput:
    """One scoring request, whatever the transport."""

    encoded: bytes | None = None
    raw: RawPixels | None = None
    model: str = ""
    alias: str = ""
    version: int = 0
    category: str = ""
    return_anomaly_map: bool = False
    request_id: str = ""


@dataclass
class ScoreOutput:
    """The answer: the decision, the exact version that made it, timings in ms."""

    request_id: str
    decision: Decision
    model: LoadedModel
    alias: str
    timings: dict[str, float] = field(default_factory=dict)


class DataPlane:
    """Scores images with models from a `ModelRepository`.

    Args:
        settings: server settings.
        repository: injectable for tests; built from settings by default.
    """

    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository(settings)
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="infer")
        self._inflight = 0
        self.ready = False

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    def spec(self, model: str = "", alias: str = "", version: int = 0) -> ModelSpec:
        """Fill defaults into a request's model selection.

        Raises:
            InvalidInput: when both an alias and a version are given.
        """
        if alias and version:
            raise InvalidInput("give an alias or a version, not both")
        return ModelSpec(model or self.settings.model_name,
                         "" if version else (alias or self.settings.model_alias), version)

    async def start(self) -> LoadedModel:
        """Load and warm up the default model; the plane is ready once it is."""
        loaded = await self._run(self.repository.get, self.spec())
        self.ready = True
        return loaded

    async def get_model(self, model: str = "", alias: str = "", version: int = 0) -> LoadedModel:
        """Resolve (and load) a model; raises ModelNotFound / NotReady / ModelLoadError."""
        return await self._run(self.repository.get, self.spec(model, alias, version))

    def list_models(self) -> list[LoadedModel]:
        """The versions loaded now."""
        return self.repository.loaded()

    async def score(self, req: ScoreInput) -> ScoreOutput:
        """Score one image.

        Raises:
            Overloaded: when `max_inflight` requests are already admitted.
            InvalidInput: bad image or fields.
            ModelNotFound, NotReady, ModelLoadError: model selection problems.
        """
        if self._inflight >= self.settings.max_inflight:
            raise Overloaded(f"server busy: {self._inflight} requests in flight; retry later")
        self._inflight += 1
        t0 = time.perf_counter()
        try:
            spec = self.spec(req.model, req.alias, req.version)
            if req.encoded is None and req.raw is None:
                raise InvalidInput("request has no image: set `encoded` bytes or `raw` pixels")
            loaded = await self._run(self.repository.get, spec)
            queued = time.perf_counter()
            decision, timings = await self._run(self._score_sync, loaded, req)
            timings["queue_ms"] = (queued - t0) * 1e3
            timings["total_ms"] = (time.perf_counter() - t0) * 1e3
            rid = req.request_id or uuid.uuid4().hex
            log.info("scored request_id=%s model=%s/%s category=%s score=%.5g anomalous=%s ms=%.1f",
                     rid, loaded.name, loaded.version, decision.category or "-", decision.score,
                     decision.is_anomalous, timings["total_ms"])
            return ScoreOutput(rid, decision, loaded, spec.alias, timings)
        finally:
            self._inflight -= 1

    def _score_sync(self, loaded: LoadedModel, req: ScoreInput) -> tuple[Decision, dict[str, float]]:
        model = loaded.model
        category = model.resolve_category(req.category)  # validate before any work
        t0 = time.perf_counter()
        if req.raw is not None:
            r = req.raw
            rgb = raw_to_rgb(r.data, r.width, r.height, r.channels, r.bits,
                             max_pixels=self.settings.max_image_pixels)
        else:
            rgb = decode_image(req.encoded or b"", max_bytes=self.settings.max_image_bytes,
                               max_pixels=self.settings.max_image_pixels)
        batch = model.prepare(rgb)[np.newaxis]
        t1 = time.perf_counter()
        scores, maps = model.run(batch)
        t2 = time.perf_counter()
        decision = model.decide(scores[0], maps[0] if req.return_anomaly_map else None,
                                category, original_size=rgb.shape[:2])
        return decision, {"decode_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3}

    def close(self) -> None:
        """Stop the worker threads (after in-flight work finishes)."""
        self.executor.shutdown(wait=True, cancel_futures=False)

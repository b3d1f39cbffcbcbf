"""The transport-agnostic data plane: score, list and describe models.

The gRPC servicer and (through it) the HTTP gateway only translate to and from these
calls. Blocking work — registry look-ups, image decoding, ONNX Runtime — runs in a
bounded thread pool, so the asyncio loop that serves the transport stays responsive.
Images are decoded in parallel, then queue into the model's dynamic batcher
(`service.batcher`). Admission is bounded twice: beyond `max_inflight` requests, or a
full model queue, the answer is `Overloaded` (RESOURCE_EXHAUSTED / HTTP 429).
Watched aliases are followed by `service.watcher` and answered from memory.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from service import metrics
from service.batcher import Batcher
from service.engine import Decision
from service.errors import InvalidInput, Overloaded
from service.imaging import decode_image, raw_to_rgb
from service.inspection import Decided, InspectionLog
from service.repository import LoadedModel, ModelRepository, ModelSpec
from service.settings import Settings
from service.watcher import ModelWatcher

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
    station: str = ""
    deadline: float | None = None  # time.monotonic() by which the answer is needed


@dataclass
class ScoreOutput:
    """The answer: the decision, the exact version that made it, timings in ms."""

    request_id: str
    decision: Decision
    model: LoadedModel
    alias: str
    timings: dict[str, float] = field(default_factory=dict)


class DataPlane:
    """Scores images with models from a `ModelRepository`, through per-model batchers.

    Args:
        settings: server settings.
        repository: injectable for tests; built from settings by default.
    """

    def __init__(self, settings: Settings, repository: ModelRepository | None = None) -> None:
        self.settings = settings
        self.repository = repository or ModelRepository(settings)
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="infer")
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._inflight = 0
        self.ready = False
        self.watcher = ModelWatcher(self.repository, settings, self._run)
        self.on_ready_change: Callable[[bool], None] | None = None
        self.inspections = InspectionLog(settings.inspection_db_url) if settings.inspection_log else None

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

    def _update_ready(self) -> None:
        ready = self.repository.current(*self.settings.watched()[0]) is not None
        if ready != self.ready:
            self.ready = ready
            if self.on_ready_change:
                self.on_ready_change(ready)

    async def start(self) -> bool:
        """Load every watched alias, then follow the registry in the background.

        Returns:
            Whether the default model is serving (readiness). If not, the watcher keeps
            trying and readiness flips once it loads.
        """
        if self.inspections is not None:
            await self.inspections.start()
        await self.watcher.refresh_all()
        self._update_ready()
        self.watcher.on_change = self._update_ready
        self.watcher.start()
        return self.ready

    async def get_model(self, model: str = "", alias: str = "", version: int = 0) -> LoadedModel:
        """Resolve (and load) a model; raises ModelNotFound / NotReady / ModelLoadError."""
        return await self.get(self.spec(model, alias, version))

    async def get(self, spec: ModelSpec) -> LoadedModel:
        """`get_model` for a filled-in spec; watched aliases answer without a thread hop."""
        if spec.alias:
            current = self.repository.current(spec.name, spec.alias)
            if current is not None:
                return current
        return await self._run(self.repository.get, spec)

    def list_models(self) -> list[LoadedModel]:
        """The versions loaded now."""
        return self.repository.loaded()

    def _batcher(self, loaded: LoadedModel) -> Batcher:
        key = (loaded.name, loaded.version)
        batcher = self._batchers.get(key)
        if batcher is None or batcher.model is not loaded.model:
            s = self.settings
            batcher = Batcher(loaded.model, self._run, max_batch=s.max_batch_size,
                              max_delay_s=s.max_queue_delay_ms / 1e3, max_queue=s.max_queue,
                              workers=s.concurrent_runs,
                              label=f"{loaded.name}/{loaded.version}")
            self._batchers[key] = batcher
            self._prune_batchers()
        return batcher

    def _prune_batchers(self) -> None:
        """Stop the idle batchers of versions that are no longer loaded."""
        loaded = {(m.name, m.version) for m in self.repository.loaded()}
        for key, batcher in list(self._batchers.items()):
            if key not in loaded and batcher.idle:
                del self._batchers[key]
                asyncio.get_running_loop().create_task(batcher.close(0))

    async def score(self, req: ScoreInput) -> ScoreOutput:
        """Score one image.

        Raises:
            Overloaded: too many requests admitted, or the model's queue is full.
            InvalidInput: bad image or fields.
            ModelNotFound, NotReady, ModelLoadError: model selection problems.
            DeadlineExceeded: the deadline passed while queued.
        """
        if self._inflight >= self.settings.max_inflight:
            raise Overloaded(f"server busy: {self._inflight} requests in flight; retry later")
        self._inflight += 1
        t0 = time.perf_counter()
        try:
            spec = self.spec(req.model, req.alias, req.version)
            if req.encoded is None and req.raw is None:
                raise InvalidInput("request has no image: set `encoded` bytes or `raw` pixels")
            loaded = await self.get(spec)
            batcher = self._batcher(loaded)
            if batcher.max_batch == 1:  # decode and run in one pool call
                result, (category, size, decode_s) = await batcher.submit_unbatched(
                    partial(self._prepare, loaded, req), req.deadline)
            else:
                x, category, size, decode_s = await self._run(self._prepare, loaded, req)
                result = await batcher.submit(x, req.deadline)
            amap = result.amap if req.return_anomaly_map else None
            if amap is None:
                decision = loaded.model.decide(result.score, None, category, size)
            else:
                decision = await self._run(loaded.model.decide, result.score, amap, category, size)
            total = time.perf_counter() - t0
            timings = {"decode_ms": decode_s * 1e3, "queue_ms": result.queue_s * 1e3,
                       "inference_ms": result.inference_s * 1e3, "total_ms": total * 1e3}
            metrics.LATENCY.labels("decode").observe(decode_s)
            metrics.LATENCY.labels("queue").observe(result.queue_s)
            metrics.LATENCY.labels("inference").observe(result.inference_s)
            metrics.LATENCY.labels("total").observe(total)
            rid = req.request_id or uuid.uuid4().hex
            if self.inspections is not None:
                self.inspections.record(Decided(
                    rid, req.station, decision.category, loaded.name, loaded.version, decision.score,
                    decision.normalized_score, decision.threshold, decision.is_anomalous, total * 1e3))
            log.info("scored", extra={"request_id": rid, "model": f"{loaded.name}/{loaded.version}",
                                      "category": decision.category, "score": decision.score,
                                      "anomalous": decision.is_anomalous, "batch": result.batch_size,
                                      "ms": round(total * 1e3, 2)})
            return ScoreOutput(rid, decision, loaded, spec.alias, timings)
        finally:
            self._inflight -= 1

    def _prepare(self, loaded: LoadedModel,
                 req: ScoreInput) -> tuple[np.ndarray, str, tuple[int, int], float]:
        """Validate the category, decode and preprocess (runs in the pool)."""
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
        x = model.prepare(rgb)
        return x, category, rgb.shape[:2], time.perf_counter() - t0

    async def close(self, timeout: float = 5.0) -> None:
        """Stop following the registry, drain the batchers, stop the worker threads."""
        await self.watcher.stop()
        await asyncio.gather(*(b.close(timeout) for b in self._batchers.values()))
        self.executor.shutdown(wait=True, cancel_futures=False)
        if self.inspections is not None:  # after the drain: every answered request is recorded
            await self.inspections.close(max(timeout, 10.0))

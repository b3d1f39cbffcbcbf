"""The transport-agnostic data plane: score, list and describe models.

The protocols only translate to and from these calls: the gRPC servicers, and the HTTP
routes through them (over gRPC from the gateway process, or in-process, `service.protocol.inprocess`).
Blocking work runs off the asyncio loop that serves the transport: image decoding
and ONNX Runtime in the inference pool (`workers` threads), registry look-ups, downloads
and model loads on other threads, so a slow registry never takes an inference thread.
Each kind of load has threads of its own, so the watcher's promotions and rollbacks never
wait behind a load a request asked for: the watcher (following watched aliases) its own
thread; requests naming a version or an unwatched alias the loader pool; model control
(the V2 repository extension's load, `pin`) its own thread, at most `max_pinned_models`
versions pinned at once. Images are decoded in parallel, then queue into the model's
dynamic batcher (`service.dataplane.batcher`).

Admission, in order, each refusal answered at once with a clear status:
identifiers checked (`anomaly.wire`: INVALID_ARGUMENT); at most `max_inflight` requests
(RESOURCE_EXHAUSTED); the image header probed and its decoding memory reserved from the
`decode_memory_mb` budget (waits up to `decode_wait_s`, then RESOURCE_EXHAUSTED); a full
model queue (RESOURCE_EXHAUSTED). A decision is never made from a NaN/inf score or map
(INTERNAL, counted, logged with the version), and with the inspection log on, a response
leaves only after its decision is durable in the spool (`service.inspection.log`).
Watched aliases are followed by `service.repository.watcher` and answered from memory.

This module is longer than most (about 570 lines): `DataPlane.score`'s admission order above
is a guarantee only if it reads in one place, with the threads each kind of work runs on;
batching (`batcher`), the memory budget (`budget`) and the versions (`service.repository`)
are apart.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from anomaly.wire import identifier_problem
from service import metrics, tracing
from service.dataplane.batcher import Batcher, BatchResult
from service.dataplane.budget import MemoryBudget
from service.dataplane.promotion import PromotionDesk
from service.dataplane.review import ReviewDesk
from service.errors import DeadlineExceeded, InvalidInput, NonFiniteOutput, NotReady, Overloaded, Refused
from service.inspection.evidence import SUFFIXES, EvidenceStore, Kept
from service.inspection.log import Decided, InspectionLog, Verdict
from service.inspection.schema import MAX_COMMENT, VERDICTS
from service.promotion.shadow import Shadow, ShadowJob
from service.repository.model_repository import LoadedModel, ModelRepository, ModelSpec
from service.repository.watcher import ModelWatcher
from service.runtime.engine import Decision
from service.runtime.imaging import (
    Probe,
    check_raw,
    decode_probe,
    overlay_base,
    overlay_cost,
    overlay_cost_of,
    png_bytes,
    probe_image,
    raw_cost,
    raw_pixels,
)
from service.settings import Settings

# What the protocol translators may name: the data plane's calls, and the types they take and give.
__all__ = ["DataPlane", "LoadedModel", "ModelSpec", "ModelStats", "RawPixels", "ScoreInput", "ScoreOutput",
           "Verdict"]

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
    return_overlay: bool = False  # the image with its heat map (`Decision.overlay_png`)
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


@dataclass
class ModelStats:
    """What one loaded version has done since the server started (every transport)."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    decode_ns: int = 0  # decoding and pre-processing of the successful requests
    queue_ns: int = 0
    infer_ns: int = 0
    last_inference_ms: int = 0  # when it last answered, ms since the epoch


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
        self.loader = ThreadPoolExecutor(2, thread_name_prefix="loader")  # loads requests ask for
        self.control = ThreadPoolExecutor(1, thread_name_prefix="model-control")  # `pin`'s loads
        self.following = ThreadPoolExecutor(1, thread_name_prefix="watcher")  # the watcher's alone
        self._control_lock = asyncio.Lock()
        self.decode_budget = MemoryBudget(settings.decode_memory_mb * 1024 * 1024)
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._inflight = 0
        self.stats: dict[tuple[str, str], ModelStats] = {}
        self.ready = False
        self.watcher = ModelWatcher(self.repository, settings, self._follow)
        self.on_ready_change: Callable[[bool], None] | None = None
        self.inspections = InspectionLog.from_settings(settings) if settings.inspection_log else None
        self.evidence = EvidenceStore.from_settings(settings) if settings.evidence else None
        self.review = ReviewDesk(settings, Path(settings.evidence_dir) if settings.evidence else None,
                                 self.decode_budget)
        self.promotion = PromotionDesk(settings, self.repository)
        self.shadow = None if not settings.shadow_alias else Shadow(
            settings, self.repository, self.inspections, busy=lambda: self._inflight > settings.workers,
            evidence=self.evidence)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def _follow(self, fn: Any, *args: Any) -> Any:
        """Run the watcher's blocking work (resolving, loading, judging, swapping in) on its
        own thread, never behind loads requests asked for."""
        return await asyncio.get_running_loop().run_in_executor(self.following, partial(fn, *args))

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
            trying and readiness flips once it loads; other watched models serve meanwhile.
        """
        if self.inspections is not None:
            await self.inspections.start()
        if self.evidence is not None:
            await asyncio.to_thread(self.evidence.start)
        if self.shadow is not None:
            self.shadow.start()
        await self.watcher.refresh_all()
        self._update_ready()
        self.watcher.on_change = self._update_ready
        self.watcher.start()
        return self.ready

    async def get(self, spec: ModelSpec, deadline: float | None = None) -> LoadedModel:
        """Resolve (and load) the model `spec` names. Watched aliases and models already loaded answer
        from memory; anything else is resolved and loaded on the loader threads (never the
        watcher's), waiting at most until `deadline` (the load goes on for the next request).

        Raises:
            NotReady: a watched alias serves nothing yet (the message says why).
            DeadlineExceeded: the model is still loading when the deadline passes.
        """
        loaded = self.repository.cached_model(spec)
        if loaded is not None:
            return loaded
        if spec.alias and self.repository.watched(spec.name, spec.alias):
            raise NotReady(f"{spec} is not serving: {self.repository.not_serving_reason(*_key(spec))}")
        return await self._loading(self.loader, spec, deadline)

    async def _loading(self, executor: ThreadPoolExecutor, spec: ModelSpec,
                       deadline: float | None) -> LoadedModel:
        """Load what `spec` names on `executor`, waiting at most until `deadline`."""
        loop = asyncio.get_running_loop()
        future = asyncio.ensure_future(loop.run_in_executor(executor, self.repository.get, spec))
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(future), remaining)
        except asyncio.TimeoutError:
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
            raise DeadlineExceeded(f"model {spec} is still loading; try again shortly") from None

    async def pin(self, spec: ModelSpec, deadline: float | None = None) -> LoadedModel:
        """Model control's load: load what `spec` names (on the model-control thread, never the
        watcher's or the loader threads) and keep it in memory until unloaded.

        Raises:
            Overloaded: `max_pinned_models` other versions are pinned already.
            NotReady, ModelNotFound, ModelLoadError, DeadlineExceeded: as `get`.
        """
        async with self._control_lock:  # one model-control load at a time: the cap holds
            repo, cap = self.repository, self.settings.max_pinned_models
            loaded = repo.cached_model(spec)
            if loaded is None and spec.alias and repo.watched(spec.name, spec.alias):
                loaded = await self.get(spec, deadline)  # from memory, or NotReady with the reason
            version = loaded.version if loaded is not None else await asyncio.get_running_loop(
                ).run_in_executor(self.control, repo.resolve, spec)
            pinned = repo.pinned()
            if (spec.name, version) not in pinned and len(pinned) >= cap:
                names = ", ".join(f"{n}/{v}" for n, v in sorted(pinned)) or "none"
                metrics.ADMISSION_REFUSALS.labels("pinned_models").inc()
                raise Overloaded(f"model control: {len(pinned)} version(s) pinned already ({names}), the "
                                 f"limit of ANOMALY_MAX_PINNED_MODELS={cap}; unload one first")
            if loaded is None:
                loaded = await self._loading(self.control, spec, deadline)
            repo.pin(loaded)
            return loaded

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
                              label=f"{loaded.name}/{loaded.version}",
                              alone=lambda n: self._inflight <= n)
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

    @staticmethod
    def check_identifiers(req: ScoreInput) -> None:
        """`request_id` and `station`: at most 128 printable characters (`anomaly.wire`).

        Raises:
            InvalidInput: naming the field and the problem.
        """
        for name in ("request_id", "station"):
            problem = identifier_problem(name, getattr(req, name))
            if problem:
                raise InvalidInput(problem)

    def _probe(self, req: ScoreInput) -> tuple[Probe | None, int]:
        """Header-only look at the image: refuse what needs no decoding to refuse, and
        estimate the bytes decoding will take."""
        s = self.settings
        if req.raw is not None:
            r = req.raw
            check_raw(len(r.data), r.width, r.height, r.channels, r.bits, max_pixels=s.max_image_pixels)
            return None, raw_cost(r.width, r.height, r.channels, r.bits)
        probe = probe_image(req.encoded or b"", max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
        return probe, probe.cost

    async def score(self, req: ScoreInput) -> ScoreOutput:
        """Score one image (with tracing on, in an `anomaly.score` span with its stages).

        Raises:
            Overloaded: too many requests admitted, no decode memory in time, or the
                model's queue is full.
            InvalidInput: bad image or fields.
            ModelNotFound, NotReady, ModelLoadError: model selection problems.
            DeadlineExceeded: the deadline passed while queued.
            NonFiniteOutput: the model produced a NaN/inf score or map (no decision).
        """
        if not tracing.enabled():
            return await self._score(req)
        with tracing.span("anomaly.score", {"anomaly.request_id": req.request_id,
                                            "anomaly.station": req.station, "anomaly.model": req.model,
                                            "anomaly.alias": req.alias, "anomaly.category": req.category}):
            return await self._score(req)

    async def _score(self, req: ScoreInput) -> ScoreOutput:
        traced = tracing.enabled()
        wall0 = time.time_ns() if traced else 0
        self.check_identifiers(req)
        if self._inflight >= self.settings.max_inflight:
            metrics.ADMISSION_REFUSALS.labels("inflight").inc()
            raise Overloaded(f"server busy: {self._inflight} requests in flight; retry later")
        self._inflight += 1
        t0 = time.perf_counter()
        loaded: LoadedModel | None = None
        try:
            spec = self.spec(req.model, req.alias, req.version)
            if req.encoded is None and req.raw is None:
                raise InvalidInput("request has no image: set `encoded` bytes or `raw` pixels")
            loaded = await self.get(spec, req.deadline)
            category = loaded.model.resolve_category(req.category)  # validate before any work
            probe, cost = self._probe(req)
            if req.return_overlay:
                self._check_overlay(req, probe)
            admitted = time.time_ns() if traced else 0
            result, size, decode_s, base = await self._infer(loaded, req, probe, cost)
            rid = req.request_id or uuid.uuid4().hex
            if traced:
                self._trace_stages(loaded, rid, wall0, admitted, decode_s, result)
            if not result.finite:
                metrics.NONFINITE.labels(loaded.name, loaded.version).inc()
                log.error("model produced a non-finite score or map; no decision made",
                          extra={"request_id": rid, "model": f"{loaded.name}/{loaded.version}"})
                raise NonFiniteOutput(f"model produced a non-finite score (model {loaded.name} version "
                                      f"{loaded.version}); no decision was made for request_id={rid}")
            amap = result.amap if req.return_anomaly_map or req.return_overlay else None
            with tracing.span("decision"):
                if amap is None:
                    decision = loaded.model.decide(result.score, None, category, size)
                else:
                    decide = partial(loaded.model.decide, result.score, amap, category, size,
                                     map_png=req.return_anomaly_map, overlay_on=base)
                    decision = await self._drawn(decide, base, req.deadline)
            total = time.perf_counter() - t0
            timings = {"decode_ms": decode_s * 1e3, "queue_ms": result.queue_s * 1e3,
                       "inference_ms": result.inference_s * 1e3, "total_ms": total * 1e3}
            metrics.STAGE_LATENCY.labels("decode").observe(decode_s)
            metrics.STAGE_LATENCY.labels("queue").observe(result.queue_s)
            metrics.STAGE_LATENCY.labels("inference").observe(result.inference_s)
            metrics.LATENCY.observe(total)
            decided = Decided(rid, req.station, decision.category, loaded.name, loaded.version,
                              decision.score, decision.normalized_score, decision.threshold,
                              decision.is_anomalous, total * 1e3, decision.threshold_source)
            if traced:
                tracing.annotate({"anomaly.category": decision.category, "anomaly.score": decision.score,
                                  "anomaly.decision": "NG" if decision.is_anomalous else "OK"})
            if self.inspections is not None:  # durable before the answer leaves (sync mode)
                with tracing.span("spool"):
                    await self.inspections.record(decided)
            if self.evidence is not None:
                self._keep_evidence(req, probe, decided, result.amap, loaded)
            if self.shadow is not None:
                self.shadow.offer(ShadowJob(partial(self._decode_again, req), decided,
                                            partial(self._image_as_sent, req, probe), _image_bytes(req)))
            log.info("scored", extra={"request_id": rid, "model": f"{loaded.name}/{loaded.version}",
                                      "category": decision.category, "score": decision.score,
                                      "anomalous": decision.is_anomalous, "batch": result.batch_size,
                                      "ms": round(total * 1e3, 2)})
            stats = self.stats.setdefault((loaded.name, loaded.version), ModelStats())
            stats.success += 1
            stats.success_ns += int(total * 1e9)
            stats.decode_ns += int(decode_s * 1e9)
            stats.queue_ns += int(result.queue_s * 1e9)
            stats.infer_ns += int(result.inference_s * 1e9)
            stats.last_inference_ms = int(time.time() * 1e3)
            return ScoreOutput(rid, decision, loaded, spec.alias, timings)
        except Exception:
            if loaded is not None:
                stats = self.stats.setdefault((loaded.name, loaded.version), ModelStats())
                stats.fail += 1
                stats.fail_ns += int((time.perf_counter() - t0) * 1e9)
            raise
        finally:
            self._inflight -= 1

    def _decode_wait(self, deadline: float | None) -> float:
        """How long a request may wait for decode memory: `decode_wait_s`, or less before its
        deadline."""
        wait = self.settings.decode_wait_s
        return wait if deadline is None else min(wait, max(0.0, deadline - time.monotonic()))

    def _check_overlay(self, req: ScoreInput, probe: Probe | None) -> None:
        """Refuse at once (INVALID_ARGUMENT, not a retry) an overlay the whole decode budget
        could never hold."""
        height, width = (probe.height, probe.width) if probe is not None else \
            (req.raw.height, req.raw.width) if req.raw is not None else (0, 0)
        need = overlay_cost_of(height, width)
        if need > self.decode_budget.capacity:
            raise InvalidInput(f"an overlay of this image needs ~{need >> 20} MB, more than the server's "
                               f"whole decode budget ({self.decode_budget.capacity >> 20} MB, "
                               "ANOMALY_DECODE_MEMORY_MB); ask without one")

    async def _drawn(self, decide: Callable[[], Decision], base: np.ndarray | None,
                     deadline: float | None) -> Decision:
        """`decide()` off the loop; drawing an overlay on `base` first reserves its memory from
        the decode budget (RESOURCE_EXHAUSTED when it does not free up in time)."""
        if base is None:
            return await self._run(decide)
        cost = overlay_cost(base)
        async with self.decode_budget.reserve(cost, self._decode_wait(deadline)) as ok:
            if not ok:
                metrics.ADMISSION_REFUSALS.labels("decode_memory").inc()
                raise Overloaded(f"decode memory busy: no room for the overlay (~{max(1, cost >> 20)} MB); "
                                 "retry later, or ask without one")
            return await self._run(decide)

    def _keep_evidence(self, req: ScoreInput, probe: Probe | None, decided: Decided, amap: np.ndarray | None,
                       loaded: LoadedModel) -> None:
        """Queue the evidence of a decision a person should see (`service.inspection.evidence`);
        never waits, never fails the answer."""
        assert self.evidence is not None
        reason = self.evidence.reason_for(decided)
        if reason is None:
            return
        size = _image_bytes(req) + (amap.nbytes if amap is not None else 0)
        self.evidence.offer(Kept(decided, reason, partial(self._image_as_sent, req, probe), size, amap,
                                 loaded.model.metadata.map_range))

    def _image_as_sent(self, req: ScoreInput, probe: Probe | None) -> tuple[bytes, str]:
        """A request's image for evidence: its bytes as sent and their suffix; raw pixels as PNG."""
        if req.encoded is not None:
            fmt = probe.image.format if probe is not None else None
            return req.encoded, SUFFIXES.get(fmt or "", ".img")
        assert req.raw is not None
        r = req.raw
        return png_bytes(raw_pixels(r.data, r.width, r.height, r.channels, r.bits,
                                    max_pixels=self.settings.max_image_pixels)), ".png"

    def _trace_stages(self, loaded: LoadedModel, rid: str, wall0: int, admitted: int, decode_s: float,
                      result: BatchResult) -> None:
        """The stages of a scored request as spans, from the times measured for its answer:
        admission (model selection, identifiers, the image's header), then decode, queue and
        inference in the order they ran (batching off: the queue for a thread comes first)."""
        parent = tracing.current()
        end = time.time_ns()
        tracing.timed("admission", parent, wall0, admitted)
        unbatched = self._batcher(loaded).max_batch == 1
        order = [("queue", result.queue_s), ("decode", decode_s)] if unbatched else \
            [("decode", decode_s), ("queue", result.queue_s)]
        tracing.stages(parent, end, [*order, ("inference", result.inference_s)])
        tracing.annotate({"anomaly.request_id": rid, "anomaly.model": loaded.name,
                          "anomaly.version": loaded.version, "anomaly.batch_size": result.batch_size})

    async def _infer(self, loaded: LoadedModel, req: ScoreInput, probe: Probe | None,
                     cost: int) -> tuple[BatchResult, tuple[int, int], float, np.ndarray | None]:
        """Reserve decode memory, decode and preprocess, run the model; also the image an
        overlay is drawn on, when the request asks for one."""
        budget = self.decode_budget
        if cost > budget.capacity:
            metrics.ADMISSION_REFUSALS.labels("decode_memory").inc()
            raise InvalidInput(f"image needs ~{cost >> 20} MB to decode, more than the server's whole "
                               f"decode budget ({budget.capacity >> 20} MB, ANOMALY_DECODE_MEMORY_MB); "
                               "send a smaller image")
        async with budget.reserve(cost, self._decode_wait(req.deadline)) as ok:
            if not ok:
                metrics.ADMISSION_REFUSALS.labels("decode_memory").inc()
                raise Overloaded(f"decode memory busy ({budget.in_use >> 20} of {budget.capacity >> 20} MB "
                                 f"reserved; this image needs ~{max(1, cost >> 20)} MB); retry later")
            metrics.DECODE_MEMORY.set(budget.in_use)
            batcher = self._batcher(loaded)
            prepare = partial(self._prepare, loaded, req, probe)
            if batcher.max_batch == 1:  # decode and run in one pool call
                result, (size, decode_s, base) = await batcher.submit_unbatched(prepare, req.deadline)
                return result, size, decode_s, base
            x, size, decode_s, base = await self._run(prepare)
        metrics.DECODE_MEMORY.set(budget.in_use)
        return await batcher.submit(x, req.deadline), size, decode_s, base

    def _decode(self, req: ScoreInput, probe: Probe | None,
                draft: tuple[int, int] | None = None) -> tuple[Any, tuple[int, int]]:
        """The request's image, decoded (a large JPEG at reduced scale when `draft` is the
        size the model works at: `service.runtime.imaging`), and its original (height, width)."""
        if req.raw is not None:
            r = req.raw
            image = raw_pixels(r.data, r.width, r.height, r.channels, r.bits,
                               max_pixels=self.settings.max_image_pixels)
            return image, image.shape[:2]
        assert probe is not None
        return decode_probe(probe, draft), (probe.height, probe.width)

    def _decode_again(self, req: ScoreInput, draft: tuple[int, int] | None = None,
                      ) -> tuple[Any, tuple[int, int]]:
        """Decode a request's image from its bytes once more (the shadow's copy: a queued
        shadow job holds only the encoded bytes, never decoded pixels)."""
        probe, _ = self._probe(req)
        return self._decode(req, probe, draft)

    def _prepare(self, loaded: LoadedModel, req: ScoreInput,
                 probe: Probe | None) -> tuple[np.ndarray, tuple[int, int], float, np.ndarray | None]:
        """Decode and preprocess (runs in the pool); with an overlay asked for, keep a copy of
        the image at most `imaging.OVERLAY_MAX_SIDE` on its longer side to draw it on."""
        t0 = time.perf_counter()
        image, size = self._decode(req, probe, loaded.model.metadata.map_size)
        x = loaded.model.prepare(image)
        base = overlay_base(image) if req.return_overlay else None
        return x, size, time.perf_counter() - t0, base

    async def feedback(self, verdict: Verdict) -> datetime:
        """Record an operator's verdict on a past request id in the inspection log.

        Returns:
            When it was made durable (UTC).

        Raises:
            InvalidInput: a bad verdict or field.
            Refused: the server keeps no inspection log.
            NotReady: the spool refused it (full or failing disk).
        """
        if verdict.verdict not in VERDICTS:
            raise InvalidInput(f"verdict must be one of {', '.join(VERDICTS)} (OK = good part, NG = "
                               f"defective), got {verdict.verdict!r}")
        if not verdict.request_id:
            raise InvalidInput("request_id is empty: give the request id of the scored part")
        for name in ("request_id", "defect_type", "operator", "station"):
            problem = identifier_problem(name, getattr(verdict, name))
            if problem:
                raise InvalidInput(problem)
        if len(verdict.comment) > MAX_COMMENT:
            raise InvalidInput(f"comment is {len(verdict.comment)} characters long; at most {MAX_COMMENT} "
                               "are allowed")
        if self.inspections is None:
            raise Refused("this server keeps no inspection log, so it cannot record feedback; start it "
                          "with ANOMALY_INSPECTION_LOG=true")
        await self.inspections.record(verdict)
        log.info("feedback", extra={"request_id": verdict.request_id, "verdict": verdict.verdict,
                                    "defect_type": verdict.defect_type, "operator": verdict.operator})
        return datetime.now(timezone.utc)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop following the registry, drain the batchers, stop the worker threads, then
        ship what the inspection log still holds (what is left stays in the spool)."""
        await self.watcher.stop()
        await asyncio.gather(*(b.close(timeout) for b in self._batchers.values()))
        if self.shadow is not None:
            await self.shadow.close()
        self.executor.shutdown(wait=True, cancel_futures=False)
        self.loader.shutdown(wait=False, cancel_futures=True)
        self.control.shutdown(wait=False, cancel_futures=True)
        self.following.shutdown(wait=False, cancel_futures=True)
        self.review.close()
        self.promotion.close()
        if self.evidence is not None:
            await asyncio.to_thread(self.evidence.close)
        if self.inspections is not None:  # after the drain: every answered request is recorded
            await self.inspections.close(max(timeout, 10.0))


def _key(spec: ModelSpec) -> tuple[str, str]:
    return spec.name, spec.alias


def _image_bytes(req: ScoreInput) -> int:
    """The size of a request's image as sent."""
    return len(req.encoded) if req.encoded is not None else len(req.raw.data) if req.raw is not None else 0

"""Shadow challenger: score answered images again with a second alias, off the hot path.

With `ANOMALY_SHADOW_ALIAS=challenger`, the server follows `<model>@challenger` beside the
alias it serves. After a request is answered by the served version, a sample of its images
(`ANOMALY_SHADOW_FRACTION`) is queued for the challenger: a bounded queue
(`ANOMALY_SHADOW_QUEUE`) drained by one thread of its own, never the inference workers.
When the queue is full, or the server has as many requests in flight as it has workers,
the image is not shadowed: it is dropped and counted (`anomaly_shadow_dropped_total`), so
shadow work never delays an answer.

Each shadow decision goes to the inspection log (role `shadow`, linked to the answer it
shadows by `served_record_id`) and to `anomaly_shadow_decisions_total{category, outcome}`
(agree | disagree | error). `anomaly shadow-report` summarises the log.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from service import metrics
from service.errors import ServiceError
from service.inspection.evidence import EvidenceStore, Kept
from service.inspection.log import Decided, InspectionLog
from service.settings import Settings

if TYPE_CHECKING:  # the repository calls the gate in this package: only its types are needed here
    from service.repository.model_repository import LoadedModel, ModelRepository

log = logging.getLogger(__name__)


@dataclass
class ShadowJob:
    """One answered image to score again."""

    # (draft size) → (decoded image, original (height, width)); see `service.runtime.imaging`
    decode: Callable[[tuple[int, int] | None], tuple[Any, tuple[int, int]]]
    served: Decided  # the answer's row; its category is the one the challenger decides in
    image: Callable[[], tuple[bytes, str]] | None = None  # the image as sent (evidence of a disagreement)
    image_bytes: int = 0  # its size


class Shadow:
    """The challenger's queue and its thread (see the module docstring).

    Args:
        settings: server settings (`shadow_alias`, `shadow_fraction`, `shadow_queue`).
        repository: where the watched challenger alias is found.
        inspections: the inspection log, or None (then only metrics are kept).
        evidence: where a disagreement's image is kept for review, or None.
        busy: whether the server is saturated now (shadow work is then dropped).
    """

    def __init__(self, settings: Settings, repository: ModelRepository, inspections: InspectionLog | None,
                 busy: Callable[[], bool], evidence: EvidenceStore | None = None) -> None:
        self.settings = settings
        self.repository = repository
        self.inspections = inspections
        self.busy = busy
        self.evidence = evidence
        self.alias = settings.shadow_alias
        self.queue: asyncio.Queue[ShadowJob] = asyncio.Queue(settings.shadow_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="shadow")
        self._random = random.Random()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start draining the queue."""
        self._task = asyncio.create_task(self._loop())

    def offer(self, job: ShadowJob) -> None:
        """Queue an answered image for the challenger, or drop it (counted); never waits."""
        if self._random.random() >= self.settings.shadow_fraction:
            return
        challenger = self.repository.current(self.settings.model_name, self.alias)
        if challenger is None:
            reason = "challenger not loaded"
        elif challenger.version == job.served.model_version and challenger.name == job.served.model_name:
            reason = "challenger is the served version"
        elif self.busy():
            reason = "server busy"
        else:
            try:
                self.queue.put_nowait(job)
                return
            except asyncio.QueueFull:
                reason = "queue full"
        metrics.SHADOW_DROPPED.labels(reason).inc()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self.queue.get()
            challenger = self.repository.current(self.settings.model_name, self.alias)
            if challenger is None:
                metrics.SHADOW_DROPPED.labels("challenger not loaded").inc()
                continue
            try:
                decided = await loop.run_in_executor(self.executor, self._score, challenger, job)
            except ServiceError as exc:
                metrics.SHADOW.labels(job.served.category, "error").inc()
                log.warning("shadow %s/%s could not score request_id=%s: %s", challenger.name,
                            challenger.version, job.served.request_id, exc.message)
                continue
            except Exception:  # never let one image stop the shadow
                metrics.SHADOW.labels(job.served.category, "error").inc()
                log.exception("shadow %s/%s failed on request_id=%s", challenger.name, challenger.version,
                              job.served.request_id)
                continue
            outcome = "agree" if decided.anomalous == job.served.anomalous else "disagree"
            metrics.SHADOW.labels(job.served.category, outcome).inc()
            if outcome == "disagree" and self.evidence is not None and job.image is not None:
                self.evidence.offer(Kept(job.served, "shadow_disagreement", job.image, job.image_bytes,
                                         amap=None, map_range=(0.0, 1.0), other=asdict(decided)))
            if self.inspections is not None:
                try:
                    await self.inspections.record(decided)
                except ServiceError as exc:  # a full spool refuses shadow rows like any other
                    log.warning("shadow decision of request_id=%s not recorded: %s",
                                job.served.request_id, exc.message)

    def _score(self, challenger: LoadedModel, job: ShadowJob) -> Decided:
        """Decode, run and decide with the challenger (on the shadow thread)."""
        image, size = job.decode(challenger.model.metadata.map_size)
        decision = challenger.model.score_image(image, job.served.category, size)
        return replace(job.served, model_name=challenger.name, model_version=challenger.version,
                       score=decision.score, normalized_score=decision.normalized_score,
                       threshold=decision.threshold, threshold_source=decision.threshold_source,
                       anomalous=decision.is_anomalous, latency_ms=0.0, role="shadow",
                       served_record_id=job.served.record_id, record_id=uuid.uuid4().hex)

    async def close(self) -> None:
        """Stop shadowing (queued images are dropped)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.executor.shutdown(wait=True, cancel_futures=True)

"""The review desk: what the review station asks the server (`ListReviews`, `GetEvidence`).

It reads the inspection log (`service.inspection.review`) and the evidence store
(`service.inspection.evidence`) off the event loop, and draws a part's heat map and overlay
from its evidence, with the memory that takes reserved from the decode budget. Feedback on a
part goes through `DataPlane.feedback`, as the `Feedback` RPC does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path

import numpy as np

from service import metrics
from service.dataplane.budget import MemoryBudget
from service.dataplane.reads import OneRead, on_daemon_thread
from service.errors import InvalidInput, ModelNotFound, NotReady, Overloaded, Refused
from service.inspection.evidence import Found, kept_on_disk, read_evidence, read_record, request_key
from service.inspection.quality import Quality, quality_by_day
from service.inspection.remote import RemoteEvidence, scratch
from service.inspection.review import ReviewFilter, ReviewRow, one_decision, review_queue
from service.inspection.schema import engine_for
from service.runtime.imaging import (
    Probe,
    decode_probe,
    defect_region,
    heat_png,
    overlay_base,
    overlay_cost_of,
    overlay_png,
    probe_image,
)
from service.settings import Settings

log = logging.getLogger(__name__)
QUALITY_DEADLINE_S = 8.0  # under the gateway's request timeout
FETCH_THREADS = 2  # parts read from the evidence bucket at once
FETCH_DEADLINE_S = 5.0  # the longest a part's page waits for the bucket
QUALITY_FRESH_S = 10.0  # a quality report is reused this long (reloads, many browsers: one read)
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff",
               ".webp": "image/webp"}


@dataclass
class Part:
    """One part for review: its decision and, when kept, its evidence drawn."""

    row: ReviewRow
    kept: bool = False  # its evidence is kept (whatever was asked of it)
    image: bytes = b""
    image_type: str = ""
    heat_png: bytes = b""
    overlay_png: bytes = b""


def _drawable(found: Found, max_pixels: int) -> bool:
    """Whether an item read back can be drawn as the store wrote it: a map no larger than an
    image may be, a finite threshold and a two-number map range."""
    record = found.record
    try:
        lo, hi = (float(v) for v in (record.get("map_range") or (0.0, 1.0)))
        numbers = [lo, hi, float(record["threshold"])]
    except (KeyError, TypeError, ValueError):
        return False
    if not all(np.isfinite(numbers)):
        return False
    return found.map8 is None or found.map8.size <= max_pixels


def region_of(t: np.ndarray, record: dict) -> np.ndarray:
    """The defect region on a kept map (`t`: the map scaled to [0, 1] over its `map_range`), as
    its decision drew it (`imaging.defect_region`)."""
    lo, hi = record.get("map_range") or (0.0, 1.0)
    return defect_region(t, (float(record["threshold"]) - lo) / max(hi - lo, 1e-12),
                         record.get("decision") == "NG")


class ReviewDesk:
    """Answers the review station from the inspection log and the evidence store.

    Args:
        settings: server settings (the inspection database's URL, decode limits).
        evidence: the evidence folder (`ANOMALY_EVIDENCE_DIR`, every process's evidence under it), or
            None (parts are then listed without images).
        budget: the decode memory budget drawing takes its memory from.
    """

    def __init__(self, settings: Settings, evidence: Path | None, budget: MemoryBudget) -> None:
        self.settings, self.evidence, self.budget = settings, evidence, budget
        self.remote = RemoteEvidence(settings.evidence_remote_uri, settings.tracking_uri) \
            if evidence is not None and settings.evidence_remote_uri else None
        # Bucket reads on daemon threads of their own, at most FETCH_THREADS at once: a bucket that
        # hangs holds these, never the threads the inspection log and shutdown share, nor the exit.
        self._fetch_slots = threading.BoundedSemaphore(FETCH_THREADS)
        self._engine = None
        self._quality: OneRead[Quality] = OneRead("quality", QUALITY_FRESH_S)

    def _url(self) -> str:
        if not self.settings.inspection_log:
            raise Refused("this server keeps no inspection log, so it has no parts to review; start it with "
                          "ANOMALY_INSPECTION_LOG=true")
        return self.settings.inspection_db()

    def _database(self):  # type: ignore[no-untyped-def]
        url = self._url()
        if self._engine is None:
            self._engine = engine_for(url, pool_pre_ping=True)
        return self._engine

    async def queue(self, wanted: ReviewFilter) -> list[tuple[ReviewRow, bool]]:
        """The review queue, each part with whether its evidence is kept."""
        rows = await asyncio.to_thread(review_queue, self._database(), wanted)
        kept = await asyncio.to_thread(kept_on_disk, self.evidence) if self.evidence is not None else set()
        return [(row, bool(row.decision.record_id) and row.decision.record_id in kept) for row in rows]

    async def quality(self, days: int, station: str = "") -> Quality:
        """False calls, escapes and reviewed parts per (version, category) for each of the last
        `days` UTC days, and the thresholds the whole period's reviewed parts support.

        Raises:
            NotReady: not computed within `QUALITY_DEADLINE_S` (a large log); it goes on, and a
                reload within `QUALITY_FRESH_S` of its end shows it.
        """
        url = self._url()
        try:
            return await self._quality.get((days, station), lambda: quality_by_day(url, days, station),
                                           QUALITY_DEADLINE_S)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin on Python 3.10
            raise NotReady(f"the quality of the last {days} days is still being computed from the inspection "
                           "log (or another period's is, first); reload in a moment") from None

    async def part(self, record_id: str, drawings: str = "") -> Part:
        """One part with its evidence drawn: "" the image, heat layer and overlay; "overlay" the
        overlay alone; "layers" the image and heat layer (`GetEvidenceRequest.drawings`).

        Raises:
            ModelNotFound: no served decision has this record id (NOT_FOUND).
            Overloaded: no decode memory for drawing it now.
        """
        row = await asyncio.to_thread(one_decision, self._database(), record_id)
        if row is None:
            raise ModelNotFound(f"no served decision has record_id {record_id[:64]!r} in the inspection log")
        found = None
        if self.evidence is not None:
            found = await asyncio.to_thread(read_evidence, self.evidence, record_id,
                                            self.settings.max_image_pixels)
        if found is None and self.remote is not None:
            found = await self._fetch_within(row)
        if found is None:
            return Part(row)
        return await self._drawn(row, found, drawings)

    async def _fetch_within(self, row: ReviewRow) -> Found | None:
        """`_fetch` on the desk's own threads within `FETCH_DEADLINE_S`; None (the part shown
        without its images, logged) when the bucket is slow or every fetch thread is taken."""
        if not self._fetch_slots.acquire(blocking=False):
            log.warning("evidence of record_id=%s not read from the bucket: %d bucket reads are still under "
                        "way", row.decision.record_id, FETCH_THREADS)
            return None
        try:
            future = on_daemon_thread("evidence-fetch", lambda: self._fetch(row))
        except BaseException:  # no thread to be had: the slot is not taken
            self._fetch_slots.release()
            raise
        future.add_done_callback(lambda _: self._fetch_slots.release())
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), FETCH_DEADLINE_S)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin on Python 3.10
            log.warning("evidence of record_id=%s not read from the bucket within %.0f s (it goes on)",
                        row.decision.record_id, FETCH_DEADLINE_S)
        except Exception:  # whatever a damaged or foreign item makes of the reader: as if not kept
            log.warning("evidence of record_id=%s from the bucket cannot be read", row.decision.record_id,
                        exc_info=True)
        return None

    def _fetch(self, row: ReviewRow) -> Found | None:
        """The part's evidence from the bucket (evicted locally), or None (not kept, or the bucket
        cannot be read now: logged, and the part is shown without it)."""
        d = row.decision
        created = d.created_at if d.created_at.tzinfo else d.created_at.replace(tzinfo=timezone.utc)
        days = [(created + timedelta(days=i)).strftime("%Y-%m-%d") for i in (0, 1)]
        stem = f"{request_key(d.request_id)}-{d.record_id}"
        with scratch() as folder:
            try:
                fetched = self.remote.fetch(days, stem, Path(folder),  # type: ignore[union-attr]
                                            2 * self.settings.max_image_bytes + (1 << 20))
                found = read_record(fetched[1] / f"{stem}.json", self.settings.max_image_pixels) \
                    if fetched else None
            except Exception as exc:  # an outage, a damaged or foreign item: shown without it
                log.warning("evidence of record_id=%s not read from the bucket: %s", d.record_id, exc)
                return None
        if found is not None and not _drawable(found, self.settings.max_image_pixels):
            log.warning("evidence of record_id=%s from the bucket is not this store's: shown without it",
                        d.record_id)
            return None
        return found

    async def _drawn(self, row: ReviewRow, found: Found, drawings: str) -> Part:
        s = self.settings
        part = Part(row, True, b"" if drawings == "overlay" else found.image,
                    MEDIA_TYPES.get(found.suffix, "application/octet-stream"))
        if found.map8 is None or not _drawable(found, s.max_image_pixels):  # a hand-edited record: undrawn
            return part
        try:
            probe = probe_image(found.image, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
        except InvalidInput:  # damaged on disk: the part is still shown, undrawn
            return part
        cost = probe.cost + overlay_cost_of(probe.height, probe.width) + 8 * found.map8.size  # map copies
        if cost > self.budget.capacity:  # could never be drawn here: shown undrawn
            return part
        async with self.budget.reserve(cost, s.decode_wait_s) as ok:
            if not ok:
                metrics.ADMISSION_REFUSALS.labels("decode_memory").inc()
                raise Overloaded("decode memory busy: no room to draw this part now; retry later")
            part.heat_png, part.overlay_png = await asyncio.to_thread(self._draw, probe, found, drawings)
        return part

    @staticmethod
    def _draw(probe: Probe, found: Found, drawings: str) -> tuple[bytes, bytes]:
        """The heat layer and the overlay, each only when `drawings` asks for it."""
        try:
            base = overlay_base(decode_probe(probe))
        except InvalidInput:  # damaged past its header: shown undrawn
            return b"", b""
        t = found.map8.astype(np.float32) / 255  # type: ignore[union-attr]
        region = region_of(t, found.record)
        heat = heat_png(t, 0.0, 1.0, region, base.shape[:2]) if drawings != "overlay" else b""
        return heat, overlay_png(base, t, 0.0, 1.0, region) if drawings != "layers" else b""

    def close(self) -> None:
        """Start no more quality reports and let go of the database connections."""
        self._quality.close()
        if self._engine is not None:
            self._engine.dispose()

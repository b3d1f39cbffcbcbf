"""Evidence for review: the image and anomaly map of the decisions a person should look at.

With `ANOMALY_EVIDENCE=true` the server keeps, in a local folder (`ANOMALY_EVIDENCE_DIR`):

- every NG decision,
- every shadow disagreement (the challenger decided otherwise than the answer),
- a sample of OK decisions (`ANOMALY_EVIDENCE_OK_FRACTION`, default 1 %).

Each is kept as files under `<dir>/<UTC day>/`, named `<hash of the request id>-<record id>`:
the image as it was sent (raw pixels as PNG), its anomaly map as an 8-bit gray PNG at the
model's map resolution (`.map.png`; not for a shadow disagreement, whose record holds both
decisions), and a JSON record of the decision (request id, station, category, model
version, score, threshold, decision, why it was kept). A decision kept already and then
shadowed with a disagreement is not kept twice: its record gains the challenger's decision
(`challenger`, `also`). The record id is the inspection
log row's (`Decided.record_id`), so a row of the log names its evidence, and a request id
finds its evidence too (`find`).

Keeping evidence never delays or fails a decision: `offer` only queues (a bounded queue,
`ANOMALY_EVIDENCE_QUEUE_MB` of images waiting); a full queue drops the evidence and counts it.
One thread of its own writes each file to a temporary name, then renames it. A write the
disk refuses (full, read-only) drops that evidence (counted, logged at most once a minute)
and removes what it had written.

The store is bounded by size (`ANOMALY_EVIDENCE_MAX_MB`) and age
(`ANOMALY_EVIDENCE_MAX_AGE_DAYS`): the oldest evidence goes first. On start it takes stock of
what an earlier run left. Metrics: `anomaly_evidence_items` and `anomaly_evidence_bytes`
(what it holds), `anomaly_evidence_total{outcome}` (kept, dropped_queue_full,
dropped_write_error, dropped_disk_low, evicted_size, evicted_age, evicted_disk_low). The store
never takes its disk's last `ANOMALY_EVIDENCE_MIN_FREE_MB` (1024 MB): below that it drops its
oldest evidence, then new evidence, so the inspection log's spool beside it keeps room. Only
the store's own files (`<16 hex>-<32 hex>.*` in `YYYY-MM-DD` folders) are ever counted or
deleted: other files in the folder are left alone. With `anomaly serve --processes N` each
process keeps its own subfolder (`p<index>`) with 1/N of the size bound. With
`ANOMALY_EVIDENCE_REMOTE_URI` each item is also copied to the MLflow artifact store or an
S3-compatible bucket (`service.inspection.remote`), where it outlives the local bounds.

The module is longer than most: the writer, its bounds and the readers (`read_evidence`,
`kept_on_disk`) share one file layout and its naming rule, kept in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import random
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from service import metrics
from service.inspection.log import Decided
from service.inspection.remote import RemoteEvidence
from service.runtime.imaging import DEFAULT_MAX_PIXELS, anomaly_map_png
from service.settings import Settings

log = logging.getLogger(__name__)

REASONS = ("ng", "shadow_disagreement", "ok_sample")
SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
DAY = re.compile(r"\d{4}-\d{2}-\d{2}")  # the day folders
# The store's own files: <16 hex of the request id>-<32 hex record id>.<suffix>; nothing else in
# the folder is ever read, counted or deleted.
OWN = re.compile(r"([0-9a-f]{16})-([0-9a-f]{32})\.[a-z0-9.]+")
AGE_CHECK_S = 60.0  # how often the age bound is applied when nothing is written
ERROR_LOG_S = 60.0  # at most one log line a minute about refused writes


def request_key(request_id: str) -> str:
    """The file-name part that stands for a request id (any text a client may send)."""
    return hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:16]


@dataclass
class Kept:
    """One decision's evidence, as queued."""

    decided: Decided
    reason: str
    image: Callable[[], tuple[bytes, str]]  # → (image bytes, file suffix), called on the writer thread
    size: int  # bytes held while queued (the image, the map)
    amap: np.ndarray | None
    map_range: tuple[float, float]
    other: dict | None = None  # a shadow disagreement: the challenger's decision


@dataclass
class Item:
    """Evidence on disk: its files' common stem and total size."""

    stem: Path  # <dir>/<day>/<key>-<record id>
    size: int
    mtime: float


class EvidenceStore:
    """The bounded evidence folder and its writer thread (see the module docstring).

    Args:
        root: the folder (made if missing).
        max_bytes: size bound of everything kept.
        max_age_s: age bound of each item.
        ok_fraction: share of OK decisions kept.
        queue_bytes: bound of the images waiting to be written.
        min_free_bytes: free space the store leaves on its disk (for the inspection log's spool
            and everything else there): below it, the oldest evidence goes, then new evidence
            is dropped.
    """

    def __init__(self, root: Path, *, max_bytes: int, max_age_s: float, ok_fraction: float,
                 queue_bytes: int, min_free_bytes: int = 0, remote: RemoteEvidence | None = None) -> None:
        self.root = Path(root)
        self.remote = remote
        self.max_bytes, self.max_age_s, self.min_free_bytes = max_bytes, max_age_s, min_free_bytes
        self.ok_fraction, self.queue_bytes = ok_fraction, queue_bytes
        self.items: OrderedDict[str, Item] = OrderedDict()  # stem → item, oldest first
        self.bytes = 0
        self._pending = 0  # bytes queued
        self._lock = threading.Lock()
        self._queue: queue.Queue[Kept | None] = queue.Queue()
        self._random = random.Random()
        self._last_error_log = 0.0
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> EvidenceStore:
        """The store `settings` describe (a subfolder and a share of the bound per process)."""
        root = Path(settings.evidence_dir)
        share = 1
        if settings.process_index >= 0:
            root, share = root / f"p{settings.process_index}", max(1, settings.processes)
        return cls(root, max_bytes=settings.evidence_max_mb * (1 << 20) // share,
                   max_age_s=settings.evidence_max_age_days * 86400,
                   ok_fraction=settings.evidence_ok_fraction,
                   queue_bytes=settings.evidence_queue_mb * (1 << 20),
                   min_free_bytes=settings.evidence_min_free_mb * (1 << 20),
                   remote=None if not settings.evidence_remote_uri else RemoteEvidence(
                       settings.evidence_remote_uri, settings.tracking_uri,
                       queue_items=settings.evidence_remote_queue,
                       max_age_s=settings.evidence_remote_max_age_days * 86400,
                       prune=settings.process_index <= 0))

    # -- the serving side: never blocks ------------------------------------------------
    def start(self) -> None:
        """Take stock of the folder, then start the writer thread.

        Raises:
            OSError: the folder cannot be made or read (the message names ANOMALY_EVIDENCE_DIR), or
                the bucket's URI cannot be used (ANOMALY_EVIDENCE_REMOTE_URI).
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not self.root.is_dir():
                raise NotADirectoryError(f"{self.root} is not a folder")
        except OSError as exc:
            raise OSError(f"the evidence folder (ANOMALY_EVIDENCE_DIR) {self.root} cannot be used: "
                          f"{exc}") from exc
        self._take_stock()
        if self.remote is not None:
            try:
                self.remote.repo()
            except ValueError as exc:
                raise OSError(f"the evidence bucket (ANOMALY_EVIDENCE_REMOTE_URI) {self.remote.uri} "
                              f"cannot be used: {exc}") from exc
            self.remote.start()
        self._thread = threading.Thread(target=self._write_loop, name="evidence", daemon=True)
        self._thread.start()
        log.info("evidence kept in %s (%d items, %.1f of %d MB)", self.root, len(self.items),
                 self.bytes / (1 << 20), self.max_bytes >> 20)

    def reason_for(self, decided: Decided) -> str | None:
        """Why a served decision is kept ("ng", "ok_sample"), or None."""
        if decided.anomalous:
            return "ng"
        return "ok_sample" if self._random.random() < self.ok_fraction else None

    def offer(self, kept: Kept) -> bool:
        """Queue evidence for writing; False (counted) when the queue is full. Never waits."""
        with self._lock:
            if self._thread is None or self._pending + kept.size > self.queue_bytes:
                metrics.EVIDENCE.labels("dropped_queue_full").inc()
                return False
            self._pending += kept.size
        self._queue.put(kept)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued (within `timeout` seconds), then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self.remote is not None:
            self.remote.close(timeout)

    # -- the writer thread ---------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            try:
                kept = self._queue.get(timeout=AGE_CHECK_S)
            except queue.Empty:  # nothing written for a while: the age bound still applies
                self._evict()
                continue
            if kept is None:
                return
            try:
                self._write(kept)
            except Exception:  # never let one item stop the writer
                metrics.EVIDENCE.labels("dropped_write_error").inc()
                log.exception("evidence of request_id=%s not kept", kept.decided.request_id)
            finally:
                with self._lock:
                    self._pending -= kept.size

    def _room(self, size: int) -> bool:
        """Whether `size` more bytes leave the disk its free-space floor, after dropping the
        oldest evidence if that is what it takes."""
        if self.min_free_bytes <= 0:
            return True
        while True:
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                return False
            if free - size >= self.min_free_bytes:
                return True
            if not self.items:
                return False
            self._drop_oldest("evicted_disk_low")

    def _write(self, kept: Kept) -> None:
        d = kept.decided
        now = datetime.now(timezone.utc)
        for day in (now, now - timedelta(days=1)):  # the decision itself kept already (a shadow disagreement)
            earlier = self.items.get(str(self.root / day.strftime("%Y-%m-%d") /
                                         f"{request_key(d.request_id)}-{d.record_id}"))
            if earlier is not None:
                self._join(earlier, kept)
                return
        if not self._room(2 * kept.size + 4096):
            metrics.EVIDENCE.labels("dropped_disk_low").inc()
            self._log_refusal(d.request_id, f"less than {self.min_free_bytes >> 20} MB would be left free on "
                                            "its disk (ANOMALY_EVIDENCE_MIN_FREE_MB)", "dropped_disk_low")
            return
        stem = self.root / now.strftime("%Y-%m-%d") / f"{request_key(d.request_id)}-{d.record_id}"
        record = {**asdict(d), "decision": "NG" if d.anomalous else "OK", "reason": kept.reason,
                  "kept_at": now.isoformat(), "challenger": kept.other, "map_range": list(kept.map_range)}
        written: list[Path] = []
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            image, suffix = kept.image()
            written.append(_write_file(stem.with_name(stem.name + suffix), image))
            if kept.amap is not None:
                lo, hi = kept.map_range
                written.append(_write_file(stem.with_name(stem.name + ".map.png"),
                                           anomaly_map_png(kept.amap, kept.amap.shape, lo, hi)))
            record["files"] = [p.name for p in written]
            written.append(_write_file(stem.with_name(stem.name + ".json"),
                                       json.dumps(record, default=str).encode()))
        except OSError as exc:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            metrics.EVIDENCE.labels("dropped_write_error").inc()
            self._log_refusal(d.request_id, str(exc), "dropped_write_error")
            return
        size = sum(p.stat().st_size for p in written)
        self.items[str(stem)] = Item(stem, size, time.time())
        self.bytes += size
        metrics.EVIDENCE.labels("kept").inc()
        if self.remote is not None:
            self.remote.offer(stem.parent.name, written)  # its record last
        self._evict()

    def _join(self, item: Item, kept: Kept) -> None:
        """Add a second reason to evidence already kept for the same decision (an NG answer the
        challenger passed): its record gains the challenger's decision; the image and map stay."""
        path = item.stem.with_name(item.stem.name + ".json")
        try:
            record = json.loads(path.read_bytes())
            if not isinstance(record, dict):
                raise ValueError("its record is not a JSON object")
            also = record.get("also")
            also = [a for a in also if isinstance(a, str)] if isinstance(also, list) else []
            record["challenger"], record["also"] = kept.other, sorted({*also, kept.reason})
            _write_file(path, json.dumps(record, default=str).encode())
            size = sum(p.stat().st_size for p in item.stem.parent.glob(item.stem.name + ".*")
                       if OWN.fullmatch(p.name) and not p.name.endswith(".tmp"))
            self.bytes += size - item.size  # counted again from its files (one edited by hand too)
            item.size = size
            if self.remote is not None:
                self.remote.offer(item.stem.parent.name, [path])
        except (OSError, ValueError, TypeError) as exc:  # the first evidence stands as it is
            why = f"could not add the {kept.reason} to its evidence: {exc}"
            self._log_refusal(kept.decided.request_id, why, "dropped_write_error")
            metrics.EVIDENCE.labels("dropped_write_error").inc()

    def _log_refusal(self, request_id: str, why: str, outcome: str) -> None:
        """One log line a minute at most about evidence not kept."""
        if time.monotonic() - self._last_error_log >= ERROR_LOG_S:
            self._last_error_log = time.monotonic()
            log.warning("evidence of request_id=%s not kept: %s (further ones within %.0f s are counted in "
                        "anomaly_evidence_total{outcome=\"%s\"}, not logged)", request_id, why, ERROR_LOG_S,
                        outcome)

    def _drop_oldest(self, reason: str) -> None:
        """Delete the oldest item's files (only the store's own) and count why."""
        _, item = self.items.popitem(last=False)
        self.bytes -= item.size
        for path in item.stem.parent.glob(item.stem.name + ".*"):
            if OWN.fullmatch(path.name):
                with contextlib.suppress(OSError):
                    path.unlink()
        with contextlib.suppress(OSError):  # an emptied day folder goes too
            item.stem.parent.rmdir()
        metrics.EVIDENCE.labels(reason).inc()
        metrics.EVIDENCE_ITEMS.set(len(self.items))
        metrics.EVIDENCE_BYTES.set(self.bytes)

    def _evict(self) -> None:
        """Drop the oldest items while over the size bound, and every item past the age bound."""
        oldest_allowed = time.time() - self.max_age_s
        while self.items:
            item = next(iter(self.items.values()))
            if self.bytes > self.max_bytes:
                reason = "evicted_size"
            elif item.mtime < oldest_allowed:
                reason = "evicted_age"
            else:
                break
            self._drop_oldest(reason)
        metrics.EVIDENCE_ITEMS.set(len(self.items))
        metrics.EVIDENCE_BYTES.set(self.bytes)

    def _take_stock(self) -> None:
        """What an earlier run left: items by their JSON record, oldest first; temporary files
        of a write cut short are removed."""
        found: dict[str, Item] = {}
        now = time.time()
        days = [d for d in self.root.iterdir() if d.is_dir() and DAY.fullmatch(d.name)]
        for path in (p for day in days for p in day.iterdir() if OWN.fullmatch(p.name)):
            if path.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            stem = path.parent / path.name.split(".", 1)[0]
            mtime = min(stat.st_mtime, now)  # written while the clock was ahead: as if now
            item = found.setdefault(str(stem), Item(stem, 0, mtime))
            item.size += stat.st_size
            item.mtime = min(item.mtime, mtime)
        for key, item in sorted(found.items(), key=lambda kv: kv[1].mtime):
            self.items[key] = item
            self.bytes += item.size
        self._evict()

    # -- reading it back ----------------------------------------------------------------
    def find(self, request_id: str) -> list[dict]:
        """The records kept for `request_id` (newest first), each with the paths of its files."""
        records = []
        for path in self.root.glob(f"*/{request_key(request_id)}-*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if record.get("request_id") == request_id:
                record["paths"] = [str(path.parent / name) for name in record.get("files", [])]
                records.append(record)
        return sorted(records, key=lambda r: r.get("kept_at", ""), reverse=True)


@dataclass
class Found:
    """Evidence read back: the record, the image as sent and its suffix, the map (8-bit)."""

    record: dict
    image: bytes
    suffix: str
    map8: np.ndarray | None


def evidence_roots(base: Path) -> list[Path]:
    """The folders evidence is kept in under `base` (`ANOMALY_EVIDENCE_DIR`): `base` itself and
    the `p<index>` folder of each process of `anomaly serve --processes N`."""
    try:
        return [base, *sorted(p for p in base.iterdir() if p.is_dir() and re.fullmatch(r"p\d+", p.name))]
    except OSError:
        return []


def kept_on_disk(base: Path) -> set[str]:
    """The record ids whose evidence is kept under `base` (every process's folder)."""
    found = set()
    for root in evidence_roots(base):
        try:
            days = [d for d in root.iterdir() if d.is_dir() and DAY.fullmatch(d.name)]
        except OSError:
            continue
        for day in days:
            with contextlib.suppress(OSError):
                found.update(m.group(2) for m in map(OWN.fullmatch, os.listdir(day))
                             if m is not None and m.group(0).endswith(".json"))
    return found


def read_evidence(base: Path, record_id: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Found | None:
    """The evidence of the inspection row `record_id` under `base` (every process's folder), or
    None."""
    if not re.fullmatch(r"[0-9a-f]{32}", record_id):  # nothing else names a file of the store
        return None
    paths = (p for root in evidence_roots(base) for p in root.glob(f"*/*-{record_id}.json"))
    for path in paths:
        found = read_record(path, max_pixels)
        if found is not None:
            return found
    return None


def read_record(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Found | None:
    """The item whose record is `path` (its files beside it), or None when it is gone or
    damaged (evicted meanwhile: as if not kept), or its map is larger than `max_pixels` (a map
    is at the model's map resolution, at most an image's: not one this store wrote)."""
    try:
        record = json.loads(path.read_text())
        names = record.get("files", [])
        image = next(n for n in names if not n.endswith((".map.png", ".json")))
        data = (path.parent / image).read_bytes()
        if "." not in image:
            return None
        map8 = None
        if any(n.endswith(".map.png") for n in names):
            with Image.open(path.parent / next(n for n in names if n.endswith(".map.png"))) as im:
                if im.width * im.height > max_pixels:
                    return None
                map8 = np.asarray(im.convert("L"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError, Image.DecompressionBombError):
        return None
    return Found(record, data, "." + image.split(".", 1)[1], map8)


def _write_file(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary name (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path

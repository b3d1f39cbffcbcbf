"""Evidence kept in a bucket too: the MLflow artifact store or an S3-compatible bucket.

With `ANOMALY_EVIDENCE_REMOTE_URI`, every item the local evidence store writes
(`service.inspection.evidence`) is copied, off the hot path, to that location under
`<UTC day>/`, with the same file names. The location is any artifact URI MLflow can write:

- `s3://bucket/prefix`: an S3-compatible bucket (AWS S3, MinIO, Ceph RGW …); the endpoint
  and credentials come from MLflow's and boto3's own variables (`MLFLOW_S3_ENDPOINT_URL`,
  `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `MLFLOW_S3_IGNORE_TLS`); needs the `s3` extra;
- `mlflow-artifacts:/evidence`: the MLflow tracking server's own artifact store (the server
  started with `--serve-artifacts`, the default), through its proxy: no bucket credentials on
  the edge box;
- `file:///mnt/nas/evidence`: a mounted share.

The local folder stays the bounded working copy the review station reads first; the bucket
keeps what the local bounds evicted, until its own age bound
(`ANOMALY_EVIDENCE_REMOTE_MAX_AGE_DAYS`: day folders past it are deleted, checked hourly by one
process) or the bucket's lifecycle rules. A part whose evidence is gone locally is fetched
from the bucket when its page is opened.

Copying never delays or fails a decision, nor the local writer: items wait in a bounded queue
(`ANOMALY_EVIDENCE_REMOTE_QUEUE`) for one thread of their own; a full queue drops the copy, a
failed copy is retried twice and then dropped, and an item evicted locally before its turn is
not copied. Each outcome is counted (`anomaly_evidence_remote_total{outcome}`: copied (a record
copied again after a shadow disagreement joined it counts again), dropped_queue_full, failed,
missed_evicted, lost_at_shutdown, pruned_days) and failures are logged at most once a minute.
Copies still queued at shutdown are not made (counted at a clean stop; a SIGKILL loses the
queue; neither is offered again at start: those items stay in the local folder only). At start
the bucket is listed once, and a bucket that cannot be listed (a wrong name, wrong keys) is
logged at ERROR. The files of an item are copied record last, so a reader that finds a record
finds its image and map. A URI with `?` or `#` (which the stores cut off) or `..` is refused at
start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from service import metrics
from service.errors import first_line

log = logging.getLogger(__name__)
RETRIES = (1.0, 5.0)  # seconds before the second and third try of a copy
PRUNE_EVERY_S = 3600.0
ERROR_LOG_S = 60.0
MAX_RECORD_BYTES = 1 << 20  # a record is a few hundred bytes


def artifact_repository(uri: str, tracking_uri: str) -> Any:
    """MLflow's artifact repository for `uri` (its registry of schemes: s3, mlflow-artifacts, file …).

    Raises:
        ValueError: MLflow knows no repository for this URI, or one it needs is not installed
            (the message says which).
    """
    from urllib.parse import urlsplit

    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    if "?" in uri or "#" in uri:
        raise ValueError("it holds '?' or '#', which the artifact stores cut off (name the prefix without "
                         "them)")
    if ".." in urlsplit(uri).path.split("/"):
        raise ValueError("its path holds '..'")
    try:
        return get_artifact_repository(uri, tracking_uri=tracking_uri)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{uri.split(':', 1)[0]}: needs the Python package {exc.name!r} "
                         "(pip install 'edge-anomaly[s3]' for s3://)") from exc
    except Exception as exc:  # MLflow's own error for an unknown scheme or a malformed URI
        raise ValueError(first_line(exc)) from exc


class RemoteEvidence:
    """The copy queue, its thread, and reading items back (see the module docstring).

    Args:
        uri: where evidence is copied (`ANOMALY_EVIDENCE_REMOTE_URI`).
        tracking_uri: the MLflow tracking URI (`mlflow-artifacts:` URIs resolve against it).
        queue_items: items waiting to be copied, at most.
        max_age_s: day folders older than this are deleted from the bucket; 0 = never.
        prune: whether this process prunes (one of `--processes` does).
    """

    def __init__(self, uri: str, tracking_uri: str, *, queue_items: int = 10000, max_age_s: float = 0.0,
                 prune: bool = True) -> None:
        self.uri, self.tracking_uri = uri.rstrip("/"), tracking_uri
        self.max_age_s, self.prune = max_age_s, prune
        # boto3 retries a call that times out 4 times by default (minutes against a bucket that
        # accepts and never answers); this store has its own tries. Process-wide (model downloads
        # from an S3 artifact root too) and still settable in the environment.
        os.environ.setdefault("AWS_MAX_ATTEMPTS", "2")
        self._repo: Any = None
        self._queue: queue.Queue[tuple[str, list[Path]] | None] = queue.Queue(queue_items)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_error_log = 0.0
        self._pruned_at = -PRUNE_EVERY_S

    def repo(self) -> Any:
        """The artifact repository (made on first use)."""
        if self._repo is None:
            self._repo = artifact_repository(self.uri, self.tracking_uri)
        return self._repo

    # -- copying -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the copying thread."""
        self._thread = threading.Thread(target=self._loop, name="evidence-remote", daemon=True)
        self._thread.start()

    def offer(self, day: str, files: list[Path]) -> None:
        """Queue an item's files (record last) for copying under `day/`; never waits."""
        if self._stop.is_set():  # offered after close (a writer finishing late): counted as lost
            metrics.EVIDENCE_REMOTE.labels("lost_at_shutdown").inc()
            return
        try:
            self._queue.put_nowait((day, files))
        except queue.Full:
            metrics.EVIDENCE_REMOTE.labels("dropped_queue_full").inc()
            self._log_failure(f"the copy queue is full ({self._queue.maxsize} items waiting: the bucket is "
                              "slower than the line, or unreachable)")

    def close(self, timeout: float = 5.0) -> None:
        """Copy what is queued (within `timeout` seconds), then stop the thread; what is still
        queued then is not copied (counted `lost_at_shutdown`, logged)."""
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()  # a copier still busy stops after its copy, whatever is left in the queue
        self._thread = None
        lost = 0
        with contextlib.suppress(queue.Empty):
            while True:
                lost += self._queue.get_nowait() is not None
        if lost:
            metrics.EVIDENCE_REMOTE.labels("lost_at_shutdown").inc(lost)
            log.warning("evidence: %d item(s) not copied to %s at shutdown (they stay in the local folder "
                        "while its bounds keep them)", lost, self.uri)

    def _probe(self) -> None:
        """Say at start, loudly, when the bucket cannot be listed (a wrong name or keys): every
        copy would fail."""
        try:
            self.repo().list_artifacts()
        except Exception as exc:
            log.error("evidence bucket %s cannot be listed (%s): copies to it will fail until it can "
                      "(ANOMALY_EVIDENCE_REMOTE_URI, MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID)", self.uri,
                      first_line(exc, 300))

    def _loop(self) -> None:
        self._probe()
        while not self._stop.is_set():
            try:
                job = self._queue.get(timeout=1.0)
            except queue.Empty:
                job = ()  # type: ignore[assignment]
            if job is None or self._stop.is_set():
                return
            if job:
                self._copy(*job)
            if self.prune and self.max_age_s and time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
                self._pruned_at = time.monotonic()
                self._prune()

    def _copy(self, day: str, files: list[Path]) -> None:
        if not all(p.exists() for p in files):
            metrics.EVIDENCE_REMOTE.labels("missed_evicted").inc()
            return
        for attempt, pause in enumerate((0.0, *RETRIES)):
            time.sleep(pause)
            try:
                repo = self.repo()
                for path in files:
                    repo.log_artifact(str(path), day)
            except FileNotFoundError:  # evicted locally meanwhile
                metrics.EVIDENCE_REMOTE.labels("missed_evicted").inc()
                return
            except Exception as exc:  # an outage, a refusal: retried, then dropped
                if attempt == len(RETRIES):
                    metrics.EVIDENCE_REMOTE.labels("failed").inc()
                    self._log_failure(f"{files[-1].name} not copied after {attempt + 1} tries: {exc}")
                continue
            metrics.EVIDENCE_REMOTE.labels("copied").inc()
            return

    def _prune(self) -> None:
        """Delete the day folders older than the age bound."""
        oldest = (datetime.now(timezone.utc) - timedelta(seconds=self.max_age_s)).strftime("%Y-%m-%d")
        try:
            days = [f.path.rstrip("/").rsplit("/", 1)[-1] for f in self.repo().list_artifacts() if f.is_dir]
            for day in sorted(d for d in days if _is_day(d) and d < oldest):
                self.repo().delete_artifacts(f"{day}/" if self.uri.startswith("s3:") else day)  # not day.bak
                metrics.EVIDENCE_REMOTE.labels("pruned_days").inc()
                log.info("evidence: deleted %s/%s (older than %.0f days)", self.uri, day,
                         self.max_age_s / 86400)
        except Exception as exc:  # retried at the next hour
            self._log_failure(f"old day folders could not be deleted: {exc}")

    def _log_failure(self, why: str) -> None:
        if time.monotonic() - self._last_error_log >= ERROR_LOG_S:
            self._last_error_log = time.monotonic()
            log.warning("evidence copy to %s: %s (further failures within %.0f s are counted in "
                        "anomaly_evidence_remote_total, not logged)", self.uri, why, ERROR_LOG_S)

    # -- reading back --------------------------------------------------------------------
    def fetch(self, days: list[str], stem: str, into: Path, max_bytes: int) -> tuple[dict, Path] | None:
        """Download the item `stem` (`<request key>-<record id>`) from the first of `days` that
        holds it into `into`: its record and the folder its files are in, or None.

        Raises:
            OSError: the bucket cannot be read now (an outage, a refusal), or what it holds is
                not an item of this store (a file over `max_bytes`, a record without files).
            ValueError: the record is not JSON.
        """
        for day in days:
            folder = into / day
            folder.mkdir(parents=True, exist_ok=True)
            try:
                record_path = Path(self.repo().download_artifacts(f"{day}/{stem}.json", str(folder)))
            except Exception as exc:
                if _missing(exc):
                    continue
                raise OSError(f"evidence bucket {self.uri} cannot be read: {exc}") from exc
            if record_path.is_dir() or record_path.stat().st_size > MAX_RECORD_BYTES:
                raise OSError(f"evidence record {day}/{stem}.json is not a record")
            record = json.loads(record_path.read_text())
            files = record.get("files") if isinstance(record, dict) else None
            if not isinstance(files, list) or not all(isinstance(n, str) for n in files):
                raise OSError(f"evidence record {day}/{stem}.json lists no files")
            for name in files:
                if Path(name).name != name or not name.startswith(stem):  # only the item's own files
                    raise OSError(f"evidence record {day}/{stem}.json names a foreign file {name!r}")
                try:
                    path = Path(self.repo().download_artifacts(f"{day}/{name}", str(folder)))
                except Exception as exc:
                    raise OSError(f"evidence bucket {self.uri}: {day}/{name} cannot be read: {exc}") from exc
                if path.is_dir() or path.stat().st_size > max_bytes:
                    raise OSError(f"evidence bucket {self.uri}: {day}/{name} is not a file of at most "
                                  f"{max_bytes} bytes")
            return record, record_path.parent
        return None


def _is_day(name: str) -> bool:
    try:
        datetime.strptime(name, "%Y-%m-%d")
    except ValueError:
        return False
    return len(name) == 10


def _missing(exc: Exception) -> bool:
    """Whether a download failed because the object does not exist (not an outage)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, FileNotFoundError):
        return True
    if isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
        return True
    response = getattr(exc, "response", None)  # botocore's ClientError
    code = str((response or {}).get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""
    return code in ("404", "NoSuchKey", "NotFound")


def scratch() -> tempfile.TemporaryDirectory:
    """A temporary folder for items fetched from the bucket."""
    return tempfile.TemporaryDirectory(prefix="evidence-fetch-")

"""MES hot-folder client: score every image dropped into a folder, never lose one.

For each image that appears in `inbox` (and has stopped changing: size and mtime stable for
`settle_s`, so a file still being written is left alone; `*.part`, `*.tmp` and dot-files are
ignored), the client

1. scores it with a request id derived from its name and content (the same id on every
   retry, so the server's records de-duplicate),
2. writes the result JSON beside it (`<image>.json`, atomically: temp file + rename),
3. moves the image, then its JSON, into `<out>/OK`, `<out>/NG` or `<out>/error`.

Delivery is at least once and idempotent: when the server is unreachable, busy or shutting
down (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, CANCELLED, ABORTED) the image
stays in the inbox and is retried on a later pass. Restarting the client at any point loses
nothing and moves nothing twice: an image whose JSON already exists is moved without being
scored again, and a JSON whose image was already moved follows it. Requests the server
refuses for good (a corrupt image, an unknown category) go to `error/` with the reason in
their JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from clients.sdk import IMAGE_SUFFIXES, AnomalyClient, AnomalyError, ScoreResult

log = logging.getLogger(__name__)
# The server is down, busy, shutting down (a call caught by its shutdown is CANCELLED) or slow.
TRANSIENT = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED"}
OUTCOMES = ("OK", "NG", "error")


@dataclass
class Summary:
    """What a run did."""

    ok: int = 0
    ng: int = 0
    error: int = 0
    retries: int = 0  # transient failures that left an image for a later pass
    pending: int = 0  # images still in the inbox at the end

    @property
    def done(self) -> int:  # noqa: D102
        return self.ok + self.ng + self.error


@dataclass
class HotFolder:
    """Watches `inbox`; results go to `out` (default: the inbox itself) / OK, NG, error."""

    client: AnomalyClient
    inbox: Path
    out: Path | None = None
    category: str = ""  # "" = global threshold
    station: str = ""
    settle_s: float = 0.5
    _seen: dict[Path, tuple[int, int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inbox = Path(self.inbox)
        self.out = Path(self.out) if self.out else self.inbox
        for name in OUTCOMES:
            (self.out / name).mkdir(parents=True, exist_ok=True)

    # -- discovery ----------------------------------------------------------------------------
    def images(self) -> list[Path]:
        """Image files in the inbox, oldest first (not the outcome folders, not partial files)."""
        files = [p for p in self.inbox.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                 and not p.name.startswith(".")]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def settled(self, path: Path, now: float | None = None) -> bool:
        """True once size and mtime have not changed for `settle_s` (the writer is done)."""
        now = time.monotonic() if now is None else now
        st = path.stat()
        sig = (st.st_size, st.st_mtime_ns)
        seen = self._seen.get(path)
        if seen is None or seen[:2] != sig:
            self._seen[path] = (*sig, now)
            return self.settle_s <= 0 and st.st_size > 0
        return st.st_size > 0 and now - seen[2] >= self.settle_s

    @staticmethod
    def request_id(path: Path, data: bytes) -> str:
        """Deterministic id: the file's stem and a hash of its bytes."""
        return f"{path.stem[:80]}-{hashlib.sha256(data).hexdigest()[:16]}"

    # -- one image ----------------------------------------------------------------------------
    @staticmethod
    def result_path(image: Path) -> Path:  # noqa: D102
        return image.with_name(image.name + ".json")

    @staticmethod
    def _write_json(path: Path, payload: dict) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        os.replace(tmp, path)

    def _destination(self, image: Path, outcome: str) -> Path:
        assert self.out is not None
        dest = self.out / outcome / image.name
        if dest.exists():  # another part with the same file name earlier: keep both
            rid = json.loads(self.result_path(image).read_text()).get("request_id", "")
            dest = dest.with_name(f"{image.stem}-{rid[-8:] or int(time.time())}{image.suffix}")
        return dest

    def _move(self, image: Path, outcome: str) -> None:
        dest = self._destination(image, outcome)
        os.replace(image, dest)  # the image first: it is the unit of work
        os.replace(self.result_path(image), self.result_path(dest))

    def process(self, image: Path) -> str | None:
        """Score (unless already scored), record and move one image.

        Returns:
            "OK" | "NG" | "error", or None when it must be retried later.
        """
        result = self.result_path(image)
        if result.exists():  # scored by an earlier run that stopped before moving it
            outcome = json.loads(result.read_text())["outcome"]
        else:
            data = image.read_bytes()
            rid = self.request_id(image, data)
            try:
                r = self.client.score(data, request_id=rid, category=self.category, station=self.station)
            except AnomalyError as exc:
                if exc.code in TRANSIENT:
                    log.warning("%s: %s, will retry", image.name, exc)
                    return None
                outcome = "error"
                self._write_json(result, {"outcome": outcome, "request_id": rid, "image": image.name,
                                          "code": exc.code, "message": exc.message,
                                          "at": datetime.now(UTC).isoformat()})
            else:
                outcome = "NG" if r.is_anomalous else "OK"
                self._write_json(result, self._payload(image, r, outcome))
        self._move(image, outcome)
        return outcome

    @staticmethod
    def _payload(image: Path, r: ScoreResult, outcome: str) -> dict:
        return {"outcome": outcome, "request_id": r.request_id, "image": image.name, "score": r.score,
                "normalized_score": r.normalized_score, "threshold": r.threshold, "category": r.category,
                "model": {"name": r.model.name, "version": r.model.version, "alias": r.model.alias,
                          "architecture": r.model.architecture, "variant": r.model.variant},
                "at": datetime.now(UTC).isoformat()}

    def adopt_orphans(self) -> int:
        """Move result JSONs whose image an earlier run already moved (it stopped in between)."""
        assert self.out is not None
        moved = 0
        for result in self.inbox.glob("*.json"):
            image_name = result.name[: -len(".json")]
            if (self.inbox / image_name).exists():
                continue
            for outcome in OUTCOMES:
                if (self.out / outcome / image_name).exists():
                    os.replace(result, self.out / outcome / result.name)
                    moved += 1
                    break
        return moved

    # -- the loop ----------------------------------------------------------------------------
    def run_once(self, summary: Summary, on_done: Callable[[Path, str], None] = lambda p, o: None) -> bool:
        """One pass over the inbox; returns whether a transient failure was met."""
        self.adopt_orphans()
        transient = False
        for image in self.images():
            if not image.exists() or not self.settled(image):
                continue
            outcome = self.process(image)
            if outcome is None:
                summary.retries += 1
                transient = True
                break  # the server is down: wait before the next image
            self._seen.pop(image, None)
            setattr(summary, outcome.lower(), getattr(summary, outcome.lower()) + 1)
            on_done(image, outcome)
        return transient

    def run(self, *, seconds: float | None = None, until_empty: bool = False, poll_s: float = 0.5,
            max_backoff_s: float = 10.0, on_done: Callable[[Path, str], None] = lambda p, o: None,
            stop: Callable[[], bool] = lambda: False) -> Summary:
        """Watch until `seconds` pass, `stop()` says so, or (with `until_empty`) the inbox is
        empty; back off while the server is unreachable."""
        summary = Summary()
        end = None if seconds is None else time.monotonic() + seconds
        delay = poll_s
        while not stop() and (end is None or time.monotonic() < end):
            transient = self.run_once(summary, on_done)
            if until_empty and not transient and not self.images():
                break
            delay = min(max(delay, poll_s) * 2, max_backoff_s) if transient else poll_s
            time.sleep(delay if end is None else max(0.0, min(delay, end - time.monotonic())))
        summary.pending = len(self.images())
        return summary

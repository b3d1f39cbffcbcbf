"""MES hot-folder client: score every image dropped into a folder, never lose one, never
let one stop the others.

For each image that appears in `inbox` (and has stopped changing: size and mtime stable for
`settle_s`, so a file still being written is left alone however long it grows; and, for PNG
and JPEG, complete: its end marker is there, so a camera that pauses longer than `settle_s`
mid-write is waited for too: up to `incomplete_grace_s` after its last change when it was
seen growing, `incomplete_quiet_s` otherwise, after which it is sent anyway and the server
says what is wrong; `*.part`, `*.tmp` and dot-files are ignored), the client

1. scores it with a request id derived from its name and content (the same id on every
   retry, so the server's records de-duplicate),
2. writes the result JSON beside it (`<image>.json`: outcome, the image's SHA-256, the
   destination chosen for it, the score or the error), atomically and durably (temp file,
   fsync, rename, fsync of the folder),
3. moves the image, then its JSON, to that destination in `<out>/OK`, `<out>/NG` or
   `<out>/error`, fsyncing both folders. A name already taken there gets a unique suffix
   (a hash of the content); nothing is ever overwritten.

Failures are classified once (`anomaly.wire.classify`):

- **permanent** (not an image, too large for the server, unknown category, no valid API
  key …): the image goes to `error/` at once, its JSON says why;
- **server down** (unavailable, shutting down): the pass stops and the folder waits with
  backoff; nothing counts against any image;
- **transient** (overloaded, deadline exceeded, a model that failed on the server …): that
  image backs off on its own (exponential, per file) while the others go ahead, in arrival
  order. Each image has a budget (`max_attempts` answered failures, `max_age_s` since the
  first); an image that exhausts it goes to `error/` with the last reason.

After a crash or a power cut at any step, a restart neither loses nor double-moves a file:
a result JSON is trusted only if its SHA-256 matches the image beside it (a camera that
reused a name after a crash gets its new part scored); a JSON whose image was already
moved follows it to the destination it names; a torn or empty JSON is detected, logged and
replaced (or, without its image, set aside in `error/`), never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from anomaly.durable import fsync_dir, write_atomic
from anomaly.wire import IMAGE_SUFFIXES, PERMANENT_KIND, SERVER_DOWN_KIND
from edge_anomaly_client.sdk import AnomalyClient, AnomalyError, ScoreResult

log = logging.getLogger(__name__)
OUTCOMES = ("OK", "NG", "error")


@dataclass
class Summary:
    """What a run did."""

    ok: int = 0
    ng: int = 0
    error: int = 0
    retries: int = 0  # failed attempts that left an image for later
    pending: int = 0  # images still in the inbox at the end

    @property
    def done(self) -> int:  # noqa: D102
        return self.ok + self.ng + self.error


@dataclass
class _Attempts:
    """One image's retry state (in memory: a restart gives every image a fresh budget)."""

    failures: int = 0
    first_failure: float = 0.0
    next_try: float = 0.0
    last_error: str = ""


_END_MARKERS = {".png": b"IEND\xaeB`\x82", ".jpg": b"\xff\xd9", ".jpeg": b"\xff\xd9"}


def looks_complete(suffix: str, data: bytes) -> bool:
    """Whether a PNG / JPEG holds its end marker (IEND chunk / EOI) near its end; other
    formats cannot tell and count as complete."""
    marker = _END_MARKERS.get(suffix.lower())
    return marker is None or marker in data[-4096:]


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "_" for c in text)


@dataclass
class HotFolder:
    """Watches `inbox`; results go to `out` (default: the inbox itself) / OK, NG, error.

    Args:
        client: the SDK client to score with.
        inbox: the folder the MES drops images into.
        out: where OK/, NG/ and error/ go.
        category: product category ("" = global threshold).
        station: station / line name, recorded in the inspection log.
        settle_s: how long a file's size and mtime must stay unchanged before it is read.
        max_attempts: answered failures (not outages) after which an image goes to error/.
        max_age_s: seconds after its first answered failure after which it goes to error/.
        backoff_s, max_backoff_s: an image's wait after a transient failure, doubling.
        empty_grace_s: a file that stays empty (0 bytes) this long goes to error/ (a camera
            may create the file before it writes).
        incomplete_grace_s: a PNG / JPEG seen growing and still without its end marker is
            waited for this long after its last change, then sent anyway.
        incomplete_quiet_s: the same for one never seen growing (it may have been complete
            garbage from the start).
    """

    client: AnomalyClient
    inbox: Path
    out: Path | None = None
    category: str = ""
    station: str = ""
    settle_s: float = 0.5
    max_attempts: int = 8
    max_age_s: float = 600.0
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    empty_grace_s: float = 60.0
    incomplete_grace_s: float = 300.0
    incomplete_quiet_s: float = 10.0
    server_down: bool = False  # the last `process` found the server unreachable
    _seen: dict[Path, tuple[int, int, float]] = field(default_factory=dict)
    _attempts: dict[Path, _Attempts] = field(default_factory=dict)
    _grew: set[Path] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.inbox = Path(self.inbox)
        self.out = Path(self.out) if self.out else self.inbox
        for name in OUTCOMES:
            (self.out / name).mkdir(parents=True, exist_ok=True)

    # -- discovery ----------------------------------------------------------------------------
    def images(self) -> list[Path]:
        """Image files in the inbox, in arrival order (mtime, then name)."""
        files = []
        for p in self.inbox.iterdir():
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                try:
                    if p.is_file():
                        files.append((p.stat().st_mtime_ns, p.name, p))
                except FileNotFoundError:  # moved away meanwhile
                    continue
        return [p for _, _, p in sorted(files)]

    def settled(self, path: Path, now: float | None = None) -> bool:
        """True once size and mtime have not changed for `settle_s` (the writer is done)."""
        now = time.monotonic() if now is None else now
        st = path.stat()
        sig = (st.st_size, st.st_mtime_ns)
        seen = self._seen.get(path)
        if seen is None or seen[:2] != sig:
            if seen is not None and sig[0] > seen[0]:
                self._grew.add(path)  # a writer at work: wait for its end marker too
            self._seen[path] = (*sig, now)
            return self.settle_s <= 0 and st.st_size > 0
        return st.st_size > 0 and now - seen[2] >= self.settle_s

    @staticmethod
    def request_id(path: Path, digest: str) -> str:
        """Deterministic id: the file's stem (printable, at most 80 characters) and a hash of
        its bytes."""
        return f"{_printable(path.stem)[:80]}-{digest[:16]}"

    # -- files --------------------------------------------------------------------------------
    @staticmethod
    def result_path(image: Path) -> Path:  # noqa: D102
        return image.with_name(image.name + ".json")

    @staticmethod
    def _write_json(path: Path, payload: dict) -> None:
        """Write `payload` durably and atomically (`anomaly.durable.write_atomic`)."""
        write_atomic(path, json.dumps(payload, indent=2))

    @staticmethod
    def _read_json(path: Path) -> dict | None:
        """A result JSON, or None when it is absent, empty or torn."""
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            log.warning("%s is torn or empty (a crash while it was written); not trusted", path)
            return None
        return data if isinstance(data, dict) and data.get("outcome") in OUTCOMES else None

    def _destination(self, image: Path, outcome: str, digest: str) -> Path:
        """A free name in the outcome folder: the image's own, else suffixed by its content
        hash (and a counter): never one that holds another part or its JSON."""
        assert self.out is not None
        folder = self.out / outcome
        candidates = [folder / image.name, folder / f"{image.stem}-{digest[:12]}{image.suffix}"]
        candidates += [folder / f"{image.stem}-{digest[:12]}-{n}{image.suffix}" for n in range(1, 1000)]
        for dest in candidates:
            if not dest.exists() and not self.result_path(dest).exists():
                return dest
        raise RuntimeError(f"no free name for {image.name} in {folder}")

    def _recorded_destination(self, recorded: dict, image_name: str) -> Path | None:
        """Where a result JSON says its image went: only a file directly in OK/, NG/ or error/
        (a JSON is data from the inbox; it may not send a file anywhere else)."""
        assert self.out is not None
        dest = (self.out / (recorded.get("dest") or f"{recorded['outcome']}/{image_name}")).resolve()
        folders = {(self.out / outcome).resolve() for outcome in OUTCOMES}
        if dest.parent not in folders or dest.suffix.lower() not in IMAGE_SUFFIXES:
            log.warning("%s.json names %s as its destination, outside the outcome folders; ignored",
                        image_name, recorded.get("dest"))
            return None
        return dest

    def _move(self, image: Path, result: Path, dest: Path) -> None:
        """The image first (it is the unit of work), then its JSON; both folders fsync'd."""
        os.replace(image, dest)
        fsync_dir(dest.parent)
        fsync_dir(image.parent)
        os.replace(result, self.result_path(dest))
        fsync_dir(dest.parent)
        fsync_dir(result.parent)

    def _record_and_move(self, image: Path, payload: dict, digest: str) -> str:
        assert self.out is not None
        dest = self._destination(image, payload["outcome"], digest)
        payload.update(image=image.name, sha256=digest, dest=dest.relative_to(self.out).as_posix())
        result = self.result_path(image)
        self._write_json(result, payload)
        self._move(image, result, dest)
        return payload["outcome"]

    # -- one image ----------------------------------------------------------------------------
    def process(self, image: Path, now: float | None = None) -> str | None:
        """Score (unless already scored), record and move one image.

        Returns:
            "OK" | "NG" | "error"; None when it must be tried again later (then
            `server_down` says whether the server was unreachable).
        """
        now = time.monotonic() if now is None else now
        self.server_down = False
        data = image.read_bytes()
        st = image.stat()
        seen = self._seen.get(image)
        if seen is not None and seen[:2] != (st.st_size, st.st_mtime_ns) or len(data) != st.st_size:
            self._seen.pop(image, None)  # it changed while read: wait for it to settle again
            return None
        grace = self.incomplete_grace_s if image in self._grew else self.incomplete_quiet_s
        if not looks_complete(image.suffix, data) and time.time() - st.st_mtime < grace:
            return None  # a writer that pauses mid-file: wait for the end marker
        digest = hashlib.sha256(data).hexdigest()
        recorded = self._read_json(self.result_path(image))
        if recorded is not None and recorded.get("sha256") == digest:  # scored before a crash
            dest = self._recorded_destination(recorded, image.name)
            if dest is None or dest.exists() or self.result_path(dest).exists():
                dest = self._destination(image, recorded["outcome"], digest)
            self._move(image, self.result_path(image), dest)
            return recorded["outcome"]
        if recorded is not None:
            log.warning("%s: its result JSON is for other content (a reused file name?); scoring it again",
                        image.name)
        rid = self.request_id(image, digest)
        try:
            r = self.client.score(data, request_id=rid, category=self.category, station=self.station)
        except AnomalyError as exc:
            return self._failed(image, exc, rid, digest, now)
        self._attempts.pop(image, None)
        return self._record_and_move(image, self._payload(r, "NG" if r.is_anomalous else "OK"), digest)

    def _failed(self, image: Path, exc: AnomalyError, rid: str, digest: str, now: float) -> str | None:
        kind = exc.kind
        if kind == SERVER_DOWN_KIND:
            self.server_down = True
            log.warning("%s: %s; waiting for the server", image.name, exc)
            return None
        reason = f"{exc.code}: {exc.message}"
        if kind != PERMANENT_KIND:
            state = self._attempts.setdefault(image, _Attempts(first_failure=now))
            state.failures += 1
            state.last_error = reason
            if state.failures < self.max_attempts and now - state.first_failure < self.max_age_s:
                state.next_try = now + min(self.backoff_s * 2 ** (state.failures - 1), self.max_backoff_s)
                log.warning("%s: %s; attempt %d of %d, next in %.1fs", image.name, exc, state.failures,
                            self.max_attempts, state.next_try - now)
                return None
            reason = (f"gave up after {state.failures} attempts over {now - state.first_failure:.0f}s; "
                      f"last: {reason}")
        self._attempts.pop(image, None)
        return self._file_error(image, digest, rid, exc.code, kind, reason)

    def _file_error(self, image: Path, digest: str, rid: str, code: str, kind: str, reason: str) -> str:
        """Record why an image failed and move it to error/."""
        log.error("%s → error/: %s", image.name, reason)
        return self._record_and_move(image, {"outcome": "error", "request_id": rid, "code": code,
                                             "kind": kind, "message": reason,
                                             "at": datetime.now(timezone.utc).isoformat()}, digest)

    def _empty_for_too_long(self, image: Path, now: float) -> str | None:
        """File an image that has stayed empty for `empty_grace_s` under error/."""
        seen = self._seen.get(image)
        if seen is None or seen[0] != 0 or now - seen[2] < self.empty_grace_s:
            return None
        return self._file_error(image, hashlib.sha256(b"").hexdigest(), "", "EMPTY", PERMANENT_KIND,
                                f"empty file: 0 bytes for {now - seen[2]:.0f}s")

    @staticmethod
    def _payload(r: ScoreResult, outcome: str) -> dict:
        return {"outcome": outcome, "request_id": r.request_id, "score": r.score,
                "normalized_score": r.normalized_score, "threshold": r.threshold, "category": r.category,
                "model": {"name": r.model.name, "version": r.model.version, "alias": r.model.alias,
                          "architecture": r.model.architecture, "variant": r.model.variant},
                "at": datetime.now(timezone.utc).isoformat()}

    def adopt_orphans(self) -> int:
        """Move result JSONs whose image an earlier run already moved (it stopped in between)
        to the destination they name; set torn ones without an image aside in error/."""
        assert self.out is not None
        moved = 0
        for result in self.inbox.glob("*.json"):
            image_name = result.name[: -len(".json")]
            if Path(image_name).suffix.lower() not in IMAGE_SUFFIXES or (self.inbox / image_name).exists():
                continue
            recorded = self._read_json(result)
            if recorded is None:
                aside = self.out / "error" / f"{result.name}.torn-{int(time.time())}"
                os.replace(result, aside)
                log.error("%s is torn and its image is gone; set aside as %s", result.name, aside)
                continue
            dest = self._recorded_destination(recorded, image_name)
            if dest is not None and dest.is_file() and not self.result_path(dest).exists():
                os.replace(result, self.result_path(dest))
                fsync_dir(dest.parent)
                moved += 1
        return moved

    # -- the loop ----------------------------------------------------------------------------
    def run_once(self, summary: Summary, on_done: Callable[[Path, str], None] = lambda p, o: None) -> bool:
        """One pass over the inbox in arrival order, skipping images that are backing off;
        returns whether the server was down (the caller waits before the next pass)."""
        self.adopt_orphans()
        now = time.monotonic()
        for image in self.images():
            state = self._attempts.get(image)
            if state is not None and state.next_try > now:
                continue  # backing off: the others go ahead
            try:
                if not self.settled(image):
                    outcome = self._empty_for_too_long(image, now)
                    if outcome is None:
                        continue
                else:
                    outcome = self.process(image)
            except FileNotFoundError:  # taken away by someone else meanwhile
                self._forget(image)
                continue
            if outcome is None:
                if image in self._attempts or self.server_down:
                    summary.retries += 1
                if self.server_down:
                    return True  # every image would fail the same way: wait
                continue
            self._forget(image)
            setattr(summary, outcome.lower(), getattr(summary, outcome.lower()) + 1)
            on_done(image, outcome)
        return False

    def _forget(self, image: Path) -> None:
        """Drop what was tracked about an image that has left the inbox."""
        self._seen.pop(image, None)
        self._grew.discard(image)
        self._attempts.pop(image, None)

    def run(self, *, seconds: float | None = None, until_empty: bool = False, poll_s: float = 0.5,
            max_backoff_s: float = 10.0, on_done: Callable[[Path, str], None] = lambda p, o: None,
            stop: Callable[[], bool] = lambda: False) -> Summary:
        """Watch until `seconds` pass, `stop()` says so, or (with `until_empty`) the inbox is
        empty; back off while the server is unreachable."""
        summary = Summary()
        end = None if seconds is None else time.monotonic() + seconds
        delay = poll_s
        while not stop() and (end is None or time.monotonic() < end):
            down = self.run_once(summary, on_done)
            if until_empty and not down and not self.images():
                break
            delay = min(max(delay, poll_s) * 2, max_backoff_s) if down else poll_s
            time.sleep(delay if end is None else max(0.0, min(delay, end - time.monotonic())))
        summary.pending = len(self.images())
        return summary

"""The promotion gate's recent verdicts, as this server judged them: what the promotion view
(`GetPromotion`) shows beside the verdicts the registry keeps on each version's tags.

The registry keeps every version's last verdict (`gate.status`, `gate.reason`, `gate.against`)
for good, but not the parts that decided it: the reference sets are downloaded for a judgement
and deleted after it. So the gate keeps, in memory, its last `MAX_VERDICTS` verdicts with the
known parts that decided each one and a small thumbnail of each, drawn while the part is still
on disk. A restart forgets them (the registry's record stays); each process of `--processes`
keeps its own, and they judge the same candidates the same way.
"""

from __future__ import annotations

import io
import threading
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime, timezone

from service.promotion.rules import DecidingPart, GateResult
from service.runtime.imaging import decode_probe, probe_image

MAX_VERDICTS = 16
THUMBNAIL_SIDE = 120  # pixels on the longer side
THUMBNAIL_MAX_BYTES = 64 << 20  # a known part larger than this is listed without a picture


@dataclass(frozen=True)
class Judged:
    """One verdict of the gate, with when and on what."""

    at: datetime
    name: str
    alias: str
    version: str
    against: str
    verdict: GateResult


def thumbnail(part: DecidingPart, max_pixels: int) -> DecidingPart:
    """`part` with a small JPEG of its image (none when it cannot be read or decoded: the part is
    listed all the same)."""
    if part.path is None:
        return part
    try:
        if part.path.stat().st_size > THUMBNAIL_MAX_BYTES:
            return replace(part, path=None)
        probe = probe_image(part.path.read_bytes(), max_bytes=THUMBNAIL_MAX_BYTES, max_pixels=max_pixels)
        image = decode_probe(probe, (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=80)
        return replace(part, path=None, thumbnail_jpeg=out.getvalue())
    except Exception:  # a damaged or odd known part: its verdict already says why
        return replace(part, path=None)


class VerdictHistory:
    """The last `MAX_VERDICTS` verdicts (thread-safe: the watcher's threads write, RPCs read)."""

    def __init__(self, size: int = MAX_VERDICTS) -> None:
        self._verdicts: deque[Judged] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, name: str, alias: str, version: str, against: str, verdict: GateResult) -> None:
        """Remember a verdict (its parts' thumbnails already drawn, their paths dropped)."""
        judged = Judged(datetime.now(timezone.utc), name, alias, version, against, verdict)
        with self._lock:
            self._verdicts.append(judged)

    def recent(self) -> list[Judged]:
        """The verdicts remembered, newest first."""
        with self._lock:
            return list(reversed(self._verdicts))

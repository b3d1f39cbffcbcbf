"""The review queue: the served decisions a person should look at, read from the inspection log.

A served decision is in the queue when it is NG, when its normalised score is within
`NEAR` of the threshold (0.5), or when the shadow challenger decided it otherwise. Each comes
with the latest operator verdict on its request id (a part with one is left out unless asked
for), newest first. `GetEvidence` (`service.inspection.evidence`) then gives its image.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from service.inspection.schema import Feedback, Inspection

NEAR = 0.1  # normalised-score distance from the threshold that puts an OK part in the queue
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000


@dataclass
class ReviewFilter:
    """Which parts (every field optional)."""

    station: str = ""
    category: str = ""
    model_version: str = ""
    since: datetime | None = None
    until: datetime | None = None
    limit: int = DEFAULT_LIMIT
    include_reviewed: bool = False


@dataclass
class ReviewRow:
    """One part in the queue."""

    decision: Any  # the `inspections` row (its columns as attributes)
    reason: str  # ng | shadow_disagreement | near_threshold
    verdict: str = ""
    defect_type: str = ""
    reviewer: str = ""


def _naive_utc(t: datetime | None) -> datetime | None:
    return t.astimezone(timezone.utc).replace(tzinfo=None) if t is not None and t.tzinfo else t


def review_queue(engine: Engine, wanted: ReviewFilter) -> list[ReviewRow]:
    """The queue (see the module docstring) from the inspection database behind `engine`."""
    shadow = aliased(Inspection)
    disagreed = select(shadow.id).where(shadow.role == "shadow",
                                        shadow.served_record_id == Inspection.record_id,
                                        shadow.decision != Inspection.decision).exists()
    query = select(Inspection, disagreed.label("disagreed")).where(
        Inspection.role == "serve",
        or_(Inspection.decision == "NG", func.abs(Inspection.normalized_score - 0.5) <= NEAR, disagreed))
    for column, value in ((Inspection.station, wanted.station), (Inspection.category, wanted.category),
                          (Inspection.model_version, wanted.model_version)):
        if value:
            query = query.where(column == value)
    since, until = _naive_utc(wanted.since), _naive_utc(wanted.until)
    if since is not None:
        query = query.where(Inspection.created_at >= since)
    if until is not None:
        query = query.where(Inspection.created_at < until)
    if not wanted.include_reviewed:
        reviewed = select(Feedback.id).where(Feedback.request_id == Inspection.request_id).exists()
        query = query.where(~reviewed)
    limit = min(max(wanted.limit or DEFAULT_LIMIT, 1), MAX_LIMIT)
    query = query.order_by(Inspection.created_at.desc(), Inspection.id.desc()).limit(limit)
    with engine.connect() as conn:
        found = list(conn.execute(query))
        ids = sorted({r.request_id for r in found} - {""})
        latest: dict[str, Any] = {}
        for start in range(0, len(ids), 500):  # bounded IN lists
            given = select(Feedback).where(Feedback.request_id.in_(ids[start:start + 500]))
            latest.update({f.request_id: f for f in conn.execute(given.order_by(Feedback.created_at,
                                                                                 Feedback.id))})
    rows = []
    for r in found:
        reason = "ng" if r.decision == "NG" else "shadow_disagreement" if r.disagreed else "near_threshold"
        f = latest.get(r.request_id)
        rows.append(ReviewRow(r, reason, f.verdict if f else "", f.defect_type if f else "",
                              (f.operator or f.sender) if f else ""))
    return rows


def one_decision(engine: Engine, record_id: str) -> ReviewRow | None:
    """The served decision of `record_id` as a queue row (whatever put it there), or None."""
    query = select(Inspection).where(Inspection.record_id == record_id, Inspection.role == "serve")
    with engine.connect() as conn:
        d = conn.execute(query).first()
        if d is None:
            return None
        f = conn.execute(select(Feedback).where(Feedback.request_id == d.request_id)
                         .order_by(Feedback.created_at.desc(), Feedback.id.desc()).limit(1)).first()
    reason = "ng" if d.decision == "NG" else "near_threshold" if abs(d.normalized_score - 0.5) <= NEAR else ""
    return ReviewRow(d, reason, f.verdict if f else "", f.defect_type if f else "",
                     (f.operator or f.sender) if f else "")

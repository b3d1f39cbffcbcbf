"""The review queue: the served decisions a person should look at, read from the inspection log.

A served decision is in the queue when it is NG, when its normalised score is within
`NEAR` of the threshold (0.5), or when the shadow challenger decided it otherwise. Each comes
with the latest operator verdict on its request id (a part with one is left out unless asked
for), newest first. `GetEvidence` (`service.inspection.evidence`) then gives its image.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import aliased

from service.inspection.export import within
from service.inspection.quality import verdicts_on
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


def _row(decision: Any, reason: str, verdicts: list[Any]) -> ReviewRow:
    """A queue row: the decision, why it is there, and the latest of its verdicts (if any)."""
    f = verdicts[-1] if verdicts else None
    return ReviewRow(decision, reason, f.verdict if f else "", f.defect_type if f else "",
                     (f.operator or f.sender) if f else "")


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
    query = within(query, Inspection.created_at, wanted.since, wanted.until)
    if not wanted.include_reviewed:
        reviewed = select(Feedback.id).where(Feedback.request_id == Inspection.request_id).exists()
        query = query.where(~reviewed)
    limit = min(max(wanted.limit or DEFAULT_LIMIT, 1), MAX_LIMIT)
    query = query.order_by(Inspection.created_at.desc(), Inspection.id.desc()).limit(limit)
    with engine.connect() as conn:
        found = list(conn.execute(query))
        verdicts = verdicts_on(conn, sorted({r.request_id for r in found} - {""}))
    reasons = ("ng" if r.decision == "NG" else "shadow_disagreement" if r.disagreed else "near_threshold"
               for r in found)
    return [_row(r, reason, verdicts.get(r.request_id, [])) for r, reason in zip(found, reasons, strict=True)]


def one_decision(engine: Engine, record_id: str) -> ReviewRow | None:
    """The served decision of `record_id` as a queue row (whatever put it there), or None."""
    query = select(Inspection).where(Inspection.record_id == record_id, Inspection.role == "serve")
    with engine.connect() as conn:
        d = conn.execute(query).first()
        if d is None:
            return None
        verdicts = verdicts_on(conn, [d.request_id]).get(d.request_id, [])
    reason = "ng" if d.decision == "NG" else "near_threshold" if abs(d.normalized_score - 0.5) <= NEAR else ""
    return _row(d, reason, verdicts)

"""The review station's messages: the data plane's answers (`service.dataplane.review`,
`service.dataplane.promotion`) as `anomaly.v1` messages, for `ListReviews`, `GetEvidence`,
`GetQuality` and `GetPromotion` (`service.protocol.grpc.server`)."""

from __future__ import annotations

from datetime import datetime, timezone

from anomaly.v1 import anomaly_pb2 as pb
from service.dataplane.promotion import Judged, Promotion
from service.dataplane.review import Quality, ReviewRow
from service.errors import InvalidInput


def review_item(row: ReviewRow, has_evidence: bool) -> pb.ReviewItem:
    """A review-queue row → `ReviewItem`."""
    d = row.decision
    return pb.ReviewItem(
        record_id=d.record_id or "", request_id=d.request_id, created_at=d.created_at.isoformat() + "Z",
        station=d.station, category=d.category, model_name=d.model_name, model_version=d.model_version,
        score=d.score, normalized_score=d.normalized_score, threshold=d.threshold,
        threshold_source=d.threshold_source, decision=d.decision, reason=row.reason, verdict=row.verdict,
        defect_type=row.defect_type, reviewer=row.reviewer, has_evidence=has_evidence,
        latency_ms=d.latency_ms)


def instant(text: str, name: str) -> datetime | None:
    """An RFC 3339 time of a request ("" = none; naive = UTC)."""
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
        return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
    except (ValueError, OverflowError):  # not a time, or one UTC cannot hold (year 1 or 9999 at an offset)
        raise InvalidInput(f"{name} must be an RFC 3339 time (e.g. 2026-12-07T08:00:00Z), "
                           f"got {text[:40]!r}") from None


def period_days(days: int, default: int) -> int:
    """A review view's period in days: 0 is `default`; at most 366.

    Raises:
        InvalidInput: more than 366.
    """
    days = days or default
    if days > 366:
        raise InvalidInput(f"days must be at most 366, got {days}")
    return days


def quality_report(found: Quality) -> pb.QualityReport:
    """The quality view → `QualityReport`."""
    return pb.QualityReport(
        days=[pb.QualityDay(day=day, model_name=r.model_name, model_version=r.model_version,
                            category=r.category, decided=r.decided, reviewed=r.reviewed,
                            false_calls=r.false_calls, escapes=r.escapes) for day, r in found.days],
        proposals=[pb.ThresholdProposal(
            model_name=p.model_name, model_version=p.model_version, category=p.category, tag=p.tag,
            current=p.current, has_threshold=p.threshold is not None, threshold=p.threshold or 0.0,
            confirmed_defects=p.confirmed_defects, confirmed_good=p.confirmed_good,
            false_calls_now=p.false_calls_now, escapes_now=p.escapes_now,
            false_calls_proposed=p.false_calls_proposed, note=p.note) for p in found.proposals],
        since=found.since.isoformat(), until=found.until.isoformat())


def gate_verdict(j: Judged, origin: str) -> pb.GateVerdict:
    """One gate verdict → `GateVerdict` (`origin`: "server" or "registry")."""
    v = j.verdict
    return pb.GateVerdict(
        at=j.at.isoformat(), model_name=j.name, alias=j.alias, version=j.version, against=j.against,
        status=v.status, reason=v.reason, known_parts=v.known_parts, origin=origin,
        parts=[pb.DecidingPart(label=p.label, category=p.category, expect=p.expect, got=p.got, why=p.why,
                               thumbnail_jpeg=p.thumbnail_jpeg) for p in v.parts])


def promotion(found: Promotion) -> pb.Promotion:
    """The promotion view → `Promotion`."""
    return pb.Promotion(
        aliases=[pb.AliasServing(model_name=a.name, alias=a.alias, role=a.role, version=a.version,
                                 since=a.since, last_error=a.last_error,
                                 last_error_version=a.last_error_version) for a in found.aliases],
        verdicts=[gate_verdict(j, "server") for j in found.verdicts] +
                 [gate_verdict(j, "registry") for j in found.recorded],
        shadow=[pb.ShadowAgreement(served_version=r.served_version, shadow_version=r.shadow_version,
                                   category=r.category, pairs=r.pairs, agree=r.agree,
                                   ok_to_ng=r.ok_to_ng_ids, ng_to_ok=r.ng_to_ok_ids,
                                   ok_to_ng_count=r.ok_to_ng, ng_to_ok_count=r.ng_to_ok)
                for r in found.shadow],
        since=found.since.isoformat(), notes=found.notes)

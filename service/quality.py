"""What the inspection log says about the models: operator feedback and shadow agreement.

`quality_report` joins each answered decision with the latest operator verdict on its
request id (`Feedback`), and counts, per model version, category and station:

- **false calls**: good parts (verdict OK) the model flagged NG;
- **escapes**: confirmed defects (verdict NG) the model passed as OK.

It also proposes, per model version and category, the threshold that keeps escapes at zero
with the fewest false calls on the reviewed parts: the lowest raw score of a confirmed
defect (a part is NG when its score ≥ the threshold). Without a confirmed defect there is no
such threshold, and none is proposed. `anomaly thresholds apply` writes a proposal to the
version's `threshold.<category>` tags, which running servers follow within a poll.

`shadow_report` pairs each shadow decision (role `shadow`) with the answer it shadowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import create_engine, select

from service.inspection import Feedback, Inspection, in_range
from service.metadata import GLOBAL
from service.promotion import threshold_source


@dataclass
class QualityRow:
    """False calls and escapes of one (model version, category, station)."""

    model_name: str
    model_version: str
    category: str
    station: str
    decided: int = 0
    reviewed: int = 0
    false_calls: int = 0
    escapes: int = 0
    escape_ids: list[str] = field(default_factory=list)


@dataclass
class Proposal:
    """A threshold for one (model version, category) from the reviewed parts."""

    model_name: str
    model_version: str
    category: str
    tag: str
    current: float
    threshold: float | None
    confirmed_defects: int
    confirmed_good: int
    false_calls_now: int
    escapes_now: int
    false_calls_proposed: int
    note: str = ""


def _read(url: str, since: datetime | None, until: datetime | None, role: str,
          table: type, column: str, key: Callable[[Any], str]) -> tuple[list, dict[str, Any]]:
    """The decisions of `role` in the time range, and the rows of `table` whose `column`
    equals `key(decision)` for one of them, by that value (the newest wins)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            decisions = in_range(select(Inspection).where(Inspection.role == role), since, until)
            rows = list(conn.execute(decisions))
            values = sorted({key(r) for r in rows} - {""})
            found: dict[str, Any] = {}
            for start in range(0, len(values), 500):  # bounded IN lists
                query = select(table).where(getattr(table, column).in_(values[start:start + 500]))
                found.update({getattr(r, column): r
                              for r in conn.execute(query.order_by(table.created_at, table.id))})
            return rows, found
    finally:
        engine.dispose()


def quality_report(url: str, since: datetime | None = None,
                   until: datetime | None = None) -> tuple[list[QualityRow], list[Proposal]]:
    """False calls and escapes, and the threshold proposals (see the module docstring)."""
    rows, verdicts = _read(url, since, until, "serve", Feedback, "request_id", lambda r: r.request_id)
    latest = {}  # a part scored twice (a retry) counts once: its latest decision
    for r in rows:
        latest[(r.request_id, r.model_name, r.model_version)] = r
    table: dict[tuple[str, str, str, str], QualityRow] = {}
    reviewed: dict[tuple[str, str, str], list[tuple[object, str]]] = {}
    for r in latest.values():
        key = (r.model_name, r.model_version, r.category, r.station)
        row = table.setdefault(key, QualityRow(*key))
        row.decided += 1
        verdict = verdicts.get(r.request_id)
        if verdict is None:
            continue
        row.reviewed += 1
        if r.decision == "NG" and verdict.verdict == "OK":
            row.false_calls += 1
        elif r.decision == "OK" and verdict.verdict == "NG":
            row.escapes += 1
            row.escape_ids.append(r.request_id)
        reviewed.setdefault((r.model_name, r.model_version, r.category), []).append((r, verdict.verdict))
    proposals = [_propose(key, parts) for key, parts in sorted(reviewed.items())]
    return sorted(table.values(), key=lambda q: (q.model_name, q.model_version, q.category, q.station)), \
        proposals


def _propose(key: tuple[str, str, str], parts: list[tuple[object, str]]) -> Proposal:
    name, version, category = key
    defects = [r.score for r, v in parts if v == "NG"]
    goods = [r.score for r, v in parts if v == "OK"]
    current = max(parts, key=lambda p: (p[0].created_at, p[0].id))[0].threshold
    now_false = sum(1 for r, v in parts if v == "OK" and r.decision == "NG")
    now_escapes = sum(1 for r, v in parts if v == "NG" and r.decision == "OK")
    proposal = Proposal(name, version, category, threshold_source(category), current, None, len(defects),
                        len(goods), now_false, now_escapes, 0)
    if not defects:
        proposal.note = "no confirmed defect yet: no threshold can be shown to keep escapes at zero"
        return proposal
    proposal.threshold = min(defects)
    proposal.false_calls_proposed = sum(1 for s in goods if s >= proposal.threshold)
    if category == GLOBAL:
        proposal.note = "requests without a category"
    return proposal


@dataclass
class ShadowRow:
    """Agreement of a challenger with the served version on one category."""

    served_version: str
    shadow_version: str
    category: str
    pairs: int = 0
    agree: int = 0
    ok_to_ng: list[str] = field(default_factory=list)  # served OK, challenger NG
    ng_to_ok: list[str] = field(default_factory=list)  # served NG, challenger OK

    @property
    def agreement(self) -> float:
        """Fraction of the pairs decided the same way."""
        return self.agree / self.pairs if self.pairs else float("nan")


def shadow_report(url: str, since: datetime | None = None, until: datetime | None = None) -> list[ShadowRow]:
    """Each shadow decision beside the answer it shadowed, per versions and category."""
    shadows, served = _read(url, since, until, "shadow", Inspection, "record_id",
                            lambda r: r.served_record_id or "")
    table: dict[tuple[str, str, str], ShadowRow] = {}
    for s in shadows:
        answer = served.get(s.served_record_id or "")
        if answer is None:  # the answer's row not shipped yet, or outside the database
            continue
        key = (answer.model_version, s.model_version, s.category)
        row = table.setdefault(key, ShadowRow(*key))
        row.pairs += 1
        if s.decision == answer.decision:
            row.agree += 1
        elif answer.decision == "OK":
            row.ok_to_ng.append(s.request_id)
        else:
            row.ng_to_ok.append(s.request_id)
    return sorted(table.values(), key=lambda r: (r.served_version, r.shadow_version, r.category))


def proposals_json(proposals: list[Proposal]) -> dict:
    """The proposals as `anomaly thresholds apply` reads them."""
    return {"proposals": [asdict(p) for p in proposals]}

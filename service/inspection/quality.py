"""What the inspection log says about the models: operator feedback and shadow agreement.

`review` (and `quality_report`, its counts and proposals) joins each answered decision with
the operator verdicts on its request id (`Feedback`), and counts, per model version,
category and station:

- **false calls**: good parts (verdict OK) the model flagged NG;
- **escapes**: confirmed defects (verdict NG) the model passed as OK;
- **conflicts**: parts with both an OK and an NG verdict (two operators, a mistake, or a
  client that should not have sent one). Their truth is unknown, so they are left out of
  the counts above and of the threshold proposal, and listed with each verdict's sender
  (the API key's name) for someone to settle. A part never takes "the latest verdict"
  silently: one wrong OK on a real defect would otherwise raise the proposed threshold.

Verdicts on request ids the server never decided (no answered decision in the log) are
ignored, and counted.

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
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Engine, and_, case, create_engine, func, select
from sqlalchemy.orm import aliased

from service.inspection.export import in_range, within
from service.inspection.schema import Feedback, Inspection
from service.runtime.metadata import GLOBAL, threshold_source


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
    conflicts: int = 0  # parts with both verdicts: in neither count above


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


@dataclass
class Conflict:
    """A part with both an OK and an NG verdict: left out of the counts and the proposal."""

    request_id: str
    model_name: str
    model_version: str
    category: str
    station: str
    verdicts: list[tuple[str, str]]  # (verdict, sender), oldest first


@dataclass
class Review:
    """Everything `review` finds: the counts, the proposals, the conflicting verdicts and the
    verdicts on request ids never decided."""

    rows: list[QualityRow]
    proposals: list[Proposal]
    conflicts: list[Conflict]
    unknown: int  # verdicts (in the time range) on request ids the log holds no decision for
    unknown_ids: list[str]  # the first few of those request ids


MAX_LISTED = 20


def verdicts_on(conn: Any, request_ids: list[str]) -> dict[str, list[Any]]:
    """Every feedback row on each of `request_ids`, oldest first."""
    found: dict[str, list[Any]] = {}
    for start in range(0, len(request_ids), 500):  # bounded IN lists
        query = select(Feedback).where(Feedback.request_id.in_(request_ids[start:start + 500]))
        for f in conn.execute(query.order_by(Feedback.created_at, Feedback.id)):
            found.setdefault(f.request_id, []).append(f)
    return found


def _never_decided(conn: Any, since: datetime | None, until: datetime | None) -> tuple[int, list[str]]:
    """Feedback rows in the time range whose request id no answered decision carries."""
    decided = select(Inspection.id).where(Inspection.request_id == Feedback.request_id,
                                          Inspection.role == "serve")
    query = within(select(Feedback.request_id).where(~decided.exists()), Feedback.created_at, since, until)
    ids = list(conn.execute(query.order_by(Feedback.created_at, Feedback.id)).scalars())
    return len(ids), list(dict.fromkeys(ids))[:MAX_LISTED]


def review(url: str, since: datetime | None = None, until: datetime | None = None) -> Review:
    """False calls, escapes and conflicts, the threshold proposals, and the verdicts on
    request ids never decided (see the module docstring)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = list(conn.execute(in_range(select(Inspection).where(Inspection.role == "serve"),
                                              since, until)))
            verdicts = verdicts_on(conn, sorted({r.request_id for r in rows} - {""}))
            unknown, unknown_ids = _never_decided(conn, since, until)
    finally:
        engine.dispose()
    latest = {}  # a part scored twice (a retry) counts once: its latest decision
    for r in rows:
        latest[(r.request_id, r.model_name, r.model_version)] = r
    table: dict[tuple[str, str, str, str], QualityRow] = {}
    reviewed: dict[tuple[str, str, str], list[tuple[object, str]]] = {}
    conflicts: list[Conflict] = []
    for r in latest.values():
        key = (r.model_name, r.model_version, r.category, r.station)
        row = table.setdefault(key, QualityRow(*key))
        row.decided += 1
        given = verdicts.get(r.request_id, [])
        if not given:
            continue
        if len({f.verdict for f in given}) > 1:
            row.conflicts += 1
            conflicts.append(Conflict(r.request_id, *key, [(f.verdict, f.sender) for f in given]))
            continue
        verdict = given[0].verdict
        row.reviewed += 1
        if r.decision == "NG" and verdict == "OK":
            row.false_calls += 1
        elif r.decision == "OK" and verdict == "NG":
            row.escapes += 1
            row.escape_ids.append(r.request_id)
        reviewed.setdefault((r.model_name, r.model_version, r.category), []).append((r, verdict))
    proposals = [_propose(key, parts) for key, parts in sorted(reviewed.items())]
    ordered = sorted(table.values(), key=lambda q: (q.model_name, q.model_version, q.category, q.station))
    return Review(ordered, proposals, conflicts, unknown, unknown_ids)


def quality_report(url: str, since: datetime | None = None,
                   until: datetime | None = None) -> tuple[list[QualityRow], list[Proposal]]:
    """The counts and the threshold proposals of `review`."""
    found = review(url, since, until)
    return found.rows, found.proposals


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


@dataclass
class Agreement:
    """A challenger's agreement with the served version on one category, counted in the
    database (`shadow_agreement`)."""

    served_version: str
    shadow_version: str
    category: str
    pairs: int
    agree: int
    ok_to_ng: int  # served OK, challenger NG
    ng_to_ok: int  # served NG, challenger OK
    ok_to_ng_ids: list[str] = field(default_factory=list)  # request ids, newest first (at most `examples`)
    ng_to_ok_ids: list[str] = field(default_factory=list)


def shadow_agreement(engine: Engine, since: datetime | None, until: datetime | None = None,
                     examples: int = 20) -> list[Agreement]:
    """`shadow_report`'s counts, computed by the database (one grouped join, whatever the
    number of rows), with the newest `examples` request ids of each kind of disagreement."""
    served, shadow = aliased(Inspection), aliased(Inspection)
    differ = shadow.decision != served.decision
    counts = select(served.model_version, shadow.model_version, shadow.category, func.count(),
                    func.sum(case((differ, 0), else_=1)),
                    func.sum(case((and_(differ, served.decision == "OK"), 1), else_=0)),
                    func.sum(case((and_(differ, served.decision != "OK"), 1), else_=0))) \
        .join(served, served.record_id == shadow.served_record_id) \
        .where(shadow.role == "shadow", served.role == "serve") \
        .group_by(served.model_version, shadow.model_version, shadow.category)
    counts = within(counts, shadow.created_at, since, until)
    with engine.connect() as conn:
        found = [Agreement(str(a), str(b), c, int(n), int(agree or 0), int(up or 0), int(down or 0))
                 for a, b, c, n, agree, up, down in conn.execute(counts)]
        for row in found:
            for attr, served_said, count in (("ok_to_ng_ids", "OK", row.ok_to_ng),
                                             ("ng_to_ok_ids", "NG", row.ng_to_ok)):
                if not count:
                    continue
                ids = select(shadow.request_id).join(served, served.record_id == shadow.served_record_id) \
                    .where(shadow.role == "shadow", served.role == "serve", differ,
                           served.decision == served_said if served_said == "OK" else served.decision != "OK",
                           served.model_version == row.served_version,
                           shadow.model_version == row.shadow_version, shadow.category == row.category)
                ids = within(ids, shadow.created_at, since, until).order_by(shadow.created_at.desc()) \
                    .limit(examples)
                setattr(row, attr, [r[0] for r in conn.execute(ids)])
    return sorted(found, key=lambda r: (r.served_version, r.shadow_version, r.category))


def proposals_json(proposals: list[Proposal]) -> dict:
    """The proposals as `anomaly thresholds apply` reads them."""
    return {"proposals": [asdict(p) for p in proposals]}


@dataclass
class Quality:
    """`quality_by_day`'s answer."""

    days: list[tuple[str, QualityRow]]  # (YYYY-MM-DD, the row of one version and category that day)
    proposals: list[Proposal]
    since: datetime
    until: datetime


def quality_by_day(url: str, days: int, station: str = "") -> Quality:
    """The `review` of each of the last `days` UTC days (today included), per model version and
    category (stations summed, or only `station`), and the threshold proposals of the whole
    period (every station)."""
    until = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    since = until - timedelta(days=days)
    out: list[tuple[str, QualityRow]] = []
    for i in range(days):
        start = since + timedelta(days=i)
        merged: dict[tuple[str, str, str], QualityRow] = {}
        for row in review(url, start, start + timedelta(days=1)).rows:
            if station and row.station != station:
                continue
            key = (row.model_name, row.model_version, row.category)
            total = merged.setdefault(key, QualityRow(*key, station=station))
            for count in ("decided", "reviewed", "false_calls", "escapes", "conflicts"):
                setattr(total, count, getattr(total, count) + getattr(row, count))
        out += [(start.strftime("%Y-%m-%d"), row) for _, row in sorted(merged.items())]
    return Quality(out, review(url, since, until).proposals, since, until)

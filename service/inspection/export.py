"""Reading the inspection log back: decisions in a time range (`in_range`, which the quality
reports share) and their export as CSV (`anomaly inspections-export`)."""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Select, create_engine, select

from service.inspection.schema import COLUMNS, Inspection


def naive_utc(t: datetime | None) -> datetime | None:
    """`t` as the log stores times: UTC without a time zone (an aware `t` is converted)."""
    return t.astimezone(timezone.utc).replace(tzinfo=None) if t is not None and t.tzinfo else t


def within(query: Select, column: Any, since: datetime | None, until: datetime | None) -> Select:
    """`query` limited to rows with `since <= column < until` (either bound optional)."""
    since, until = naive_utc(since), naive_utc(until)
    if since is not None:
        query = query.where(column >= since)
    if until is not None:
        query = query.where(column < until)
    return query


def _csv_safe(value: object) -> object:
    """Neutralise text a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab, CR)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def in_range(query: Select, since: datetime | None, until: datetime | None) -> Select:
    """`query` limited to decisions with `since <= created_at < until` (UTC; aware datetimes
    are converted), oldest first."""
    return within(query, Inspection.created_at, since, until).order_by(Inspection.created_at, Inspection.id)


def export_csv(url: str, out: Path, since: datetime | None = None, until: datetime | None = None) -> int:
    """Write the decisions with `since <= created_at < until` (UTC; aware datetimes are
    converted) to `out` as CSV; returns the number of rows."""
    engine = create_engine(url)
    query = in_range(select(*(getattr(Inspection, c) for c in COLUMNS)), since, until)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with engine.connect() as conn, out.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(COLUMNS)
            for row in conn.execute(query):
                values = [_csv_safe(v) for v in row]
                values[-1] = row[-1].isoformat()
                writer.writerow(values)
                n += 1
    finally:
        engine.dispose()
    return n

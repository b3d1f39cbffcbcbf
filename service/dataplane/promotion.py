"""The promotion desk: what the promotion view asks the server (`GetPromotion`).

Three questions an engineer asks before and after moving an alias in the MLflow UI:
- **What serves?** Each watched alias (the served one, the shadow challenger, the others of
  `ANOMALY_MODELS`): the version it serves, since when, and its last refused or failed move.
- **What did the gate decide, and on which parts?** The gate's recent verdicts in this process
  (`service.promotion.history`), each with the known parts that decided it and their
  thumbnails; and the last verdict the registry keeps on each version's tags (`gate.*`), which
  outlives restarts but names no parts.
- **Does the challenger agree?** Shadow decisions beside the answers they shadowed, per
  versions and category, over the last days (`quality.shadow_report`; needs the inspection log).

Each slow part (the registry's record, shadow agreement) is read on a thread of its own, one
read at a time, and kept for `FRESH_S` seconds: page reloads and many browsers cost one read,
never the threads the inspection log and the review queue share. A caller waits at most
`DEADLINE_S` for it (under the gateway's request timeout): a registry or database that is
down or slow leaves a note in its place, and the rest of the view is still answered. The
answer is bounded: at most `REGISTRY_RECORDS` versions from the registry, each reason cut to
`REASON_CHARS`, thumbnails up to `THUMBNAIL_BUDGET` bytes (newest verdicts first), and shadow
agreement counted by the database.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

from service.dataplane.reads import OneRead
from service.errors import first_line
from service.inspection.quality import Agreement, shadow_agreement
from service.inspection.schema import engine_for
from service.promotion.history import Judged
from service.promotion.rules import GATE_AGAINST, GATE_REASON, GATE_STATUS, GateResult
from service.repository.model_repository import ModelRepository
from service.settings import Settings

log = logging.getLogger(__name__)
REGISTRY_VERSIONS = 200  # versions of a model read for their gate tags (the most recently updated)
REGISTRY_RECORDS = 20  # of those, the newest versions with a verdict, per model
REASON_CHARS = 1000  # a registry verdict's reason as sent (the gate writes up to 4000)
DEADLINE_S = 5.0  # the longest a view waits for one slow part
FRESH_S = 10.0  # how long a read of the registry or the database is reused (a page may be this stale)
THUMBNAIL_BUDGET = 512 * 1024  # bytes of known parts' thumbnails in one answer


@dataclass(frozen=True)
class AliasServing:
    """One watched alias and what it serves."""

    name: str
    alias: str
    role: str  # served | shadow | also served (ANOMALY_MODELS)
    version: str  # "" when it serves nothing yet
    since: str  # when that version started serving here (ISO 8601), "" when none
    last_error: str
    last_error_version: str


@dataclass
class Promotion:
    """`PromotionDesk.view`'s answer."""

    aliases: list[AliasServing]
    verdicts: list[Judged]  # this process's, newest first
    recorded: list[Judged]  # the registry's (from version tags; no parts), newest version first
    shadow: list[Agreement]
    since: datetime  # the start of the shadow agreement's period
    notes: list[str] = field(default_factory=list)  # what could not be read, and why


def _within_budget(verdicts: list[Judged]) -> list[Judged]:
    """The verdicts with their parts' thumbnails while they total at most `THUMBNAIL_BUDGET`
    bytes, newest first; older verdicts' parts are listed without pictures."""
    out, spent = [], 0
    for judged in verdicts:
        parts = []
        for part in judged.verdict.parts:
            spent += len(part.thumbnail_jpeg)
            parts.append(part if spent <= THUMBNAIL_BUDGET else replace(part, thumbnail_jpeg=b""))
        out.append(replace(judged, verdict=replace(judged.verdict, parts=tuple(parts))))
    return out


def _name_filter(name: str) -> str | None:
    """MLflow's filter for one registered model's versions (it has no escapes: the quote the
    name does not contain), or None when it contains both."""
    if "'" not in name:
        return f"name = '{name}'"
    return f'name = "{name}"' if '"' not in name else None


class PromotionDesk:
    """Answers the promotion view from the repository, the gate's memory, the registry and the
    inspection log."""

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self.settings, self.repository = settings, repository
        self._registry: OneRead[tuple[list[Judged], list[str]]] = OneRead("promotion-registry", FRESH_S)
        self._database: OneRead[list[Agreement]] = OneRead("promotion-database", FRESH_S)
        self._engine: Any = None

    async def view(self, days: int) -> Promotion:
        """The promotion view, with shadow agreement over the last `days` days."""
        now = datetime.now(timezone.utc)
        since = now - timedelta(days=days)
        found = Promotion(self.aliases(), _within_budget(self.repository.verdicts.recent()), [], [], since)
        recorded, shadow = await asyncio.gather(self._recorded(found.notes), self._shadow(days, found.notes))
        found.recorded, found.shadow = recorded, shadow
        return found

    def aliases(self) -> list[AliasServing]:
        """Each watched alias with the version it serves (from memory: no registry call)."""
        s, out = self.settings, []
        for name, alias in s.watched():
            role = ("served" if (name, alias) == (s.model_name, s.model_alias) else
                    "shadow" if (name, alias) == (s.model_name, s.shadow_alias) else "also served")
            current = self.repository.current(name, alias)
            error_version, error = self.repository.errors.get((name, alias)) or ("", "")
            out.append(AliasServing(name, alias, role, current.version if current else "",
                                    current.loaded_at.isoformat() if current else "", error, error_version))
        return out

    async def _recorded(self, notes: list[str]) -> list[Judged]:
        try:
            recorded, problems = await self._registry.get("registry", self._read_registry, DEADLINE_S)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin on Python 3.10
            notes.append(f"the registry did not answer within {DEADLINE_S:.0f} s: its record of the verdicts "
                         "is left out (still being read: reload in a moment)")
            return []
        notes += problems
        return recorded

    def _read_registry(self) -> tuple[list[Judged], list[str]]:
        """The last verdict on the newest versions of each watched model, as the registry keeps
        it, and what could not be read."""
        out: list[Judged] = []
        problems: list[str] = []
        for name in dict.fromkeys(n for n, _ in self.settings.watched()):
            query = _name_filter(name)
            if query is None:
                problems.append(f"the registry's verdicts on {name!r} cannot be searched (its name holds "
                                "both kinds of quote)")
                continue
            try:
                found = self.repository.client.search_model_versions(query, max_results=REGISTRY_VERSIONS)
            except Exception as exc:  # an outage: the rest of the view still answers
                log.warning("promotion view: could not read the versions of %s: %s", name, exc)
                problems.append(f"the registry's verdicts on {name} could not be read: "
                                f"{first_line(exc, 300)}")
                continue
            judged = [mv for mv in found if GATE_STATUS in (mv.tags or {}) and str(mv.version).isdigit()]
            for mv in sorted(judged, key=lambda m: int(m.version), reverse=True)[:REGISTRY_RECORDS]:
                tags = mv.tags
                at = datetime.fromtimestamp((mv.last_updated_timestamp or 0) / 1000, timezone.utc)
                reason = tags.get(GATE_REASON, "")
                reason = reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS] + " …"
                verdict = GateResult(tags[GATE_STATUS][:40], reason)
                out.append(Judged(at, name, "", str(mv.version), tags.get(GATE_AGAINST, "")[:40], verdict))
        return out, problems

    async def _shadow(self, days: int, notes: list[str]) -> list[Agreement]:
        if not self.settings.shadow_alias:
            notes.append("no shadow challenger is followed (ANOMALY_SHADOW_ALIAS)")
            return []
        if not self.settings.inspection_log:
            notes.append("shadow agreement needs the inspection log (ANOMALY_INSPECTION_LOG=true)")
            return []
        try:
            return await self._database.get(days, lambda: self._read_shadow(days), DEADLINE_S)
        except asyncio.TimeoutError:  # noqa: UP041 - not the builtin on Python 3.10
            notes.append(f"the inspection database did not count shadow agreement within {DEADLINE_S:.0f} s "
                         "(still counting, this period or another one first: reload in a moment)")
        except Exception as exc:  # the database gone: the rest of the view still answers
            log.warning("promotion view: could not read shadow agreement: %s", exc)
            notes.append("shadow agreement could not be read from the inspection database: "
                         f"{first_line(exc, 300)}")
        return []

    def _read_shadow(self, days: int) -> list[Agreement]:
        if self._engine is None:
            self._engine = engine_for(self.settings.inspection_db(), pool_pre_ping=True)
        return shadow_agreement(self._engine, datetime.now(timezone.utc) - timedelta(days=days))

    def close(self) -> None:
        """Stop the reading threads and let go of the database connections."""
        self._registry.close()
        self._database.close()
        if self._engine is not None:
            self._engine.dispose()


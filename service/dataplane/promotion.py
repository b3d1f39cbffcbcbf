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

Each part is read on its own: a registry or database that cannot be reached leaves a note in
its place, and the rest of the view is still answered.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from service.inspection.quality import ShadowRow, shadow_report
from service.promotion.history import Judged
from service.promotion.rules import GATE_AGAINST, GATE_REASON, GATE_STATUS, GateResult
from service.repository.model_repository import ModelRepository
from service.settings import Settings

log = logging.getLogger(__name__)
REGISTRY_VERSIONS = 200  # versions of a model read for their gate tags, newest first


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
    shadow: list[ShadowRow]
    since: datetime  # the start of the shadow agreement's period
    notes: list[str] = field(default_factory=list)  # what could not be read, and why


class PromotionDesk:
    """Answers the promotion view from the repository, the gate's memory, the registry and the
    inspection log."""

    def __init__(self, settings: Settings, repository: ModelRepository) -> None:
        self.settings, self.repository = settings, repository

    async def view(self, days: int) -> Promotion:
        """The promotion view, with shadow agreement over the last `days` days."""
        since = datetime.now(timezone.utc) - timedelta(days=days)
        found = Promotion(self.aliases(), self.repository.verdicts.recent(), [], [], since)
        recorded, shadow = await asyncio.gather(asyncio.to_thread(self._recorded, found.notes),
                                                asyncio.to_thread(self._shadow, since, found.notes))
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

    def _recorded(self, notes: list[str]) -> list[Judged]:
        """The last verdict on each version of the watched models, as the registry keeps it."""
        out: list[Judged] = []
        for name in dict.fromkeys(n for n, _ in self.settings.watched()):
            try:
                found = self.repository.client.search_model_versions(
                    f"name = '{name}'", max_results=REGISTRY_VERSIONS)
            except Exception as exc:  # an outage: the rest of the view still answers
                log.warning("promotion view: could not read the versions of %s: %s", name, exc)
                notes.append(f"the registry's verdicts on {name} could not be read: {str(exc)[:300]}")
                continue
            for mv in sorted(found, key=lambda m: int(m.version), reverse=True):
                tags = mv.tags or {}
                if GATE_STATUS not in tags:
                    continue
                at = datetime.fromtimestamp((mv.last_updated_timestamp or 0) / 1000, timezone.utc)
                verdict = GateResult(tags[GATE_STATUS], tags.get(GATE_REASON, ""))
                out.append(Judged(at, name, "", str(mv.version), tags.get(GATE_AGAINST, ""), verdict))
        return out

    def _shadow(self, since: datetime, notes: list[str]) -> list[ShadowRow]:
        if not self.settings.shadow_alias:
            notes.append("no shadow challenger is followed (ANOMALY_SHADOW_ALIAS)")
            return []
        if not self.settings.inspection_log:
            notes.append("shadow agreement needs the inspection log (ANOMALY_INSPECTION_LOG=true)")
            return []
        try:
            return shadow_report(self.settings.inspection_db(), since)
        except Exception as exc:  # the database gone: the rest of the view still answers
            log.warning("promotion view: could not read shadow agreement: %s", exc)
            notes.append(f"shadow agreement could not be read from the inspection database: {str(exc)[:300]}")
            return []

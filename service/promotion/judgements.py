"""The promotion gate's memory of its verdicts: a refusal is not judged again (not scored again)
until the candidate's gate-relevant tags change or `failed_retry_s` passes.

`Judgements.judge` is what alias following calls: it reads the thresholds the candidate's tags
ask for (tags that are not valid thresholds are refused without scoring anything), asks the
`Gatekeeper` unless the gate is off for the alias, and remembers a refusal.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from service.promotion.gate import Against, Candidate, Gatekeeper
from service.promotion.rules import GateResult, gate_inputs, threshold_overrides
from service.settings import Settings

if TYPE_CHECKING:  # the repository calls this package: only its type is needed here
    from service.repository.versions import LoadedModel


class Judgements:
    """Verdicts of the promotion gate on (name, candidate version, version judged against)."""

    def __init__(self, settings: Settings, gatekeeper: Gatekeeper) -> None:
        self.settings = settings
        self.gatekeeper = gatekeeper
        # (name, candidate, judged against) → (the candidate's gate-relevant tags when judged,
        # verdict, when)
        self._verdicts: dict[tuple[str, str, str], tuple[tuple, GateResult, float]] = {}

    def refused(self, name: str, version: str, against: Against, tags: dict[str, str]) -> GateResult | None:
        """The remembered refusal of this judgement, while trusted (`failed_retry_s`)."""
        memo = self._verdicts.get((name, version, against.version))
        if memo is not None and memo[0] == gate_inputs(tags) and \
                time.monotonic() - memo[2] < self.settings.failed_retry_s:
            return memo[1]
        return None

    def remember_refusal(self, name: str, version: str, against: str, tags: dict[str, str],
                         reason: str) -> None:
        """Record a refusal decided without scoring (e.g. a version tagged refused at start-up)."""
        self._verdicts[(name, version, against)] = (gate_inputs(tags), GateResult("refused", reason),
                                                    time.monotonic())

    def judge(self, alias: str, loaded: LoadedModel, tags: dict[str, str], against: Against, subject: str,
              gated: bool, allow_empty: bool = False) -> tuple[GateResult, dict[str, float]]:
        """Judge `loaded` with the thresholds its tags ask for; returns the verdict and those
        thresholds. A refusal is remembered; tags that are not valid thresholds are refused
        without scoring anything; with `gated` False it passes.

        Raises:
            NotReady: the reference sets could not be fetched (judged at a later poll).
        """
        name, version = loaded.name, loaded.version
        key = (name, version, against.version)
        try:
            overrides = threshold_overrides(tags, loaded.metadata)
        except ValueError as exc:
            overrides = {}
            verdict = self.gatekeeper.refuse(alias, name, version, against.version,
                                             f"{name} {subject} refused: invalid threshold tag: {exc}")
        else:
            if not gated:
                return GateResult("passed", "the promotion gate is off for this alias"), overrides
            candidate = Candidate(name, version, loaded.model, overrides, tags, loaded.run_id)
            verdict = self.gatekeeper.judge(alias, candidate, against, subject, allow_empty)
        if verdict.allows:
            self._verdicts.pop(key, None)
        else:
            self._verdicts[key] = (gate_inputs(tags), verdict, time.monotonic())
        return verdict, overrides

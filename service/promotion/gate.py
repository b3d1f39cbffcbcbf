"""The promotion gate at work: fetch the known parts, score them with a candidate, decide, and
write the verdict back to the registry (`service.promotion.rules` holds the rules it applies).

A judgement is one candidate version with its threshold tags, checked against one version
that served (or will keep serving) the alias: for an alias move, the version serving now;
for a threshold change, the version itself. The known parts are that version's reference
set (artifacts of its MLflow run), the candidate's own and the plant's (`reference.run_id`
on the registered model). Each part is decided in its category and, where the models have
one, without a category (the global threshold), compared with what the version judged
against decides there. Every verdict is logged (ERROR when refused, WARNING when overridden), counted
(`anomaly_promotion_gate_total`), and, with `ANOMALY_GATE_WRITE_TAGS` (the default),
written to the candidate's tags (`gate.status`, `gate.reason`, `gate.against`) and
description. An override is honoured only once recorded: the server binds it to the
judgement by writing `gate.override.for`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from service import metrics
from service.errors import NotReady, ServiceError
from service.promotion.history import VerdictHistory, thumbnail
from service.promotion.rules import (
    GATE_AGAINST,
    GATE_OVERRIDE_FOR,
    GATE_REASON,
    GATE_STATUS,
    PLANT_REFERENCE_TAG,
    REFERENCE_ARTIFACTS,
    GateResult,
    Outcome,
    ReferenceItem,
    ReferenceSetError,
    judge,
    judgement_id,
    override_of,
    reference_items,
)
from service.runtime.engine import OnnxModel
from service.runtime.metadata import GLOBAL
from service.settings import Settings

log = logging.getLogger(__name__)
GATE_SECTION = "\n\n---\n**Promotion gate**: "  # the part of a version's description the gate writes
OVERRIDE_LINE = "- OVERRIDDEN"  # one line per override in that part, kept across later verdicts


@dataclass(frozen=True)
class Candidate:
    """What is judged: a loaded version and the thresholds it would decide with."""

    name: str
    version: str
    model: OnnxModel
    overrides: dict[str, float]  # {category: threshold} from its threshold tags
    tags: dict[str, str]  # its registry tags (thresholds and the override tags among them)
    run_id: str = ""  # the run holding its own reference set


@dataclass(frozen=True)
class Against:
    """The version a candidate is judged against, and the run holding its reference set; with
    its loaded model and accepted thresholds when at hand (the baseline of decisions without
    a category; otherwise the candidate's calibrated global threshold is)."""

    version: str
    run_id: str
    model: OnnxModel | None = None
    overrides: dict[str, float] | None = None


def _reference_call(what: str, fn, *args):  # type: ignore[no-untyped-def]
    """A registry call made for the gate: something missing (a deleted run named by
    `reference.run_id`) is a broken reference set, anything else an outage.

    Raises:
        ReferenceSetError: the registry says it does not exist.
        NotReady: the registry or artifact store failed or cannot be reached (retry later).
    """
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise ReferenceSetError(f"{what}: {exc.message}") from exc
        raise NotReady(f"registry error reading {what}: {exc.message}") from exc
    except Exception as exc:  # connection errors of any HTTP/DB client, a failed download
        raise NotReady(f"could not read {what}: {exc}") from exc


class Gatekeeper:
    """Judges candidates for the watched aliases of one registry.

    Args:
        client: an `MlflowClient` of the registry.
        settings: the server's settings (limits, `gate_max_false_reject`, `gate_write_tags`).
        scratch: a folder for downloaded reference sets (emptied after each judgement).
    """

    def __init__(self, client: Any, settings: Settings, scratch: Path) -> None:
        self.client = client
        self.settings = settings
        self.scratch = Path(scratch)
        self.history = VerdictHistory()  # its recent verdicts with their deciding parts (the promotion view)

    def judge(self, alias: str, candidate: Candidate, against: Against, subject: str,
              allow_empty: bool = False) -> GateResult:
        """Judge `candidate` against the known parts of `against` (and the plant's).

        Args:
            alias: the watched alias the judgement is for (metric label).
            candidate: the version judged, with the thresholds it would decide with.
            against: the version whose reference set it is judged on.
            subject: what is judged, for the reason (e.g. "version 7", "threshold tags of
                version 7").
            allow_empty: with no known parts at all, or none that can be read, "skipped" (a
                first start: nothing to be compared with, nothing else to serve) rather than
                refused.

        Raises:
            NotReady: the reference sets cannot be downloaded now (judged at a later poll).
        """
        name, version = candidate.name, candidate.version
        what = f"{name} {subject}"
        jid = judgement_id(version, candidate.tags, against.version)
        override, unheeded = override_of(candidate.tags)
        if override is not None:
            if not self.settings.gate_write_tags:
                unheeded = ("an override must be recorded in the registry, and this server does not write "
                            "to it (ANOMALY_GATE_WRITE_TAGS=false)")
            elif override.bound_to and override.bound_to != jid:
                unheeded = (f"its gate.override was used for another judgement ({GATE_OVERRIDE_FOR}="
                            f"{override.bound_to}; this one is {jid}): set gate.override.by and "
                            "gate.override.reason again, and delete gate.override.for, to force this one")
            else:
                unheeded = "" if override.bound_to else self._bind(name, version, jid)
                if not unheeded:
                    verdict = GateResult("overridden", (
                        f"{what}: promotion gate overridden by {override.by!r}: {override.reason} "
                        f"(judgement {jid}; version {against.version} was not compared)"))
                    return self._settle(name, alias, version, against.version, verdict)
        verdict = self._judge_parts(candidate, against, what, allow_empty)
        if unheeded and not verdict.allows:
            verdict = replace(verdict, reason=f"{verdict.reason}; the override was not honoured: {unheeded}")
        return self._settle(name, alias, version, against.version, verdict)

    def refuse(self, alias: str, name: str, version: str, against: str, reason: str) -> GateResult:
        """A refusal decided without scoring (e.g. threshold tags that are not valid), logged,
        counted and written back like any verdict."""
        return self._settle(name, alias, version, against, GateResult("refused", reason))

    def _judge_parts(self, candidate: Candidate, against: Against, what: str,
                     allow_empty: bool) -> GateResult:
        self.scratch.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.scratch) as scratch:
            try:
                items = self._known_parts(candidate, against, Path(scratch))
                if not items and allow_empty:
                    return GateResult("skipped", f"{what} was not judged: neither it nor the plant has known "
                                                 "parts (a first start serves it, with nothing to compare)")
                outcomes = [self._outcome(candidate, against, item) for item in items]
            except ReferenceSetError as exc:
                if allow_empty:  # a first start: nothing served before, so nothing to keep serving
                    return GateResult("skipped", f"{what} was not judged: a reference set cannot be read: "
                                                 f"{exc}")
                return GateResult("refused", f"{what} refused by the promotion gate: a reference set cannot "
                                             f"be read: {exc}")
            own = f" and {candidate.version}'s own" if candidate.version != against.version else ""
            basis = f"the reference set of version {against.version}{own} and the plant's known parts"
            verdict = judge(outcomes, self.settings.gate_max_false_reject, what, basis)
            # drawn now: the reference sets are deleted with the scratch folder
            verdict.parts = tuple(thumbnail(p, self.settings.max_image_pixels) for p in verdict.parts)
            return verdict

    def _settle(self, name: str, alias: str, version: str, against: str, verdict: GateResult) -> GateResult:
        metrics.GATE_VERDICTS.labels(name, alias, verdict.status).inc()
        self.history.add(name, alias, version, against, verdict)
        if verdict.status == "refused":
            log.error("promotion gate: %s", verdict.reason)
        elif verdict.status == "overridden":
            metrics.GATE_OVERRIDES.labels(name, alias).inc()
            log.warning("promotion gate: %s", verdict.reason)
        else:
            log.info("promotion gate: %s", verdict.reason)
        if self.settings.gate_write_tags:
            self._write_verdict(name, version, against, verdict)
        return verdict

    def _bind(self, name: str, version: str, jid: str) -> str:
        """Record which judgement an override is used for; "" when recorded, else why not."""
        try:
            self.client.set_model_version_tag(name, version, GATE_OVERRIDE_FOR, jid)
        except Exception as exc:  # a read-only registry, an outage: an unrecorded override is not honoured
            return f"it could not be recorded in the registry ({exc})"
        return ""

    def _known_parts(self, candidate: Candidate, against: Against, scratch: Path) -> list[ReferenceItem]:
        """Download the reference sets of `against`, of the candidate and of the plant into
        `scratch`."""
        name = candidate.name
        runs = [(against.run_id, f"version {against.version}")]
        if candidate.run_id and candidate.run_id != against.run_id:
            runs.append((candidate.run_id, f"version {candidate.version}"))
        registered = _reference_call(f"registered model {name}", self.client.get_registered_model, name)
        plant = (registered.tags or {}).get(PLANT_REFERENCE_TAG, "")
        if plant:
            runs.append((plant, "plant"))
        items: list[ReferenceItem] = []
        for run_id, source in runs:
            if not run_id:
                continue
            what = f"the reference set of {source} (run {run_id})"
            if not _reference_call(what, self.client.list_artifacts, run_id, REFERENCE_ARTIFACTS):
                continue
            local = _reference_call(what, self.client.download_artifacts, run_id, REFERENCE_ARTIFACTS,
                                    str(scratch / source.replace(" ", "-")))
            items += reference_items(Path(local), source)
        return items

    def _outcome(self, candidate: Candidate, against: Against, item: ReferenceItem) -> Outcome:
        """How the candidate decides one known part, in its category and without one."""
        from service.runtime.imaging import decode_image

        s, model = self.settings, candidate.model
        try:
            image = decode_image(item.path.read_bytes(), max_bytes=s.max_image_bytes,
                                 max_pixels=s.max_image_pixels, draft=model.metadata.map_size)
            decision = model.score_image(image, item.category, overrides=candidate.overrides)
        except ServiceError as exc:
            return Outcome(item, None, exc.message)
        except Exception as exc:  # the candidate's fault (a crash in its graph): refuse it
            return Outcome(item, None, f"{type(exc).__name__}: {exc}")
        if GLOBAL not in model.metadata.image_stats:
            return Outcome(item, decision.is_anomalous)
        now = model.decide(decision.score, None, GLOBAL, overrides=candidate.overrides).is_anomalous
        return Outcome(item, decision.is_anomalous, "", now, self._reference_global(candidate, against, image,
                                                                                   decision.score))

    @staticmethod
    def _reference_global(candidate: Candidate, against: Against, image: object, score: float) -> bool | None:
        """What the version judged against decides for this part without a category (its
        accepted thresholds); without its model at hand, the candidate's calibrated global
        threshold. None when it cannot tell."""
        if against.model is None or GLOBAL not in against.model.metadata.image_stats:
            calibrated = {k: v for k, v in candidate.overrides.items() if k != GLOBAL}
            return candidate.model.decide(score, None, GLOBAL, overrides=calibrated).is_anomalous
        try:
            if against.model is not candidate.model:
                score = against.model.score_image(image, GLOBAL, overrides=against.overrides).score  # type: ignore[arg-type]
            return against.model.decide(score, None, GLOBAL, overrides=against.overrides).is_anomalous
        except Exception:  # the baseline cannot score it: no relative judgement for this part
            return None

    def _write_verdict(self, name: str, version: str, against: str, verdict: GateResult) -> None:
        """Best effort: the verdict on the version's tags and in its description."""
        try:
            self.client.set_model_version_tag(name, version, GATE_STATUS, verdict.status)
            self.client.set_model_version_tag(name, version, GATE_REASON, verdict.reason[:4000])
            self.client.set_model_version_tag(name, version, GATE_AGAINST, against)
            mv = self.client.get_model_version(name, version)
            own, _, section = (mv.description or "").partition(GATE_SECTION)
            stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            overrides = [line for line in section.splitlines() if line.startswith(OVERRIDE_LINE)]
            if verdict.status == "overridden":  # kept for good: who forced what, and why
                overrides.append(f"{OVERRIDE_LINE} ({stamp}): {verdict.reason}")
            heading = "\n\nOverrides of the gate on this version:"
            history = "\n".join([heading, *overrides]) if overrides else ""
            self.client.update_model_version(name, version, description=(
                f"{own.rstrip()}{GATE_SECTION}{verdict.status.upper()} ({stamp}): {verdict.reason}{history}"))
        except Exception as exc:  # a read-only registry, an outage: the verdict stands regardless
            log.warning("could not write the gate verdict to %s version %s: %s", name, version, exc)

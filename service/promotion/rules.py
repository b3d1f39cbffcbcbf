"""Safe promotion: live thresholds, reference sets and the promotion gate.

**Live thresholds.** A model version's tags `threshold.<category>` (and `threshold.global`
for requests without a category) override the thresholds calibrated into its
`anomaly_model.json`, with no new version and no restart: the watcher reads the tags of
every watched alias at each poll. A tag that is not a finite number, or that names a
category the model does not know, is refused as a whole (`GetModel.last_error`), and the
thresholds in use stay as they were.

**Reference sets.** Each registered version carries, as artifacts of its MLflow run under
`reference/`, a few good and defective images per category with the decision they must get
(`reference/manifest.json`), taken from its evaluation split. A plant adds its own known
parts with `anomaly reference add`; they are kept in one MLflow run per registered model,
named by the registered model's tag `reference.run_id`.

**The gate.** Before a watched alias swaps to a new version, the candidate scores the
reference set of the version serving now plus the plant's known parts, through the serving
path (decoding, pre-processing, thresholds, live overrides included). The swap is refused
when a known defect would pass (an escape), when more than `gate_max_false_reject` of the
known-good parts would be rejected, or when the candidate cannot score a known part at all
(an unknown category, a non-finite score), and when there are no known parts to check at
all. The verdict is logged, counted, shown in `GetModel`, and written back to the
candidate's tags (`gate.status`, `gate.reason`, `gate.against`) and description.

**Threshold changes are judged the same way.** A changed `threshold.*` tag on the version a
watched alias serves is checked against that version's own reference set and the plant's
parts before it applies; a non-positive or absurd threshold (far outside the score range
the version was calibrated on) is refused outright.

**Overrides name who and why.** An engineer forces a refused judgement with three tags on the
candidate: `gate.override=true`, `gate.override.by` (who) and `gate.override.reason` (why).
An override is honoured for one judgement only (the candidate, its threshold tags and the
version it is judged against): the server binds it by writing `gate.override.for` with that
judgement's fingerprint, so the same tags do not wave through a later promotion or a later
threshold change. An override the server cannot record (a read-only registry) is not
honoured.

**The gate is a property of what serves** (`service.promotion.served`): a server remembers durably
which version (and which threshold tags) each watched alias last served, and at start-up it
judges what the alias names now against that, exactly as a live move.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.runtime.metadata import (  # the tag names live with the metadata they override
    GLOBAL,
    GLOBAL_THRESHOLD_TAG,
    THRESHOLD_PREFIX,
    ModelMetadata,
    ScoreStats,
)

GATE_STATUS, GATE_REASON, GATE_AGAINST = "gate.status", "gate.reason", "gate.against"
GATE_OVERRIDE = "gate.override"
GATE_OVERRIDE_BY, GATE_OVERRIDE_REASON = "gate.override.by", "gate.override.reason"
GATE_OVERRIDE_FOR = "gate.override.for"  # written by the server: the judgement an override was used for
ABSURD_SPANS = 20.0  # a threshold further than this many calibrated score spans outside the range is absurd
PLANT_REFERENCE_TAG = "reference.run_id"  # registered-model tag: the run holding the plant's parts
REFERENCE_ARTIFACTS = "reference"  # run artifact folder of a reference set
REFERENCE_MANIFEST = "manifest.json"
EXPECTATIONS = ("OK", "NG")
MAX_REFERENCE_ITEMS = 512


class ReferenceSetError(ValueError):
    """A reference set that cannot be read (its manifest or one of its files)."""


# -- live thresholds -----------------------------------------------------------------------------


def threshold_overrides(tags: dict[str, str], metadata: ModelMetadata) -> dict[str, float]:
    """The per-category threshold overrides a version's tags ask for ({category: threshold},
    "" = global).

    Raises:
        ValueError: naming the first bad tag (not a finite number, an unknown category, or
            `threshold.global` when the model has a category called "global").
    """
    overrides: dict[str, float] = {}
    for key in sorted(tags):
        if not key.startswith(THRESHOLD_PREFIX):
            continue
        value = tags[key]
        category = key[len(THRESHOLD_PREFIX):]
        if key == GLOBAL_THRESHOLD_TAG:
            if "global" in metadata.categories:
                raise ValueError(f"tag {key} is ambiguous: the model has a category called 'global'")
            category = GLOBAL
        elif category not in metadata.categories:
            raise ValueError(f"tag {key}={value!r} names category {category!r}, which this model does not "
                             f"know (it knows {', '.join(metadata.categories)})")
        try:
            threshold = float(value)
        except ValueError:
            raise ValueError(f"tag {key}={value!r} is not a number") from None
        if not math.isfinite(threshold):
            raise ValueError(f"tag {key}={value!r} is not a finite number")
        problem = implausible(threshold, metadata.stats_for(category))
        if problem:
            raise ValueError(f"tag {key}={value!r} {problem}")
        overrides[category] = threshold
    return overrides


def implausible(threshold: float, stats: ScoreStats) -> str:
    """Why a threshold cannot be meant for scores calibrated as `stats` ("" when plausible):
    not positive where the version's scores are never negative (every part would be NG), or
    further than `ABSURD_SPANS` calibrated spans outside the calibrated score range (every
    part OK, or every part NG)."""
    if threshold <= 0 and min(stats.min, stats.threshold) >= 0:
        return (f"is not positive: this version's scores are never negative, so every part would be NG "
                f"(calibrated threshold {stats.threshold:.6g})")
    span = max(stats.max - stats.min, abs(stats.threshold), 1e-12)
    low, high = stats.min - ABSURD_SPANS * span, stats.max + ABSURD_SPANS * span
    if not low <= threshold <= high:
        return (f"is absurd: far outside the scores this version was calibrated on ({stats.min:.6g} … "
                f"{stats.max:.6g}, threshold {stats.threshold:.6g}; plausible {low:.6g} … {high:.6g})")
    return ""


def threshold_tags(tags: dict[str, str]) -> dict[str, str]:
    """The `threshold.*` tags of a version (what a threshold judgement is about)."""
    return {k: v for k, v in tags.items() if k.startswith(THRESHOLD_PREFIX)}


def judgement_id(candidate: str, tags: dict[str, str], against: str) -> str:
    """The fingerprint of one gate judgement: a candidate version with its threshold tags,
    checked against a version (`against`; itself for a threshold change, "" for none)."""
    body = json.dumps([candidate, sorted(threshold_tags(tags).items()), against])
    return hashlib.sha256(body.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Override:
    """An engineer's override of the gate, as the candidate's tags state it."""

    by: str
    reason: str
    bound_to: str  # the judgement it was used for ("" = not yet used)


def override_of(tags: dict[str, str]) -> tuple[Override | None, str]:
    """The override the tags ask for, or None with why not ("" when none is asked for).

    An override needs `gate.override=true` with a non-empty `gate.override.by` and
    `gate.override.reason`."""
    if tags.get(GATE_OVERRIDE, "").strip().lower() != "true":
        return None, ""
    by, reason = tags.get(GATE_OVERRIDE_BY, "").strip(), tags.get(GATE_OVERRIDE_REASON, "").strip()
    if not by or not reason:
        return None, (f"{GATE_OVERRIDE}=true is not honoured without {GATE_OVERRIDE_BY} (who) and "
                      f"{GATE_OVERRIDE_REASON} (why) beside it")
    return Override(by, reason, tags.get(GATE_OVERRIDE_FOR, "").strip()), ""


def gate_inputs(tags: dict[str, str]) -> tuple:
    """The tags of a candidate that can change the gate's verdict (thresholds, the override and
    the judgement it was used for)."""
    override = (GATE_OVERRIDE, GATE_OVERRIDE_BY, GATE_OVERRIDE_REASON, GATE_OVERRIDE_FOR)
    return tuple(sorted((k, v) for k, v in tags.items() if k.startswith(THRESHOLD_PREFIX) or k in override))


# -- reference sets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReferenceItem:
    """One known part: an image and the decision it must get."""

    path: Path
    category: str
    expect: str  # "OK" | "NG"
    source: str  # "version 3", "plant"

    @property
    def label(self) -> str:
        """How reasons name it: `<source>: <category>/<file name>`."""
        return f"{self.source}: {self.category or '(global)'}/{self.path.name}"


def manifest_entry(file: str, category: str, expect: str, origin: str) -> dict[str, str]:
    """One item of `reference/manifest.json` (`file` relative to `reference/`)."""
    if expect not in EXPECTATIONS:
        raise ValueError(f"expected decision {expect!r} is not one of {', '.join(EXPECTATIONS)}")
    return {"file": file, "category": category, "expect": expect, "origin": origin}


def write_manifest(folder: Path, items: list[dict[str, str]]) -> Path:
    """Write `manifest.json` into a reference-set folder."""
    path = Path(folder) / REFERENCE_MANIFEST
    path.write_text(json.dumps({"items": items}, indent=1))
    return path


def read_manifest(folder: Path) -> list[dict[str, str]]:
    """The manifest's items, checked (an absent manifest is an empty set).

    Raises:
        ReferenceSetError: the manifest cannot be parsed, an entry is malformed, or a file
            it names is missing or lies outside the folder.
    """
    path = Path(folder) / REFERENCE_MANIFEST
    if not path.is_file():
        return []
    try:
        items = json.loads(path.read_text())["items"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ReferenceSetError(f"{REFERENCE_MANIFEST} cannot be read: {exc}") from exc
    if not isinstance(items, list) or len(items) > MAX_REFERENCE_ITEMS:
        raise ReferenceSetError(f"{REFERENCE_MANIFEST}: 'items' must be a list of at most "
                                f"{MAX_REFERENCE_ITEMS} entries")
    root = Path(folder).resolve()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str)
                                                 for k in ("file", "category", "expect")):
            raise ReferenceSetError(f"{REFERENCE_MANIFEST}: entry {i} needs text fields file, category, "
                                    "expect")
        if item["expect"] not in EXPECTATIONS:
            raise ReferenceSetError(f"{REFERENCE_MANIFEST}: entry {i} expects {item['expect']!r}, not one "
                                    f"of {', '.join(EXPECTATIONS)}")
        file = (root / item["file"]).resolve()
        if not file.is_relative_to(root) or not file.is_file() or file.is_symlink():
            raise ReferenceSetError(f"{REFERENCE_MANIFEST}: entry {i} names {item['file']!r}, which is not "
                                    "a file of the reference set")
    return items


def reference_items(folder: Path, source: str) -> list[ReferenceItem]:
    """The known parts of one reference-set folder (see `read_manifest`)."""
    root = Path(folder).resolve()
    return [ReferenceItem(root / item["file"], item["category"], item["expect"], source)
            for item in read_manifest(folder)]


# -- the gate ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """How a candidate decided one known part.

    `anomalous` is its decision in the part's category (None: it could not be scored, `why`).
    `without_category` is its decision for a request that names no category (the global
    threshold, `threshold.global`), and `reference_without_category` what the version judged
    against decided there (its accepted thresholds); None where a model has no global
    threshold. Known parts carry a category, so the global threshold is judged relatively: it
    may not let pass a known defect, or reject a known good, that the reference decided right.
    """

    item: ReferenceItem
    anomalous: bool | None
    why: str = ""
    without_category: bool | None = None
    reference_without_category: bool | None = None


@dataclass(frozen=True)
class DecidingPart:
    """A known part that decided a verdict against its candidate: decided wrong, or not at all
    (the promotion view shows it, with a thumbnail the gate draws before the set is deleted)."""

    label: str  # `ReferenceItem.label`
    category: str
    expect: str  # "OK" | "NG"
    got: str  # what the candidate decided: "OK" | "NG" | "" (it could not score it)
    why: str  # escape, false reject (either "without a category"), or why it could not be scored
    path: Path | None = None  # the image, while the reference set is on disk
    thumbnail_jpeg: bytes = b""


MAX_DECIDING_PARTS = 8  # per verdict: the first ones of each kind, as the reason lists them


@dataclass
class GateResult:
    """The gate's verdict on one candidate."""

    status: str  # passed | refused | overridden | skipped (a first start with no known parts at all)
    reason: str
    known_parts: int = 0  # how many known parts were scored
    parts: tuple[DecidingPart, ...] = ()  # the known parts that decided against it (MAX_DECIDING_PARTS)

    @property
    def allows(self) -> bool:
        """Whether the swap may go ahead."""
        return self.status != "refused"


def _listed(labels: list[str]) -> str:
    return ", ".join(labels[:5]) + (" …" if len(labels) > 5 else "")


def judge(outcomes: list[Outcome], max_false_reject: float, candidate: str, against: str) -> GateResult:
    """The verdict from each known part's outcome on `candidate` (e.g. "model version 3"),
    checked `against` (what serves now)."""
    if not outcomes:
        return GateResult("refused", f"{candidate} refused by the promotion gate: {against} hold no known "
                                     "parts, so nothing shows it decides them right (add known parts with "
                                     "`anomaly reference add`, or override with the gate.override tags)")
    unscored = [(o.item, o.why) for o in outcomes if o.anomalous is None]
    escapes = [o.item.label for o in outcomes if o.item.expect == "NG" and o.anomalous is False]
    goods = [o.item for o in outcomes if o.item.expect == "OK"]
    rejects = [o.item.label for o in outcomes if o.item.expect == "OK" and o.anomalous]
    global_escapes = [o.item.label for o in outcomes if o.item.expect == "NG"
                      and o.reference_without_category is True and o.without_category is False]
    global_rejects = [o.item.label for o in outcomes if o.item.expect == "OK"
                      and o.reference_without_category is False and o.without_category is True]
    problems = []
    if unscored:
        item, why = unscored[0]
        problems.append(f"{len(unscored)} known part(s) could not be scored (first: {item.label}: {why})")
    if escapes:
        problems.append(f"{len(escapes)} known defect(s) would pass as OK: {_listed(escapes)}")
    if goods and len(rejects) / len(goods) > max_false_reject:
        problems.append(f"{len(rejects)} of {len(goods)} known-good parts would be rejected "
                        f"({len(rejects) / len(goods):.0%} > the allowed {max_false_reject:.0%}): "
                        f"{_listed(rejects)}")
    if global_escapes:
        problems.append(f"{len(global_escapes)} known defect(s) caught without a category before would pass "
                        f"as OK without one (the global threshold, {GLOBAL_THRESHOLD_TAG}): "
                        f"{_listed(global_escapes)}")
    if goods and len(global_rejects) / len(goods) > max_false_reject:
        problems.append(f"{len(global_rejects)} of {len(goods)} known-good parts accepted without a category "
                        f"before would be rejected without one ({GLOBAL_THRESHOLD_TAG}): "
                        f"{_listed(global_rejects)}")
    deciding = _deciding(outcomes)
    if problems:
        return GateResult("refused", f"{candidate} refused by the promotion gate (checked against "
                                     f"{against}): " + "; ".join(problems), len(outcomes), deciding)
    return GateResult("passed", f"{candidate} passed the promotion gate (checked against {against}): "
                                f"{len(outcomes)} known parts, no escape, {len(rejects)} of {len(goods)} "
                                "known-good parts rejected", len(outcomes), deciding)


def _deciding(outcomes: list[Outcome]) -> tuple[DecidingPart, ...]:
    """The known parts the candidate decided wrong or could not score, each once with every way
    it went wrong, worst first (what cannot be scored, escapes, then false rejects: within the
    allowance they are shown, not refused)."""
    kinds: list[tuple[str, Callable[[Outcome], bool], Callable[[Outcome], bool | None]]] = [
        ("", lambda o: o.anomalous is None, lambda o: None),
        ("escape", lambda o: o.item.expect == "NG" and o.anomalous is False, lambda o: False),
        ("escape without a category", lambda o: o.item.expect == "NG" and o.reference_without_category is True
         and o.without_category is False, lambda o: o.anomalous),
        ("false reject", lambda o: o.item.expect == "OK" and bool(o.anomalous), lambda o: True),
        ("false reject without a category", lambda o: o.item.expect == "OK" and
         o.reference_without_category is False and o.without_category is True, lambda o: o.anomalous),
    ]
    found: dict[str, tuple[Outcome, bool | None, list[str]]] = {}
    for why, wrong, got in kinds:
        for o in outcomes:
            if wrong(o):
                whys = found.setdefault(o.item.label, (o, got(o), []))[2]
                whys.append(why or o.why or "could not be scored")
    parts = [DecidingPart(o.item.label, o.item.category, o.item.expect,
                          "" if got is None else "NG" if got else "OK", "; ".join(whys), o.item.path)
             for o, got, whys in found.values()]
    return tuple(parts[:MAX_DECIDING_PARTS])

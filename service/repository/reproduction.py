"""A version serves only where it reproduces its registered scores.

An INT8 model's numbers depend on the CPU and provider that compute them (`service.runtime.hardware`):
a version built and evaluated on one machine can score differently, and decide differently,
on another. So every version carries a *reproduction record*, written when it is built
(`record`): a few reference images (its reference set) and the score and anomaly-map summary
the build host computed for each, through this same serving path, with where that was
(`service.runtime.hardware.Host`). Every server, after the isolated load and before the version first
serves, scores those images on its own hardware and provider and compares (`check`):

- relative score error: |score − recorded| ÷ max(|recorded|, the category's threshold), i.e.
  measured on the decision's scale; the map's maximum and mean are compared likewise
  (relative to their recorded values);
- decisions flipped: score ≥ threshold (the version's calibrated per-category threshold)
  here but not there, or the other way round; a part recorded within a tenth of the
  tolerance of its threshold (an F1-optimal threshold is one part's score) can flip by
  rounding alone and counts only in the error.

Beyond `ANOMALY_REPRODUCTION_TOLERANCE` (default 0.01) or `ANOMALY_REPRODUCTION_MAX_FLIPPED`
(default 0) the version does not serve on this host (`ModelLoadError` with the numbers: the
alias keeps its last good version, `GetModel.last_error`, an ERROR line,
`anomaly_reproduction_checks_total{result="refused"}`). The result is written back to the
version as `hardware.<host class>.status` (`reproduced` | `refused`) and
`hardware.<host class>.detail`, so the registry shows where each version may serve.

Files in the model artifact (MLflow flattens extra files into `extra_files/`):
`reproduction.json` and the images it names (`reproduction-NN-<category>-<OK|NG>.<ext>`).
A version without a record (built before this existed) serves with a WARNING and
`result="unrecorded"`.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.errors import InvalidInput
from service.runtime.hardware import this_host
from service.runtime.imaging import DEFAULT_MAX_BYTES
from service.runtime.metadata import GLOBAL

if TYPE_CHECKING:
    from service.runtime.engine import OnnxModel

log = logging.getLogger(__name__)

RECORD_FILE = "reproduction.json"
FORMAT = 1
MAX_ITEMS = 64
MAX_RECORD_BYTES = 1_000_000
MAX_IMAGE_BYTES = DEFAULT_MAX_BYTES  # a recorded image larger than a request's is refused unread
FLIP_BAND = 1e-3  # relative: a recorded score this close to its threshold is "on" it
MAX_TEXT = 200  # characters kept of each string the record brings (CPU name, …)
STATUS_TAG = "hardware.{}.status"
DETAIL_TAG = "hardware.{}.detail"
RECORDED_TAG = "measured.reproduction"  # how many parts the build recorded (0: none)
OVERRIDE_TAG = "hardware.override"  # comma-separated host classes the version serves on unchecked
OVERRIDE_BY_TAG = "hardware.override.by"
OVERRIDE_REASON_TAG = "hardware.override.reason"


class ReproductionError(ValueError):
    """The reproduction record is unreadable (the version's fault: it does not serve)."""


@dataclass(frozen=True)
class Measured:
    """What one image gave: its score and its anomaly map's maximum and mean."""

    score: float
    map_max: float
    map_mean: float


@dataclass(frozen=True)
class Reproduction:
    """The outcome of checking a version's record on this host."""

    status: str  # "reproduced" | "refused" | "overridden" | "unrecorded"
    host_class: str
    checked: int = 0
    flipped: int = 0
    worst: float = 0.0  # largest relative error (score or map summary)
    detail: str = ""

    @property
    def allows(self) -> bool:
        """Whether the version may serve on this host."""
        return self.status != "refused"


def measure(model: OnnxModel, data: bytes) -> Measured:
    """Score one encoded image at batch 1 through the serving path."""
    scores, maps = model.infer(model.prepare_encoded(data)[None])
    return Measured(float(scores[0]), float(np.max(maps[0])), float(np.mean(maps[0])))


def record(model: OnnxModel, parts: Sequence[tuple[Path, str, str]], folder: Path) -> list[Path]:
    """Write a version's reproduction record into `folder`: the images (`parts`: path,
    category, expected decision; at most `MAX_ITEMS`) and what `model` computes for each here.

    Returns:
        The files to ship inside the model artifact (the record first).
    """
    host = this_host()
    folder.mkdir(parents=True, exist_ok=True)
    items, files = [], []
    for i, (path, category, expect) in enumerate(spread(list(parts), MAX_ITEMS)):
        name = f"reproduction-{i:02d}-{_safe(category)}-{expect}{Path(path).suffix.lower()}"
        shutil.copyfile(path, folder / name)
        m = measure(model, (folder / name).read_bytes())
        items.append({"file": name, "category": category, "expect": expect, "score": m.score,
                      "map_max": m.map_max, "map_mean": m.map_mean})
        files.append(folder / name)
    body = {"format": FORMAT, "measured": host.tags(model.provider), "items": items}
    (folder / RECORD_FILE).write_text(json.dumps(body, indent=1))
    return [folder / RECORD_FILE, *files]


def spread(parts: list[tuple[Path, str, str]], limit: int) -> list[tuple[Path, str, str]]:
    """At most `limit` parts, taken round-robin over (category, expected decision) groups, so
    that every category keeps a good and a defective part when there are many."""
    if len(parts) <= limit:
        return parts
    groups: dict[tuple[str, str], list[tuple[Path, str, str]]] = {}
    for part in parts:
        groups.setdefault((part[1], part[2]), []).append(part)
    chosen: list[tuple[Path, str, str]] = []
    while len(chosen) < limit:
        for group in groups.values():
            if group and len(chosen) < limit:
                chosen.append(group.pop(0))
    return chosen


def _text(value: object) -> str:
    """A string from the record, printable and at most `MAX_TEXT` characters."""
    return "".join(c if c.isprintable() else "?" for c in str(value))[:MAX_TEXT]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in text)[:40] or "part"


def find_record(local_dir: Path) -> Path | None:
    """The record file in a downloaded model folder, if the version has one."""
    for relative in (RECORD_FILE, f"extra_files/{RECORD_FILE}"):
        path = local_dir / relative
        if path.is_file():
            return path
    return None


def read_record(path: Path) -> tuple[dict, list[dict]]:
    """The record's `measured` description and its items, validated.

    Raises:
        ReproductionError: unreadable JSON, a wrong format, an item naming a file outside the
            record's folder or missing, a non-finite recorded value.
    """
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ReproductionError(f"{RECORD_FILE} is larger than {MAX_RECORD_BYTES} bytes")
    try:
        body = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ReproductionError(f"{RECORD_FILE} is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("items"), list):
        raise ReproductionError(f"{RECORD_FILE} is not a format-{FORMAT} reproduction record")
    folder = path.parent.resolve()
    items, seen = [], set()
    if len(body["items"]) > MAX_ITEMS:
        raise ReproductionError(f"{RECORD_FILE} lists {len(body['items'])} images; at most {MAX_ITEMS}")
    for item in body["items"]:
        try:
            name = _text(item["file"])
            file = (folder / str(item["file"])).resolve()
            values = [float(item[k]) for k in ("score", "map_max", "map_mean")]
            category = _text(item.get("category", GLOBAL))
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
            raise ReproductionError(f"{RECORD_FILE}: an item is malformed ({_text(repr(exc))})") from exc
        if not file.is_relative_to(folder) or not file.is_file():
            raise ReproductionError(f"{RECORD_FILE} names {name!r}, which is not in the artifact")
        if file in seen:
            raise ReproductionError(f"{RECORD_FILE} names {name!r} twice")
        seen.add(file)
        if file.stat().st_size > MAX_IMAGE_BYTES:
            raise ReproductionError(f"{RECORD_FILE}: {name!r} is larger than {MAX_IMAGE_BYTES} bytes")
        if not np.isfinite(values).all():
            raise ReproductionError(f"{RECORD_FILE}: {name!r} has a non-finite recorded value")
        items.append({"path": file, "category": category, "recorded": Measured(*values)})
    raw = body.get("measured") if isinstance(body.get("measured"), dict) else {}
    measured = {_text(k): _text(v) for k, v in list(raw.items())[:20]}
    return measured, items


def measure_record(model: OnnxModel, local_dir: Path) -> int:
    """Score every recorded image once, comparing nothing: what the isolated load check
    (`service.repository.isolation`) runs, so that a record whose images hang, crash or exhaust the model
    is refused there, bounded in time and memory, before the server scores it in-process.
    Returns how many were scored.

    Raises:
        ReproductionError: the record is unusable or an image cannot be decoded.
    """
    path = find_record(local_dir)
    if path is None:
        return 0
    _, items = read_record(path)
    for item in items:
        try:
            measure(model, item["path"].read_bytes())
        except InvalidInput as exc:
            raise ReproductionError(f"{item['path'].name} cannot be decoded: {exc.message}") from exc
    return len(items)


def check(model: OnnxModel, local_dir: Path, tolerance: float, max_flipped: int,
          tags: dict[str, str] | None = None) -> Reproduction:
    """Score the version's recorded images here and compare (see the module docstring);
    `tags` are the version's registry tags (the record's count, the build host, overrides).
    Never raises: anything unexpected is a refusal with its reason."""
    tags = tags or {}
    host_class = this_host().host_class(model.provider)
    try:
        result = _check(model, local_dir, tolerance, max_flipped, tags, host_class)
    except Exception as exc:  # a record crafted to break the check: refused, with the reason
        result = Reproduction("refused", host_class, detail=f"the reproduction check failed: "
                                                            f"{_text(type(exc).__name__ + ': ' + str(exc))}")
    if result.status == "refused":
        overridden = override_for(tags, host_class)
        if overridden:
            return Reproduction("overridden", host_class, result.checked, result.flipped, result.worst,
                                f"{result.detail}; served anyway: {overridden}")
    return result


def override_inputs(tags: dict[str, str]) -> tuple[str, ...]:
    """The override tags' values: a version refused here is checked again when they change."""
    return tuple(tags.get(k, "") for k in (OVERRIDE_TAG, OVERRIDE_BY_TAG, OVERRIDE_REASON_TAG))


def override_for(tags: dict[str, str], host_class: str) -> str:
    """The override that lets a version serve on `host_class` despite the check ("" when
    none): `hardware.override` naming the class (comma-separated), with who and why."""
    classes = {c.strip() for c in tags.get(OVERRIDE_TAG, "").split(",")}
    by, why = _text(tags.get(OVERRIDE_BY_TAG, "")).strip(), _text(tags.get(OVERRIDE_REASON_TAG, "")).strip()
    if host_class not in classes or not by or not why:
        return ""
    return f"{OVERRIDE_TAG} for {host_class} by {by}: {why}"


def _unrecorded(tags: dict[str, str], model: OnnxModel, host_class: str) -> Reproduction:
    """A version whose artifact holds no record: built before records existed (it serves, with
    a warning), or one that should have one (refused)."""
    recorded = tags.get(RECORDED_TAG, "").strip()
    if recorded.isdigit() and int(recorded) > 0:
        return Reproduction("refused", host_class, detail=f"its tags say {recorded} part(s) were recorded "
                                                          f"when it was built, but its artifact holds no "
                                                          f"{RECORD_FILE}")
    built_on = _text(tags.get("measured.host_class", "")).strip()
    if model.metadata.precision.lower().startswith("int") and built_on and built_on != host_class:
        return Reproduction("refused", host_class,
                            detail=f"an INT8 version measured on {built_on} without a reproduction record "
                                   f"cannot be checked on {host_class}")
    return Reproduction("unrecorded", host_class,
                        detail="the version carries no reproduction record (built before records existed, "
                               "or without a reference set)")


def _check(model: OnnxModel, local_dir: Path, tolerance: float, max_flipped: int, tags: dict[str, str],
           host_class: str) -> Reproduction:
    path = find_record(local_dir)
    if path is None:
        return _unrecorded(tags, model, host_class)
    try:
        measured, items = read_record(path)
    except ReproductionError as exc:
        return Reproduction("refused", host_class, detail=f"its reproduction record is unusable: {exc}")
    if not items:
        return Reproduction("refused", host_class, detail=f"its {RECORD_FILE} lists no images")
    flipped, worst, worst_label = 0, 0.0, ""
    stats = model.metadata.image_stats
    for item in items:
        try:
            here = measure(model, item["path"].read_bytes())
        except InvalidInput as exc:
            return Reproduction("refused", host_class,
                                detail=f"{item['path'].name} cannot be decoded: {_text(exc.message)}")
        then: Measured = item["recorded"]
        threshold = (stats.get(item["category"]) or stats[GLOBAL]).threshold
        errors = {"score": abs(here.score - then.score) / max(abs(then.score), abs(threshold), 1e-12),
                  "map max": abs(here.map_max - then.map_max) / max(abs(then.map_max), 1e-12),
                  "map mean": abs(here.map_mean - then.map_mean) / max(abs(then.map_mean), 1e-12)}
        errors = {k: (v if np.isfinite(v) else float("inf")) for k, v in errors.items()}
        what, error = max(errors.items(), key=lambda kv: kv[1])
        if error > worst or not worst_label:
            worst, worst_label = error, f"{what} of {item['path'].name}"
        # A recorded score on the threshold (an F1-optimal threshold *is* one part's score)
        # goes either way by rounding: such parts count in the error, not as flips.
        on_threshold = abs(then.score - threshold) <= FLIP_BAND * max(abs(then.score), abs(threshold))
        if (here.score >= threshold) != (then.score >= threshold) and not on_threshold:
            flipped += 1
    ok = flipped <= max_flipped and worst <= tolerance
    where = measured.get("measured.host_class", "an unrecorded host")
    cpu, ort = measured.get("measured.cpu", "unknown CPU"), measured.get("measured.ort", "?")
    summary = (f"{flipped} of {len(items)} recorded decision(s) flipped (at most {max_flipped}), worst "
               f"relative error {worst:.3g} ({worst_label}; tolerance {tolerance:g}); scored on {host_class} "
               f"({this_host().describe(model.provider)}) against the record from {where} ({cpu}, "
               f"ONNX Runtime {ort})")
    return Reproduction("reproduced" if ok else "refused", host_class, len(items), flipped, worst, summary)

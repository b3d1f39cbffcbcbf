"""What a plant writes to the registry by hand: its own known parts and threshold tags.

- `add_known_parts`: images of parts whose right decision the plant knows (a defect that
  must never pass, a good part that must not be rejected), kept in one MLflow run per
  registered model (its tag `reference.run_id` names the run) as a reference set in the
  format of `service.promotion.rules`. The promotion gate scores them with every candidate, so a
  bad set would refuse every later promotion: an add is checked as a whole before anything
  is written (the category is one the model's versions know and a plain name; no image is
  already in the set with another category or expectation; the set stays within
  `MAX_REFERENCE_ITEMS`). `known_parts` lists the set, `remove_known_parts` takes parts out.
  Who may write the set is the registry's own access control (MLflow permissions), not the
  server's API-key roles: these functions talk to MLflow, never to a server.
- `apply_thresholds`: the quality report's proposals as `threshold.<category>` tags on a
  version; running servers follow them within a poll.

Needs only MLflow's client (the `serve` extra), no torch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from anomaly.wire import IMAGE_SUFFIXES
from registry.mlflow_registry import DEFAULT_EXPERIMENT
from service.promotion.rules import (
    MAX_REFERENCE_ITEMS,
    PLANT_REFERENCE_TAG,
    REFERENCE_ARTIFACTS,
    manifest_entry,
    read_manifest,
    write_manifest,
)
from service.runtime.imaging import decode_image

log = logging.getLogger(__name__)


CATEGORY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
CATEGORIES_TAG = "categories"  # version tag: the model's categories, comma-separated


def _plant_run_id(client, model_name: str) -> str:  # type: ignore[no-untyped-def]
    """The run holding the plant's known parts for `model_name`, or "" (none yet).

    Raises:
        MlflowException: the registered model does not exist.
    """
    registered = client.get_registered_model(model_name)
    return (registered.tags or {}).get(PLANT_REFERENCE_TAG, "")


def _plant_run(client, model_name: str, experiment: str) -> str:  # type: ignore[no-untyped-def]
    """The run holding the plant's known parts for `model_name` (created on first use)."""
    run_id = _plant_run_id(client, model_name)
    if run_id:
        return run_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"plant-reference-{model_name}",
                            tags={"anomaly.reference_for": model_name})
    client.set_terminated(run.info.run_id)
    client.set_registered_model_tag(model_name, PLANT_REFERENCE_TAG, run.info.run_id)
    return run.info.run_id


def model_categories(client, model_name: str) -> set[str]:  # type: ignore[no-untyped-def]
    """The categories the registered model's versions know (their `categories` tags).

    Raises:
        ValueError: no version of the model says which categories it knows.
    """
    quoted = model_name.replace("'", "\\'")
    categories: set[str] = set()
    for mv in client.search_model_versions(f"name='{quoted}'"):
        categories |= {c.strip() for c in (mv.tags or {}).get(CATEGORIES_TAG, "").split(",") if c.strip()}
    if not categories:
        raise ValueError(f"cannot check the category: no version of {model_name} has a "
                         f"{CATEGORIES_TAG!r} tag saying which categories it knows")
    return categories


def check_category(client, model_name: str, category: str) -> None:  # type: ignore[no-untyped-def]
    """Refuse a category that is not a plain name or that the model does not know ("" =
    global, requests without a category, is always fine).

    Raises:
        ValueError: saying which, and what the model knows.
    """
    if not category:
        return
    if not CATEGORY_NAME.fullmatch(category) or ".." in category:
        raise ValueError(f"{category!r} is not a valid category name (letters, digits, '.', '_', '-'; "
                         "no '/', '..', spaces or control characters)")
    known = model_categories(client, model_name)
    if category not in known:
        raise ValueError(f"model {model_name} does not know category {category!r} (its versions know "
                         f"{', '.join(sorted(known))}); nothing was added")


def _origin(name: str) -> str:
    """An image's file name as the manifest records where a part came from: printable
    characters only, at most 200."""
    return "".join(c for c in name if c.isprintable())[:200]


def _download(client, run_id: str, tmp: str) -> tuple[Path, list[dict[str, str]]]:  # type: ignore[no-untyped-def]
    """The reference set of `run_id` in a fresh folder under `tmp` (only the files its
    manifest names), and its items."""
    folder = Path(tmp) / REFERENCE_ARTIFACTS
    folder.mkdir()
    if run_id and client.list_artifacts(run_id, REFERENCE_ARTIFACTS):
        source = Path(client.download_artifacts(run_id, REFERENCE_ARTIFACTS, tmp + "/dl"))
        items = read_manifest(source)  # checked: files inside the set, at most MAX_REFERENCE_ITEMS
        for item in items:
            (folder / item["file"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / item["file"], folder / item["file"])
        return folder, items
    return folder, []


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_known_parts(client, model_name: str, category: str, expect: str,  # type: ignore[no-untyped-def]
                    images: list[Path], experiment: str = DEFAULT_EXPERIMENT) -> tuple[str, int]:
    """Add images with their expected decision to the plant's reference set.

    The whole add is checked before anything is written: the category (`check_category`),
    every image decoded (a file the server could not read is refused), no image already in
    the set under another category or expectation, and the set within `MAX_REFERENCE_ITEMS`.
    An image already in the set with the same category and expectation is not added twice.

    Returns:
        The run id holding the set, and how many parts it holds now.

    Raises:
        ValueError: any of the above, an unsupported suffix or a bad expectation.
    """
    manifest_entry("x", category, expect, "")  # checks `expect`
    check_category(client, model_name, category)
    contents: dict[Path, bytes] = {}
    for image in images:
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{image}: not an image file this server reads ({', '.join(IMAGE_SUFFIXES)})")
        contents[image] = image.read_bytes()
        try:
            decode_image(contents[image])
        except Exception as exc:
            raise ValueError(f"{image}: cannot be decoded: {getattr(exc, 'message', exc)}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        folder, items = _download(client, _plant_run_id(client, model_name), tmp)
        have = {_digest(folder / item["file"]): item for item in items}
        fresh: list[dict[str, str]] = []
        for image, data in contents.items():
            digest = hashlib.sha256(data).hexdigest()
            there = have.get(digest)
            if there is not None:
                if (there["category"], there["expect"]) == (category, expect):
                    continue  # already in the set as asked
                raise ValueError(f"{image}: the same image is already in the reference set as "
                                 f"{there['category'] or '(global)'} {there['expect']} ({there['file']}); "
                                 "remove it first (`anomaly reference remove`) if that was wrong; nothing "
                                 "was added")
            rel = f"{category or 'global'}/{expect}/{digest[:16]}{image.suffix.lower()}"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
            entry = manifest_entry(rel, category, expect, f"plant: {_origin(image.name)}")
            fresh.append(entry)
            have[digest] = entry
        if len(items) + len(fresh) > MAX_REFERENCE_ITEMS:
            raise ValueError(f"the reference set holds {len(items)} parts and this adds {len(fresh)}: it may "
                             f"hold at most {MAX_REFERENCE_ITEMS}; remove some first (`anomaly reference "
                             "remove`); nothing was added")
        items += fresh
        run_id = _plant_run(client, model_name, experiment)
        write_manifest(folder, items)
        client.log_artifacts(run_id, str(folder), REFERENCE_ARTIFACTS)
    log.info("plant reference set of %s: %d parts (run %s)", model_name, len(items), run_id)
    return run_id, len(items)


def known_parts(client, model_name: str) -> tuple[str, list[dict[str, str]]]:  # type: ignore[no-untyped-def]
    """The plant's reference set of `model_name`: its run id ("" = none yet) and its items,
    each with the SHA-256 of its image (`sha256`)."""
    run_id = _plant_run_id(client, model_name)
    with tempfile.TemporaryDirectory() as tmp:
        folder, items = _download(client, run_id, tmp)
        return run_id, [{**item, "sha256": _digest(folder / item["file"])} for item in items]


def remove_known_parts(client, model_name: str,  # type: ignore[no-untyped-def]
                       parts: list[str]) -> tuple[str, list[dict[str, str]], int]:
    """Take parts out of the plant's reference set, each named by its stored file (as
    `known_parts` lists it, or only its file name) or by its SHA-256 (at least 8 hex digits
    of it). Every name must match exactly one part, or nothing is removed.

    Returns:
        The run id, the items removed, and how many parts the set holds now.

    Raises:
        ValueError: a name that matches no part, or more than one.
    """
    run_id, listed = known_parts(client, model_name)
    chosen: dict[str, dict[str, str]] = {}
    for name in parts:
        wanted = name.strip().lower()
        matches = [i for i in listed if name in (i["file"], i["file"].rsplit("/", 1)[-1])
                   or (len(wanted) >= 8 and i["sha256"].startswith(wanted))]
        if len(matches) != 1:
            raise ValueError(f"{name!r} names {'no' if not matches else len(matches)} part(s) of the "
                             f"reference set of {model_name}; give a stored file name or at least 8 hex "
                             "digits of a SHA-256, as `anomaly reference list` shows them; nothing was "
                             "removed")
        chosen[matches[0]["file"]] = matches[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder, items = _download(client, run_id, tmp)
        items = [i for i in items if i["file"] not in chosen]
        for file in chosen:
            (folder / file).unlink()
        write_manifest(folder, items)
        client.log_artifacts(run_id, str(folder), REFERENCE_ARTIFACTS)
    log.info("plant reference set of %s: %d part(s) removed, %d left (run %s)", model_name, len(chosen),
             len(items), run_id)
    return run_id, list(chosen.values()), len(items)


@dataclass(frozen=True)
class AppliedThreshold:
    """One threshold tag written (or, in a dry run, that would be)."""

    version: str
    tag: str
    value: str
    previous: str


def apply_thresholds(client, model_name: str, proposals: list[dict],  # type: ignore[no-untyped-def]
                     version: str = "", dry_run: bool = False) -> list[AppliedThreshold]:
    """Write each proposal's threshold as its tag on its version (or on `version`).

    Raises:
        ValueError: a proposal without a finite threshold, or for another registered model.
    """
    applied = []
    for p in proposals:
        threshold = p.get("threshold")
        if p.get("model_name", model_name) != model_name:
            raise ValueError(f"a proposal is for model {p.get('model_name')!r}, not {model_name!r}")
        if threshold is None:
            log.info("no threshold proposed for %s: %s", p.get("tag"), p.get("note", ""))
            continue
        if not isinstance(threshold, int | float) or not math.isfinite(threshold):
            raise ValueError(f"proposal for {p.get('tag')} has no finite threshold: {threshold!r}")
        target = version or str(p["model_version"])
        previous = (client.get_model_version(model_name, target).tags or {}).get(p["tag"], "")
        value = repr(float(threshold))
        if not dry_run:
            client.set_model_version_tag(model_name, target, p["tag"], value)
        applied.append(AppliedThreshold(target, p["tag"], value, previous))
    return applied

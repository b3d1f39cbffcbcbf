"""What a plant writes to the registry by hand: its own known parts and threshold tags.

- `add_known_parts`: images of parts whose right decision the plant knows (a defect that
  must never pass, a good part that must not be rejected), kept in one MLflow run per
  registered model (its tag `reference.run_id` names the run) as a reference set in the
  format of `service.promotion`. The promotion gate scores them with every candidate.
- `apply_thresholds`: the quality report's proposals as `threshold.<category>` tags on a
  version; running servers follow them within a poll.

Needs only MLflow's client (the `serve` extra), no torch.
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from anomaly.wire import IMAGE_SUFFIXES
from registry.mlflow_registry import DEFAULT_EXPERIMENT
from service.imaging import decode_image
from service.promotion import (
    PLANT_REFERENCE_TAG,
    REFERENCE_ARTIFACTS,
    manifest_entry,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)


def _plant_run(client, model_name: str, experiment: str) -> str:  # type: ignore[no-untyped-def]
    """The run holding the plant's known parts for `model_name` (created on first use)."""
    registered = client.get_registered_model(model_name)  # raises when the model does not exist
    run_id = (registered.tags or {}).get(PLANT_REFERENCE_TAG, "")
    if run_id:
        return run_id
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=f"plant-reference-{model_name}",
                            tags={"anomaly.reference_for": model_name})
    client.set_terminated(run.info.run_id)
    client.set_registered_model_tag(model_name, PLANT_REFERENCE_TAG, run.info.run_id)
    return run.info.run_id


def add_known_parts(client, model_name: str, category: str, expect: str,  # type: ignore[no-untyped-def]
                    images: list[Path], experiment: str = DEFAULT_EXPERIMENT) -> tuple[str, int]:
    """Add images with their expected decision to the plant's reference set.

    Every image is decoded first (a file the server could not read is refused before
    anything is written). An image already in the set (same bytes, category and
    expectation) is not added twice.

    Returns:
        The run id holding the set, and how many parts it holds now.

    Raises:
        ValueError: an unreadable image, an unsupported suffix, a bad expectation.
    """
    manifest_entry("x", category, expect, "")  # checks `expect`
    contents: dict[Path, bytes] = {}
    for image in images:
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{image}: not an image file this server reads ({', '.join(IMAGE_SUFFIXES)})")
        contents[image] = image.read_bytes()
        try:
            decode_image(contents[image])
        except Exception as exc:
            raise ValueError(f"{image}: cannot be decoded: {getattr(exc, 'message', exc)}") from exc
    run_id = _plant_run(client, model_name, experiment)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / REFERENCE_ARTIFACTS
        folder.mkdir()
        if client.list_artifacts(run_id, REFERENCE_ARTIFACTS):
            shutil.copytree(client.download_artifacts(run_id, REFERENCE_ARTIFACTS, tmp + "/dl"), folder,
                            dirs_exist_ok=True)
        items = read_manifest(folder)
        have = {item["file"] for item in items}
        for image, data in contents.items():
            digest = hashlib.sha256(data).hexdigest()[:16]
            rel = f"{category or 'global'}/{expect}/{digest}{image.suffix.lower()}"
            if rel in have:
                continue
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_bytes(data)
            items.append(manifest_entry(rel, category, expect, f"plant: {image.name}"))
            have.add(rel)
        write_manifest(folder, items)
        client.log_artifacts(run_id, str(folder), REFERENCE_ARTIFACTS)
    log.info("plant reference set of %s: %d parts (run %s)", model_name, len(items), run_id)
    return run_id, len(items)


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

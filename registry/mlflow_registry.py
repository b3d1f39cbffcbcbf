"""Log a built model variant to MLflow and register it as a version, like a flavor.

Conventions (DESIGN.md): one registered model per inspection task (default
`anomaly-detector`); each version is one (architecture, variant) build, tagged with
`architecture`, `variant`, `precision`, `calibration`, `input_size`, `categories`,
`threshold`, `dataset` and headline metrics; alias `<arch>-<variant>` points to the
newest build of that variant and `champion` to what production serves.

The artifact is the ONNX model logged with MLflow's `onnx` flavor (so stock
`mlflow models serve` can load it), with its signature (no input example: see
`log_and_register`), plus
`anomaly_model.json` as an extra file. The headline metrics are linked to the logged model
(MLflow 3's LoggedModel page shows them). A version is created in one registry call that
carries all its tags and its description, after everything it names (model, reference set,
torch weights) is logged: no server following an alias ever sees a version half-made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from anomaly.wire import DEFAULT_MODEL_NAME
from service.runtime.hardware import this_host
from service.runtime.metadata import GLOBAL, ModelMetadata

if TYPE_CHECKING:
    from registry.data.mvtec import Sample

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "anomaly-detection"
ARTIFACT_PATH = "model"


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered model version."""

    name: str
    version: str
    run_id: str
    aliases: tuple[str, ...]

    @property
    def uri(self) -> str:
        """`models:/<name>/<version>`."""
        return f"models:/{self.name}/{self.version}"


def embedded_tracking_uri(root: Path | str) -> str:
    """The zero-set-up store: SQLite under `root` (honours `MLFLOW_TRACKING_URI`)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def local_artifact_root(tracking_uri: str) -> Path | None:
    """For a SQLite store, `mlartifacts/` beside its database file (so store and artifacts
    stay together, as in the demo); None for any other store (its server decides)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    return Path(tracking_uri[len(prefix):]).parent / "mlartifacts"


def use_store(tracking_uri: str) -> Path | None:
    """Point MLflow at `tracking_uri`; returns the artifact root for new experiments.

    An embedded SQLite store is created here, before MLflow touches it, with its default
    artifact root `mlartifacts/` beside the database: MLflow would otherwise record
    `./mlruns` of whatever folder the command ran in for the `Default` experiment, and
    anything logged there would land outside the store. Other stores: their server decides
    (returns None)."""
    import mlflow

    root = local_artifact_root(tracking_uri)
    if root is not None:
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        root = db.parent / "mlartifacts"
        tracking_uri = f"sqlite:///{db}"
        if not db.exists():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(tracking_uri, root.as_uri())  # creates the schema and `Default`
    mlflow.set_tracking_uri(tracking_uri)
    return root


def ensure_experiment(name: str, artifact_root: Path | str | None = None) -> str:
    """Get or create an experiment; new ones store artifacts under `artifact_root`."""
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        mlflow.set_experiment(experiment_id=exp.experiment_id)
        return exp.experiment_id
    location = Path(artifact_root).resolve().as_uri() if artifact_root else None
    exp_id = mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _signature(metadata: ModelMetadata) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    h, w = metadata.input_size
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, h, w), metadata.input_name)]),
        outputs=Schema([
            TensorSpec(np.dtype(np.float32), (-1, 1, h, w), metadata.map_output),
            TensorSpec(np.dtype(np.float32), (-1,), metadata.score_output),
        ]),
    )


def version_tags(metadata: ModelMetadata, metrics: dict[str, float]) -> dict[str, str]:
    """The tags every registered version carries."""
    tags = {
        "architecture": metadata.architecture,
        "variant": metadata.variant,
        "precision": metadata.precision,
        "calibration": metadata.calibration or "none",
        "input_size": f"{metadata.input_height}x{metadata.input_width}",
        "categories": ",".join(metadata.categories),
        "threshold": f"{metadata.image_stats[GLOBAL].threshold:.6g}",
        "dataset": metadata.dataset,
        "backbone": metadata.backbone,
    }
    for key in ("image_auroc", "pixel_auroc", "latency_ms_p50", "model_mb"):
        if key in metrics:
            tags[key] = f"{metrics[key]:.4f}"
    return tags


MODEL_DESCRIPTION = (
    "Unified knowledge-distillation anomaly detectors: one model for all product categories. "
    "Each version is one build (architecture × variant: fp32, fp16, ptq-int8, qat-int8), "
    "evaluated through the serving engine and tagged with its metrics; alias `<arch>-<variant>` "
    "names each build's latest version. Servers follow `champion` (or the alias they are "
    "configured with): move it to promote a version, and every server swaps within a poll."
)
METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
                 "latency_ms_p50": "ms/image (batch 1, p50)", "images_per_s_b8": "images/s (batch 8)",
                 "model_mb": "model MB"}


def version_description(metadata: ModelMetadata, metrics: dict[str, float]) -> str:
    """What the MLflow UI shows on a version's page: what was built, how, and how it scored."""
    built = f"**{metadata.architecture} {metadata.variant}** ({metadata.precision}"
    built += f", calibrated {metadata.calibration})" if metadata.calibration else ")"
    lines = [f"{built}, backbone {metadata.backbone}, input {metadata.input_height}×"
             f"{metadata.input_width}, trained on {metadata.dataset or 'an unnamed dataset'} "
             f"({', '.join(metadata.categories)}).", "",
             "Evaluated through the serving engine (the same decoding and pre-processing as the server):", ""]
    lines += [f"- {label}: {metrics[key]:.4g}" for key, label in METRIC_LABELS.items()
              if key in metrics and np.isfinite(metrics[key])]
    lines += ["", f"Global threshold {metadata.image_stats[GLOBAL].threshold:.6g}; per-category thresholds "
              "in `anomaly_model.json` (a tag `threshold.<category>` overrides one live).",
              "", "Reference set (known parts the promotion gate checks a successor against): the run's "
              "`reference/` artifacts."]
    return "\n".join(lines)


@dataclass(frozen=True)
class KnownPart:
    """One image of a version's reference set and the decision it must get."""

    path: Path
    category: str
    expect: str  # "OK" | "NG"


def choose_reference_set(samples: Sequence[Sample], scores: np.ndarray, metadata: ModelMetadata,
                         per_class: int = 3) -> list[KnownPart]:
    """The reference set a version carries: per category, up to `per_class` good and
    `per_class` defective evaluation images (`samples`, scored `scores` in the same order)
    that the version itself decides correctly with its own per-category thresholds, spread
    evenly over each group's score range, so that the gate asks a successor for what this
    version already gets right, easy and hard."""
    chosen: list[KnownPart] = []
    for cat in sorted({s.category for s in samples}):
        threshold = metadata.image_stats[cat].threshold
        for label, expect in ((0, "OK"), (1, "NG")):
            right = sorted((i for i, s in enumerate(samples) if s.category == cat and s.label == label
                            and (scores[i] >= threshold) == bool(label)), key=lambda i: scores[i])
            picks = sorted({right[round(k * (len(right) - 1) / max(per_class - 1, 1))]
                            for k in range(min(per_class, len(right)))})
            chosen += [KnownPart(samples[i].path, cat, expect) for i in picks]
    return chosen


def reproduction_record(onnx_path: Path | str, metadata: ModelMetadata, parts: Sequence[KnownPart],
                        folder: Path) -> list[Path]:
    """Score the reference set here, through the serving path, and write the reproduction
    record servers check before this version serves (`service.repository.reproduction`); its files go
    into the model artifact (none without a reference set)."""
    if folder.exists():  # a record left by an earlier build in the same folder is not this one's
        import shutil

        shutil.rmtree(folder)
    if not parts:
        return []
    from service.repository.reproduction import record
    from service.runtime.engine import OnnxModel

    model = OnnxModel(onnx_path, metadata, providers=["CPUExecutionProvider"])
    return record(model, [(p.path, p.category, p.expect) for p in parts], folder)


def log_reference_set(parts: list[KnownPart], origin: str) -> None:
    """Log a reference set as artifacts of the active run (`reference/`, see
    `service.promotion.rules`)."""
    import shutil
    import tempfile

    import mlflow

    from service.promotion.rules import REFERENCE_ARTIFACTS, manifest_entry, write_manifest

    with tempfile.TemporaryDirectory() as tmp:
        entries = []
        for i, part in enumerate(parts):
            rel = f"{part.category}/{part.expect}/{i:03d}-{part.path.name}"
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(part.path, Path(tmp) / rel)
            entries.append(manifest_entry(rel, part.category, part.expect, origin))
        write_manifest(Path(tmp), entries)
        mlflow.log_artifacts(tmp, artifact_path=REFERENCE_ARTIFACTS)


def ensure_registered_model(client: Any, model_name: str) -> None:
    """Create the registered model `model_name` with its description, or (it exists, perhaps
    created by a concurrent build) set its description."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model_name, description=MODEL_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        client.update_registered_model(model_name, description=MODEL_DESCRIPTION)


def link_logged_model(client: Any, model_id: str, model_name: str, version: str) -> None:
    """Record on the logged model which registered version it became (the tag
    `mlflow.modelVersions` that `mlflow.register_model` writes; the UI links the two pages
    with it). A registry without the logged model (another workspace) only loses the link."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        existing = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
        links = [*(json.loads(existing) if existing else []), {"name": model_name, "version": version}]
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("logged model %s not found: version %s of %s is not linked to it", model_id,
                    version, model_name)


def log_and_register(
    onnx_path: Path | str,
    metadata: ModelMetadata,
    *,
    params: dict[str, Any],
    metrics: dict[str, float],
    history: list[dict[str, float]] | None = None,
    model_name: str = DEFAULT_MODEL_NAME,
    aliases: tuple[str, ...] = (),
    experiment: str = DEFAULT_EXPERIMENT,
    artifact_root: Path | str | None = None,
    reference: Sequence[KnownPart] = (),
    checkpoint: Path | None = None,
) -> RegisteredVersion:
    """Log one variant as an MLflow run and register it as a new version.

    Args:
        onnx_path: the exported (and evaluated) ONNX file.
        metadata: its final metadata (with thresholds), stored beside the model.
        params: run parameters (training configuration).
        metrics: headline metrics (from evaluation).
        history: per-epoch loss records, logged as metric curves.
        model_name: registered model name.
        aliases: aliases to point at the new version (`<arch>-<variant>` is always set).
        experiment: MLflow experiment name.
        artifact_root: artifact folder for a newly created experiment.
        reference: the version's reference set (known parts the promotion gate checks its
            successors against), logged under the run's `reference/`.
        checkpoint: a folder written by `registry.checkpoint.save_checkpoint` (the trained
            torch model), logged under the run's `torch/`.

    Returns:
        The registered version.
    """
    import mlflow
    import onnx
    from mlflow import MlflowClient

    from service.repository.reproduction import RECORDED_TAG

    ensure_experiment(experiment, artifact_root)
    default_alias = f"{metadata.architecture}-{metadata.variant}"
    all_aliases = tuple(dict.fromkeys((default_alias, *aliases)))
    with mlflow.start_run(run_name=default_alias) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        for rec in history or []:
            step = int(rec["epoch"])
            mlflow.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=step)
        mlflow.set_tags({"architecture": metadata.architecture, "variant": metadata.variant})
        meta_dir = Path(onnx_path).parent
        meta_file = metadata.save(meta_dir)
        recorded = reproduction_record(onnx_path, metadata, reference, meta_dir / "reproduction")
        info = mlflow.onnx.log_model(  # logged only: the version is created below, in one call
            onnx.load(str(onnx_path)),
            name=ARTIFACT_PATH,
            signature=_signature(metadata),
            # No input_example: MLflow scores one in this process to validate it (mlflow.onnx
            # cannot turn that off), and a model that hangs or crashes ONNX Runtime would take
            # registration with it; the engine's evaluation has run the model already, bounded.
            metadata={"anomaly_model": metadata.architecture, "variant": metadata.variant},
            extra_files=[str(meta_file), *map(str, recorded)],
            save_as_external_data=False,
            onnx_execution_providers=["CPUExecutionProvider"],
        )
        # on the run and on the logged model (MLflow 3's LoggedModel page shows them)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)},
                           model_id=info.model_id)
        if checkpoint is not None:
            from registry.checkpoint import TORCH_ARTIFACTS

            mlflow.log_artifacts(str(checkpoint), artifact_path=TORCH_ARTIFACTS)
        if reference:
            log_reference_set(list(reference), f"evaluation split of {metadata.dataset or 'the dataset'}")
    client = MlflowClient()
    ensure_registered_model(client, model_name)
    host = this_host()
    description = version_description(metadata, metrics) + f"\n\nMeasured on {host.describe()}" + (
        f"; {len(recorded) - 1} reference part(s) recorded for the reproduction check every server "
        "runs before it serves this version (`hardware.<host class>.status`)." if recorded else ".")
    tags = {**version_tags(metadata, metrics), **host.tags(), RECORDED_TAG: str(max(len(recorded) - 1, 0))}
    # One call: the version exists only with all its tags and its description. The source is
    # the logged model (`models:/m-…`), as `log_model(registered_model_name=…)` registered it.
    created = client.create_model_version(model_name, info.model_uri, run_id=run.info.run_id, tags=tags,
                                          description=description, model_id=info.model_id)
    version = str(created.version)
    link_logged_model(client, info.model_id, model_name, version)
    for alias in all_aliases:
        client.set_registered_model_alias(model_name, alias, version)
    log.info("registered %s version %s with aliases %s", model_name, version, all_aliases)
    return RegisteredVersion(model_name, version, run.info.run_id, all_aliases)

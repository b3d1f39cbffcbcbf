"""The trained model is evaluated through the engine and registered with the conventions."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import tracking_uri
from mlflow import MlflowClient

from service.metadata import GLOBAL, ModelMetadata
from service.repository import read_model_dir


def test_version_tags_and_aliases(store) -> None:
    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    mv = client.get_model_version(store.model_name, store.version)
    assert mv.tags["architecture"] == "stfpm"
    assert mv.tags["variant"] == "fp32"
    assert mv.tags["input_size"] == "128x128"
    assert mv.tags["categories"] == "brick,coffee"
    assert len(mv.tags["dataset"]) == 16
    assert float(mv.tags["threshold"]) > 0
    assert 0.0 <= float(mv.tags["image_auroc"]) <= 1.0
    for alias in ("champion", "stfpm-fp32"):
        assert str(client.get_model_version_by_alias(store.model_name, alias).version) == store.version


def test_descriptions_tell_an_engineer_what_they_promote(store) -> None:
    """The MLflow UI shows, on the model and on each version, what it is and how it scored."""
    client = MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)
    assert "champion" in client.get_registered_model(store.model_name).description
    mv = client.get_model_version(store.model_name, store.version)
    assert mv.description.startswith("**stfpm fp32** (fp32), backbone efficientnet_lite0, input 128×128")
    assert f"- image AUROC: {float(mv.tags['image_auroc']):.4g}" in mv.description
    assert "brick, coffee" in mv.description and "Global threshold" in mv.description


def test_run_has_metrics_params_and_loss_curve(store) -> None:
    client = MlflowClient(tracking_uri=store.tracking_uri)
    run = client.get_run(store.build.registered.run_id)
    for key in ("image_auroc", "pixel_auroc", "image_auroc/brick", "pixel_auroc/coffee",
                "latency_ms_p50", "model_mb"):
        assert key in run.data.metrics, key
    assert run.data.params["architecture"] == "stfpm"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == 12
    assert history[-1].value < history[0].value


def test_artifact_is_onnx_flavor_with_metadata(store, tmp_path: Path) -> None:
    import mlflow.artifacts

    with tracking_uri(store.tracking_uri):  # models:/ URIs resolve through the global registry
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{store.model_name}/{store.version}", dst_path=str(tmp_path)))
    onnx_path, meta = read_model_dir(local)
    assert onnx_path.is_file() and onnx_path.suffix == ".onnx"
    assert meta.categories == ["brick", "coffee"]
    assert set(meta.image_stats) == {GLOBAL, "brick", "coffee"}
    for stats in meta.image_stats.values():
        assert stats.min <= stats.threshold <= stats.max * 1.001
        assert math.isclose(stats.normalize(stats.threshold), 0.5)
    raw = json.loads((local / "extra_files" / "anomaly_model.json").read_text())
    assert ModelMetadata.model_validate(raw) == meta


def test_defects_score_higher_in_evaluation(store) -> None:
    report = store.build.report
    assert report.image_auroc > 0.7, report.per_category
    assert report.pixel_auroc > 0.7, report.per_category

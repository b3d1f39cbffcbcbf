"""The trained model is evaluated through the engine and registered with the conventions."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import tracking_uri
from mlflow import MlflowClient

from service.repository.artifact import read_model_dir
from service.runtime.metadata import GLOBAL, ModelMetadata

if TYPE_CHECKING:
    from registry.mlflow_registry import RegisteredVersion


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


def _register_tiny_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch | None = None,
                         ) -> tuple[str, RegisteredVersion, ModelMetadata, list[tuple[str, dict]]]:
    """A tiny ONNX model registered by `log_and_register` into a fresh SQLite store of its
    own; with `monkeypatch`, every write to the model registry during the registration is
    recorded. Returns (tracking URI, registered version, metadata, registry writes)."""
    import inspect

    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    from loadtests.faults import tiny_onnx
    from registry.mlflow_registry import log_and_register, use_store
    from service.runtime.metadata import ScoreStats

    writes: list[tuple[str, dict]] = []
    if monkeypatch is not None:
        for method in ("create_registered_model", "update_registered_model", "create_model_version",
                       "update_model_version", "set_model_version_tag", "delete_model_version_tag",
                       "set_registered_model_alias"):
            real = getattr(SqlAlchemyStore, method)

            def spy(self, *args, _real=real, _name=method, **kwargs):  # type: ignore[no-untyped-def]
                bound = inspect.signature(_real).bind(self, *args, **kwargs)
                writes.append((_name, dict(bound.arguments)))
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(SqlAlchemyStore, method, spy)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    stats = ScoreStats(threshold=0.25, min=0.0, max=1.0)
    metadata = ModelMetadata(architecture="tiny", input_height=64, input_width=96, categories=["brick"],
                             image_stats={GLOBAL: stats, "brick": stats}, dataset="0123456789abcdef")
    path = tiny_onnx(tmp_path / "build" / "model.onnx", metadata.input_size)
    with tracking_uri(uri):
        root = use_store(uri)
        metrics = {"image_auroc": 0.875, "pixel_auroc": 0.5, "aupro": float("nan")}
        registered = log_and_register(path, metadata, params={"epochs": 1}, metrics=metrics,
                                      aliases=("champion",), artifact_root=root)
    return uri, registered, metadata, writes


def test_a_version_is_created_whole_in_one_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server following an alias never sees a version without its tags or description: the
    version is created with all of them in one registry call, and nothing rewrites them."""
    from registry.mlflow_registry import version_description, version_tags

    uri, registered, metadata, writes = _register_tiny_fresh(tmp_path, monkeypatch)
    names = [name for name, _ in writes]
    assert names.count("create_model_version") == 1, names
    for rewrite in ("update_model_version", "set_model_version_tag", "delete_model_version_tag"):
        assert rewrite not in names, names
    # the aliases move only once the version is whole
    assert names.index("create_model_version") < names.index("set_registered_model_alias")
    created = dict(writes)["create_model_version"]
    sent = {t.key: t.value for t in created["tags"]}
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version(registered.name, registered.version)
    assert sent == mv.tags
    assert sent.items() >= version_tags(metadata, {"image_auroc": 0.875, "pixel_auroc": 0.5}).items()
    assert {"measured.host_class", "measured.reproduction"} <= sent.keys()
    assert created["description"] == mv.description
    assert mv.description.startswith(version_description(metadata, {"image_auroc": 0.875}).split("\n")[0])
    assert mv.run_id == registered.run_id
    # its source is the logged model, as `log_model(registered_model_name=…)` made it
    assert created["model_id"].startswith("m-") and mv.source == f"models:/{created['model_id']}"
    assert "champion" in client.get_registered_model(registered.name).description
    # a second registration into the same registered model: still one write per version
    writes.clear()
    with tracking_uri(uri):
        from registry.mlflow_registry import log_and_register

        again = log_and_register(tmp_path / "build" / "model.onnx", metadata, params={}, metrics={})
    assert again.version == str(int(registered.version) + 1)
    assert [n for n, _ in writes if "model_version" in n] == ["create_model_version"]


def test_logged_model_has_signature_metrics_and_serves(tmp_path: Path) -> None:
    """The ONNX model carries its signature (and no input example, which MLflow would run at
    registration: a hanging model would hang it); the evaluation metrics are
    on the logged model (MLflow 3's LoggedModel page) as well as on the run; and the server's
    way of fetching a version (its download URI) still yields the model folder."""
    import mlflow
    import mlflow.artifacts
    import numpy as np
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    uri, registered, metadata, _ = _register_tiny_fresh(tmp_path)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version(registered.name, registered.version)
    with tracking_uri(uri):
        info = mlflow.models.get_model_info(registered.uri)
        (spec,) = info.signature.inputs.inputs
        assert (spec.name, spec.type, spec.shape) == ("image", np.dtype(np.float32), (-1, 3, 64, 96))
        outputs = {s.name: s.shape for s in info.signature.outputs.inputs}
        assert outputs == {"anomaly_map": (-1, 1, 64, 96), "score": (-1,)}
        assert info.saved_input_example_info is None
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(registered.name, registered.version),
            dst_path=str(tmp_path / "served")))
        # the SQL store keeps no `model_id` on the version: its source names the logged model
        logged = mlflow.get_logged_model(mv.source.removeprefix("models:/"))
    onnx_path, meta = read_model_dir(local)
    assert onnx_path.is_file() and meta == metadata
    on_model = {m.key: m.value for m in logged.metrics}
    assert on_model == {"image_auroc": 0.875, "pixel_auroc": 0.5}  # the non-finite AUPRO is left out
    assert all(m.run_id == registered.run_id for m in logged.metrics)
    assert client.get_run(registered.run_id).data.metrics == on_model
    assert json.loads(logged.tags[MLFLOW_MODEL_VERSIONS]) == [
        {"name": registered.name, "version": registered.version}]

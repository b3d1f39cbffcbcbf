"""Unified vs one-class on a tiny dataset: every model trained, evaluated, reported, logged."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from registry.architectures import ModelConfig
from registry.train import TrainConfig
from studies.compare import EXPERIMENT, run_and_write


@pytest.mark.heavy  # trains small models (unified and one per category), about 11 s: not in the fast loop
def test_unified_vs_one_class_report(sample_root: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        _check(sample_root, tmp_path, uri)
    finally:
        mlflow.set_tracking_uri(previous)


def _check(sample_root: Path, tmp_path: Path, uri: str) -> None:
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nkeep me\n\n## Unified vs one-class (FP32)\nold\n\n## Other\nkeep too\n")
    rows = run_and_write(sample_root, tmp_path / "work", out, ["rd"],
                         ModelConfig(input_size=(64, 64)), TrainConfig(epochs=2, batch_size=8),
                         command="anomaly compare --test")
    assert [(r.architecture, r.setup, r.n_models) for r in rows] == [
        ("rd", "unified", 1), ("rd", "one-class", 2)]
    for r in rows:
        assert set(r.per_category) == {"brick", "coffee"}
        assert 0.0 <= r.mean("aupro") <= 1.0 and r.total_mb > 0
    text = out.read_text()
    assert "keep me" in text and "## Other\nkeep too" in text and "\nold\n" not in text
    assert "| rd | unified | 2 | 1 |" in text and "| rd | one-class | 2 | 2 |" in text
    runs = MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert {r.data.tags["setup"] for r in runs} == {"unified", "one-class"}
    assert all("aupro" in r.data.metrics and "n_models" in r.data.metrics for r in runs)

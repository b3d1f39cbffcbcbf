"""STFPM: training reduces the loss; export reproduces torch with a dynamic batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from registry.architectures import ARCHITECTURES, ModelConfig, build_model
from registry.export import export_onnx


def test_registry_of_architectures() -> None:
    assert set(ARCHITECTURES) == {"stfpm", "rd", "us"}
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("nope")


def test_eval_outputs_map_and_max_score() -> None:
    model = build_model("stfpm", ModelConfig(input_size=(64, 64))).eval()
    with torch.no_grad():
        amap, score = model(torch.rand(2, 3, 64, 64))
    assert amap.shape == (2, 1, 64, 64) and score.shape == (2,)
    assert model.score_margin == 2
    assert torch.allclose(score, amap[..., 2:62, 2:62].flatten(1).max(1).values)
    assert (score <= amap.flatten(1).max(1).values).all()
    assert (amap >= 0).all()


def test_export_dynamic_batch_matches_torch(tmp_path: Path) -> None:
    model = build_model("stfpm", ModelConfig(input_size=(64, 96))).eval()
    path = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["image"]
    assert [o.name for o in graph.graph.output] == ["anomaly_map", "score"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = np.random.default_rng(batch).random((batch, 3, 64, 96), dtype=np.float32)
        amap, score = sess.run(None, {"image": x})
        with torch.no_grad():
            t_map, t_score = model(torch.from_numpy(x))
        assert amap.shape == (batch, 1, 64, 96)
        np.testing.assert_allclose(score, t_score.numpy(), rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(amap, t_map.numpy(), rtol=1e-3, atol=1e-6)

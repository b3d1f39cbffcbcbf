"""The trained torch model of an FP32 version, logged with it (`torch/` artifacts of the
run) so that variants can be built later from the registered version: QAT-INT8 fine-tunes
the float model, which the ONNX file alone cannot give back.

`model.json` names the architecture and its `ModelConfig`; `state_dict.pt` holds every
weight and buffer (the frozen backbone included, so no backbone weights file is needed to
restore it).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from registry.architectures import AnomalyModel, ModelConfig, build_model
from service.runtime.engine import OnnxModel

TORCH_ARTIFACTS = "torch"
CONFIG_FILE = "model.json"
WEIGHTS_FILE = "state_dict.pt"


class CheckpointError(ValueError):
    """The folder does not hold a restorable model (missing or mismatched files)."""


def save_checkpoint(model: AnomalyModel, folder: Path | str) -> Path:
    """Write `model.json` and `state_dict.pt` of `model` into `folder`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {**asdict(model.config), "input_size": list(model.config.input_size)}
    config.pop("pretrained", None)
    (folder / CONFIG_FILE).write_text(json.dumps({"architecture": model.name, "config": config}, indent=2))
    torch.save(model.state_dict(), folder / WEIGHTS_FILE)
    return folder


def load_checkpoint(folder: Path | str) -> AnomalyModel:
    """The model saved by `save_checkpoint`, in eval mode.

    Raises:
        CheckpointError: a file is missing, or the weights do not fit the architecture.
    """
    folder = Path(folder)
    try:
        spec = json.loads((folder / CONFIG_FILE).read_text())
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"no restorable torch model in {folder}: {exc}") from exc
    raw = dict(spec["config"])
    raw["input_size"] = tuple(raw["input_size"])
    # The state dict carries the backbone's weights: do not look for a backbone weights file.
    config = ModelConfig(**{**raw, "backbone_weights": None, "pretrained": False})
    model = build_model(spec["architecture"], config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {folder} do not fit {spec['architecture']}: {exc}") from exc
    return model.eval()


def check_reproduces(model: AnomalyModel, onnx: OnnxModel, images: list[bytes],
                     rtol: float = 1e-3) -> None:
    """Raise `CheckpointError` unless the restored `model` gives the registered ONNX file's
    maps and scores on `images` (within `rtol` of the map's range): a checkpoint restored by
    other code than trained it (an option whose default changed since) would otherwise
    fine-tune into variants of a different model than the registered one.
    """
    if onnx.metadata.tiling is not None:  # the first image's tiles, through the bare graph on both sides
        batch = onnx.prepare_encoded(images[0])
    else:
        batch = np.stack([onnx.prepare_encoded(b) for b in images])
    scores, maps = onnx.run(batch)
    with torch.no_grad():
        maps_t, scores_t = model.eval()(torch.from_numpy(batch))
    maps_t, scores_t = maps_t.numpy()[:, 0], scores_t.numpy()
    tol = rtol * max(float(np.ptp(maps)), 1e-6)
    worst = max(float(np.abs(maps_t - maps).max()), float(np.abs(scores_t - scores).max()))
    if not worst <= tol:
        raise CheckpointError(f"the restored torch model does not reproduce the registered ONNX model "
                              f"(largest difference {worst:.3g}, allowed {tol:.3g}; non-finite outputs "
                              "count as different): it was saved by code whose defaults have changed "
                              "since, or is not what the version was exported from; train it again with "
                              "`anomaly build`")

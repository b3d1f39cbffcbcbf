"""Export a trained `AnomalyModel` to ONNX: one graph, image batch → anomaly map + score.

Normalisation is inside the graph; the batch axis is dynamic; height and width are fixed
(the metadata records them). The export is checked with `onnx.checker` and against the
torch outputs through ONNX Runtime before it is accepted.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from registry.architectures import AnomalyModel

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("anomaly_map", "score")
OPSET = 17


class ExportError(RuntimeError):
    """The exported graph failed validation."""


def export_onnx(model: AnomalyModel, path: Path | str, opset: int = OPSET,
                rtol: float = 1e-3, atol: float = 1e-5) -> Path:
    """Write `model` as ONNX to `path` and verify it reproduces torch's outputs.

    Returns:
        The path written.

    Raises:
        ExportError: if the graph is invalid or disagrees with torch.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    h, w = model.config.input_size
    example = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    dyn = {0: "batch"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deliberate (stable QDQ export later); its
        # deprecation and constant-folding notices are noise for users.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path),
            input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
            dynamic_axes={INPUT_NAME: dyn, OUTPUT_NAMES[0]: dyn, OUTPUT_NAMES[1]: dyn},
            opset_version=opset, dynamo=False,
        )
    onnx.checker.check_model(str(path), full_check=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probe = torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t_map, t_score = model(probe)
    o_map, o_score = sess.run(list(OUTPUT_NAMES), {INPUT_NAME: probe.numpy()})
    for name, a, b in (("anomaly_map", t_map.numpy(), o_map), ("score", t_score.numpy(), o_score)):
        scale = max(1.0, float(np.abs(a).max()))
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol * scale):
            raise ExportError(f"ONNX {name} differs from torch (max abs diff "
                              f"{float(np.abs(a - b).max()) if a.shape == b.shape else 'shape'})")
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path

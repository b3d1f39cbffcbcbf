"""Post-training static quantization with ONNX Runtime (QDQ format, per-channel weights).

The output is an ordinary ONNX graph with QuantizeLinear/DequantizeLinear pairs around
the network's layers: ONNX Runtime's CPU provider fuses them into integer kernels, and
TensorRT reads the same format as explicit quantization.

Two targets, because their integer kernels want different things (measured on x86 with
AVX-512 VNNI, see docs/results.md):

- `cpu`: uint8 activations (asymmetric) × int8 weights (symmetric, per channel): the
  combination ONNX Runtime's x86 kernels run fastest. Signed int8 activations leave many
  convolutions as float behind DequantizeLinear and run slower than FP32.
- `tensorrt`: int8 activations and weights, both symmetric (zero point 0), which is
  what TensorRT's explicit-quantization path requires.

Only the networks are quantized (`graph.network_nodes`); the anomaly-map head stays FP32.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from registry.variants.calibration import ArrayReader, CalibrationAlgo
from registry.variants.graph import network_nodes

log = logging.getLogger(__name__)

TARGETS = ("cpu", "tensorrt")
ENTROPY_BINS = 2048


def quantize_int8(
    fp32_path: Path | str,
    out_path: Path | str,
    reader: ArrayReader,
    algo: CalibrationAlgo = CalibrationAlgo.minmax,
    *,
    target: str = "cpu",
    tensor_overrides: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """Quantize an exported FP32 model to an INT8 QDQ model.

    Args:
        fp32_path: the exported FP32 ONNX file.
        out_path: where to write the quantized model.
        reader: calibration inputs (`calibration.ArrayReader`).
        algo: how ranges are chosen from the calibration activations.
        target: `cpu` (u8 activations, s8 weights) or `tensorrt` (symmetric s8 both).
        tensor_overrides: fixed ranges for some tensors (ONNX Runtime's
            `TensorQuantOverrides`), e.g. the ranges learned by quantization-aware training.

    Returns:
        `out_path`.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph clean-up (constant folding of the static padding, …),
        # which the ONNX Runtime docs recommend before quantization.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        nodes = network_nodes(onnx.load(str(prepared)))
        extra: dict[str, Any] = {"CalibTensorRangeSymmetric": False}
        if algo is CalibrationAlgo.entropy:
            # The KL search picks a clipping range among histogram bins beyond the number of
            # quantized bins. ONNX Runtime's default (128 bins for 128 quantized bins) leaves
            # one candidate, the full range, i.e. the same ranges as MinMax (checked: every
            # scale identical). TensorRT's entropy calibrator uses 2048 bins; so do we.
            extra.update(CalibNumBins=ENTROPY_BINS, CalibNumQuantizedBins=128)
        if target == "tensorrt":
            extra.update(ActivationSymmetric=True, WeightSymmetric=True)
        if tensor_overrides:
            extra["TensorQuantOverrides"] = tensor_overrides
        reader.rewind()
        quantize_static(
            str(prepared), str(out_path), reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if target == "cpu" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes,
            calibrate_method=algo.ort,
            extra_options=extra,
        )
    log.info("quantized %s → %s (%s, %d calibration images, %d nodes, %.1fs)", Path(fp32_path).name,
             out_path.name, algo.value, len(reader), len(nodes), time.perf_counter() - t0)
    return out_path

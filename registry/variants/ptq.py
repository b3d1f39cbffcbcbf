"""Post-training static quantization with ONNX Runtime (QDQ format, per-channel weights).

The output is an ordinary ONNX graph with QuantizeLinear/DequantizeLinear pairs around
the network's layers: ONNX Runtime's CPU provider fuses them into integer kernels, and
TensorRT reads the same format as explicit quantization.

Two targets, because their integer kernels want different things (see docs/results.md):

- `cpu`: uint8 activations (asymmetric) × int8 weights (symmetric, per channel): the
  combination ONNX Runtime's x86 kernels run fastest. Signed int8 activations leave many
  convolutions as float behind DequantizeLinear and run slower than FP32.
- `tensorrt`: int8 activations and weights, both symmetric (zero point 0), which is
  what TensorRT's explicit-quantization path requires.

For `cpu` the weight range is a choice (`SCHEMES`), because the same graph computes
different numbers on different CPUs: on x86 without VNNI (AVX2, AVX-512 F/BW) ONNX Runtime
multiplies u8 × s8 with `vpmaddubsw`, which adds two products into a saturating 16-bit
intermediate (255 × 127 × 2 > 32767), while VNNI's `vpdpbusd` accumulates in 32 bits.
`u8s8-rr` (ONNX Runtime's `reduce_range`: 7-bit weights in [-64, 64], so 255 × 64 × 2 fits)
computes the same integers on every CPU and is the default; `u8s8` keeps 8-bit weights and is
exact only on VNNI (and ARM); `u8u8` (uint8 weights) does not saturate but runs slower.
The `tensorrt` file (s8 activations) is for TensorRT only: on an x86 CPU without VNNI its
scores move by a fifth or more. Measured per CPU in docs/results.md, "INT8 across CPUs".

Only the networks are quantized (`graph.network_nodes`); the anomaly-map head stays FP32.

Before quantizing, the FP32 weights are prepared for the scheme's grid (`weights`:
per-channel least-error clipping and empirical bias correction on the calibration images);
quantization-aware training, whose weights already learned the grid, skips it.
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
from registry.variants.weights import prepare_weights

log = logging.getLogger(__name__)

TARGETS = ("cpu", "tensorrt")
# CPU weight schemes: name → (weight type, reduce_range). See the module docstring.
SCHEMES: dict[str, tuple[QuantType, bool]] = {
    "u8s8-rr": (QuantType.QInt8, True),  # portable: the same integers on every CPU
    "u8s8": (QuantType.QInt8, False),  # 8-bit weights: exact only with VNNI (or on ARM)
    "u8u8": (QuantType.QUInt8, False),  # no saturation on any x86, slower kernels
}
DEFAULT_SCHEME = "u8s8-rr"
ENTROPY_BINS = 2048


def quantize_int8(
    fp32_path: Path | str,
    out_path: Path | str,
    reader: ArrayReader,
    algo: CalibrationAlgo = CalibrationAlgo.minmax,
    *,
    target: str = "cpu",
    scheme: str = DEFAULT_SCHEME,
    tensor_overrides: dict[str, list[dict[str, Any]]] | None = None,
    weight_preparation: bool = True,
) -> Path:
    """Quantize an exported FP32 model to an INT8 QDQ model.

    Args:
        fp32_path: the exported FP32 ONNX file.
        out_path: where to write the quantized model.
        reader: calibration inputs (`calibration.ArrayReader`).
        algo: how ranges are chosen from the calibration activations.
        target: `cpu` (u8 activations, s8 weights) or `tensorrt` (symmetric s8 both).
        scheme: the CPU target's weight scheme (`SCHEMES`; ignored for `tensorrt`).
        tensor_overrides: fixed ranges for some tensors (ONNX Runtime's
            `TensorQuantOverrides`), e.g. the ranges learned by quantization-aware training.
        weight_preparation: clip and bias-correct the weights for the grid first
            (`weights.prepare_weights`); off for weights trained with the grid (QAT).

    Returns:
        `out_path`.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {TARGETS}")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown INT8 scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    weight_type, reduce_range = SCHEMES[scheme] if target == "cpu" else (QuantType.QInt8, False)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph clean-up, which the ONNX Runtime docs recommend before
        # quantization.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        if weight_preparation and weight_type == QuantType.QInt8:
            # The symmetric int8 grid's top level: 64 with reduce_range (7 bits), else 127.
            # (uint8 weights sit on another grid, zero point 128: not prepared.)
            qmax = 64 if reduce_range else 127
            prepare_weights(prepared, prepared, reader, qmax)
        nodes = network_nodes(onnx.load(str(prepared)))
        extra: dict[str, Any] = {"CalibTensorRangeSymmetric": False}
        method = algo.ort
        if algo is CalibrationAlgo.entropy:
            # `quantize_static` runs the entropy calibrator with 128 histogram bins for 128
            # quantized bins: the KL search then has one candidate, the full range, and the
            # scales come out identical to MinMax (checked scale by scale). So the entropy
            # ranges are computed here with TensorRT's 2048 bins and passed as overrides.
            tensor_overrides = {**entropy_ranges(prepared, reader, Path(tmp)), **(tensor_overrides or {})}
            method = CalibrationAlgo.minmax.ort  # for tensors the entropy pass did not see
        if target == "tensorrt":
            extra.update(ActivationSymmetric=True, WeightSymmetric=True)
        else:
            # Symmetric weights in every scheme: per-channel QLinearConv on the CPU provider
            # needs one zero point for all channels (0 for int8, 128 for uint8).
            extra["WeightSymmetric"] = True
        if tensor_overrides:
            extra["TensorQuantOverrides"] = tensor_overrides
        reader.rewind()
        quantize_static(
            str(prepared), str(out_path), reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if target == "cpu" else QuantType.QInt8,
            weight_type=weight_type,
            reduce_range=reduce_range,
            nodes_to_quantize=nodes,
            calibrate_method=method,
            extra_options=extra,
        )
    log.info("quantized %s → %s (%s, %s, %d calibration images, %d nodes, %.1fs)", Path(fp32_path).name,
             out_path.name, algo.value, scheme if target == "cpu" else target, len(reader), len(nodes),
             time.perf_counter() - t0)
    return out_path


def entropy_ranges(model_path: Path, reader: ArrayReader, tmp: Path,
                   bins: int = ENTROPY_BINS) -> dict[str, list[dict[str, Any]]]:
    """KL-divergence (entropy) activation ranges with `bins` histogram bins, as
    `TensorQuantOverrides`."""
    import numpy as np
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    calibrator = create_calibrator(model_path, augmented_model_path=str(tmp / "entropy-augmented.onnx"),
                                   calibrate_method=CalibrationMethod.Entropy,
                                   extra_options={"num_bins": bins, "num_quantized_bins": 128,
                                                  "symmetric": False})
    reader.rewind()
    calibrator.collect_data(reader)
    data = calibrator.compute_data()
    reader.rewind()
    out = {}
    for name, td in data.data.items():
        lo, hi = (float(np.asarray(v).reshape(-1)[0]) for v in td.range_value)
        out[name] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
    return out

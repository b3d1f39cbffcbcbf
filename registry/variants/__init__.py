"""Model variants built from one trained FP32 model: FP16, PTQ-INT8 and QAT-INT8.

- `graph`: which ONNX nodes are the networks (quantized / converted) and which are the
  anomaly-map head (kept in FP32), plus a size/op census of a built file.
- `calibration`: calibration data for post-training quantization: real normal images or
  random-normal inputs.
- `ptq`: ONNX Runtime static quantization (QDQ, per-channel int8 weights).
- `fp16`: float16 conversion with FP32 inputs/outputs.
- `qat`: quantization-aware fine-tuning in torch, then the same QDQ quantizer with the
  ranges learned during training.
"""

from __future__ import annotations

VARIANTS: tuple[str, ...] = ("fp32", "fp16", "ptq-int8", "qat-int8")
PRECISION: dict[str, str] = {"fp32": "fp32", "fp16": "fp16", "ptq-int8": "int8", "qat-int8": "int8"}

__all__ = ["PRECISION", "VARIANTS"]

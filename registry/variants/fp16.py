"""FP16 variant: the networks in float16, inputs, outputs and the anomaly-map head in float32.

For GPUs and the Jetson (TensorRT or CUDA run float16 natively). ONNX Runtime's CPU
provider has few float16 kernels and inserts casts, so on CPU this variant is usually no
faster than FP32; the comparison table reports what it measures.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnxruntime.transformers.float16 import convert_float_to_float16

from registry.variants.graph import head_nodes, sort_topologically

log = logging.getLogger(__name__)


def convert_fp16(fp32_path: Path | str, out_path: Path | str) -> Path:
    """Write the float16 variant of an exported FP32 model to `out_path`."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(fp32_path))
    converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=head_nodes(model))
    # The converter appends its input casts at the end of the node list; ONNX requires
    # topological order.
    sort_topologically(converted.graph)
    onnx.save(converted, str(out_path))
    onnx.checker.check_model(str(out_path))
    log.info("converted %s → %s (float16 networks)", Path(fp32_path).name, out_path.name)
    return out_path

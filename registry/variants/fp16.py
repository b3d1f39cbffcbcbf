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
    removed = drop_float16_round_trips(converted.graph)
    # The converter appends its input casts at the end of the node list; ONNX requires
    # topological order.
    sort_topologically(converted.graph)
    onnx.save(converted, str(out_path))
    onnx.checker.check_model(str(out_path))
    log.info("converted %s → %s (float16 networks, %d float16 round trips removed)",
             Path(fp32_path).name, out_path.name, removed)
    return out_path


def drop_float16_round_trips(graph: onnx.GraphProto) -> int:
    """Remove `Cast(→float16) → Cast(→float32)` pairs between two FP32 (blocked) nodes.

    The converter declares every tensor float16 and wraps blocked nodes in casts, so a
    tensor passed from one FP32 head node to the next makes a float16 round trip. In the
    anomaly-map head that overflows: RD's cosine similarity multiplies squared norms
    (~1e6 on the sample data) and float16 stops at 65504. Returns the pairs removed.
    """
    producer = {o: n for n in graph.node for o in n.output}

    def cast_to(node: onnx.NodeProto) -> int | None:
        if node.op_type != "Cast":
            return None
        return next((a.i for a in node.attribute if a.name == "to"), None)

    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    dropped: list[onnx.NodeProto] = []
    fixed = 0
    for node in graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        src = producer.get(node.input[0])
        if src is not None and cast_to(src) == onnx.TensorProto.FLOAT16:
            origin = producer.get(src.input[0])
            if origin is not None and cast_to(origin) is None and origin.op_type != "Constant":
                fixed += 1
                if node.output[0] in outputs:  # keep the graph output's node: float32 → float32
                    node.input[0] = src.input[0]
                else:
                    rename[node.output[0]] = src.input[0]  # the float32 tensor before the trip
                    dropped.append(node)
    keep = [n for n in graph.node if not any(n is d for d in dropped)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in keep for i in n.input} | outputs
    keep = [n for n in keep if not (cast_to(n) == onnx.TensorProto.FLOAT16 and n.output[0] not in used)]
    del graph.node[:]
    graph.node.extend(keep)
    return fixed

"""Where the networks end and the anomaly-map head begins, in an exported ONNX graph.

Every architecture exports the same shape of graph: normalisation, the networks
(teacher/student, encoder/decoder …: convolutions and their activations) and a head
that turns features into the anomaly map and the score (norms, differences, resizes, a
max). Quantizing the head costs accuracy for no speed (it is a few element-wise ops on
small tensors), so variants quantize or convert the networks only.

The split is found from the graph itself, not from node names (the exporter flattens
scopes when a module's method other than `forward` is called): a node belongs to the
networks when it is a weighted layer, when a weighted layer is downstream of it, or when
it is an activation / residual add fed only by the networks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import onnx

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# Ops that, fed only by network tensors, are still part of the network (block outputs).
TAIL_OPS = frozenset({"Add", "Clip", "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish",
                      "MaxPool", "AveragePool", "Concat"})


def is_layer(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> bool:
    """A learned layer: a weighted op whose weight is an initializer. A single-channel
    kernel (1 in, 1 out) is a filter on the anomaly map (e.g. a Gaussian blur), not a layer."""
    if node.op_type not in WEIGHTED_OPS or len(node.input) < 2 or node.input[1] not in initializers:
        return False
    dims = list(initializers[node.input[1]].dims)
    return not (node.op_type.startswith("Conv") and len(dims) == 4 and dims[0] * dims[1] == 1)


def network_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that make up the networks (see module docstring), in graph order."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    init_map = {i.name: i for i in graph.initializer}
    initializers = set(init_map)
    inside: set[int] = set()
    seeds = [n for n in graph.node if is_layer(n, init_map)]
    stack = list(seeds)
    while stack:  # everything upstream of a weighted layer
        node = stack.pop()
        if id(node) in inside:
            continue
        inside.add(id(node))
        stack += [producer[i] for i in node.input if i in producer]
    changed = True
    while changed:  # activations and residual adds fed only by the networks
        changed = False
        for node in graph.node:
            if id(node) in inside or node.op_type not in TAIL_OPS:
                continue
            feeds = [i for i in node.input if i and i not in initializers and i in producer
                     and producer[i].op_type != "Constant"]
            if feeds and all(id(producer[i]) in inside for i in feeds):
                inside.add(id(node))
                changed = True
    # Normalisation (Sub/Div on the graph input) is upstream too but is not a layer to quantize.
    return [n.name for n in graph.node if id(n) in inside and n.op_type not in ("Sub", "Div")]


def sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` in place so every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ValueError("graph has a cycle or an input nobody produces")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for n in ready:
            ordered.append(n)
            available.update(n.output)
    del graph.node[:]
    graph.node.extend(ordered)


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes outside `network_nodes` (normalisation and the anomaly-map head)."""
    net = set(network_nodes(model))
    return [n.name for n in model.graph.node if n.name not in net]


@dataclass
class GraphCensus:
    """What a built file holds: sizes of initializers by type and ops by type."""

    file_mb: float
    initializer_bytes: dict[str, int]
    ops: dict[str, int]

    @property
    def int8_weight_fraction(self) -> float:
        """Fraction of initializer bytes stored as 8-bit integers."""
        total = sum(self.initializer_bytes.values()) or 1
        return (self.initializer_bytes.get("INT8", 0) + self.initializer_bytes.get("UINT8", 0)) / total


def census(path: Path | str) -> GraphCensus:
    """Count initializer bytes per data type and nodes per op type of an ONNX file."""
    model = onnx.load(str(path))
    sizes: Counter[str] = Counter()
    for init in model.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        sizes[name] += len(init.raw_data) if init.raw_data else onnx.numpy_helper.to_array(init).nbytes
    ops: defaultdict[str, int] = defaultdict(int)
    for node in model.graph.node:
        ops[node.op_type] += 1
    return GraphCensus(Path(path).stat().st_size / 1e6, dict(sizes), dict(ops))


"""Preparing an FP32 graph's weights for INT8: per-channel clipping and bias correction.

ONNX Runtime's post-training quantization rounds each output channel of a layer's weights
onto a symmetric grid whose step is the channel's largest magnitude over the grid's top
level (64 for the portable 7-bit scheme, 127 for 8-bit). Two classic corrections make that
rounding cost less, and both are applied to the FP32 graph *before* ONNX Runtime quantizes
it, so the quantized file is an ordinary QDQ graph whose integers stay on the scheme's grid
(the portability of `u8s8-rr` is unchanged: every weight still lies in [-64, 64]):

1. **Clipping** (as in e.g. Banner et al., "Post-training 4-bit quantization", 2019): a
   channel with a few large weights wastes most of its levels. Each channel is clipped to
   the fraction of its range (searched in [0.5, 1]) that minimises the squared error of its
   rounded weights; the grid then spends its levels where the weights are.
2. **Empirical bias correction** (Nagel et al., "Data-free quantization", 2019; Finkelstein
   et al., 2019): rounding shifts each output channel's mean by (Ŵ − W) ∗ E[x]. The shift
   is computed by running the layer, with the rounding error as its weights, on the mean
   of its input over the calibration images (exact at padded borders and for any stride),
   and subtracted from the bias, so the quantized layer is unbiased on data like the
   calibration set. Anomaly maps are differences of two networks' features: a systematic
   offset in one of them reads as anomaly everywhere.

The grid assumed is the symmetric int8 one (`qmax` levels each side); uint8 weights are not
prepared (`ptq.quantize_int8`). Where ONNX Runtime raises a channel's weight scale so that
its bias stays representable (channels whose weights are ~0 next to their bias), the
correction was computed for the finer grid; the difference is of the order of those weights.

Measured on the demo's three architectures in docs/results.md ("INT8 across CPUs").
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from registry.variants.calibration import ArrayReader
from registry.variants.graph import is_layer, network_nodes

log = logging.getLogger(__name__)

CLIP_FRACTIONS = np.linspace(0.5, 1.0, 26)
CORRECTED_OPS = ("Conv", "ConvTranspose")


@dataclass
class WeightReport:
    """What `prepare_weights` changed."""

    layers: int = 0  # layers whose weights were looked at
    clipped_channels: int = 0  # output channels clipped below their largest magnitude
    channels: int = 0  # output channels in total
    corrected_layers: int = 0  # layers whose bias was corrected

    def summary(self) -> str:
        """One line for logs and run parameters."""
        return (f"{self.clipped_channels}/{self.channels} channels clipped, "
                f"{self.corrected_layers}/{self.layers} biases corrected")


def rounded(w: np.ndarray, qmax: int) -> np.ndarray:
    """`w` (one channel) rounded onto the symmetric grid of `qmax` levels each side whose
    top level is its largest magnitude, as ONNX Runtime's MinMax weight quantization does."""
    amax = float(np.abs(w).max())
    if amax == 0.0:
        return w.copy()
    step = amax / qmax
    return np.clip(np.round(w / step), -qmax, qmax) * step


def clip_channel(w: np.ndarray, qmax: int) -> np.ndarray:
    """`w` clipped to the fraction of its range whose rounding error is smallest."""
    amax = float(np.abs(w).max())
    if amax == 0.0:
        return w
    best, best_err = w, float(np.sum((rounded(w, qmax) - w) ** 2))
    for frac in CLIP_FRACTIONS[:-1]:
        c = np.clip(w, -frac * amax, frac * amax)
        err = float(np.sum((rounded(c, qmax) - w) ** 2))
        if err < best_err:
            best, best_err = c, err
    return best


def _channel_axis(node: onnx.NodeProto) -> int:
    """Output-channel axis of a layer's weight (ONNX Runtime's per-channel axis)."""
    return 1 if node.op_type == "ConvTranspose" else 0


def _input_means(model: onnx.ModelProto, tensors: list[str], reader: ArrayReader) -> dict[str, np.ndarray]:
    """Mean maps of `tensors` (N, C, H, W → C, H, W) over the calibration images, FP32."""
    import onnxruntime as ort

    graph_inputs = {i.name for i in model.graph.input}
    inner = [t for t in tensors if t not in graph_inputs]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for name in inner:
        if name not in outputs:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            outputs.add(name)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray] = {}
    count = 0
    reader.rewind()
    while (batch := reader.get_next()) is not None:
        values = dict(zip(inner, session.run(inner, batch) if inner else [], strict=True))
        values.update({t: batch[t] for t in tensors if t in graph_inputs})
        for name, v in values.items():
            sums[name] = sums.get(name, 0.0) + v.astype(np.float64).sum(axis=0)
        count += len(next(iter(batch.values())))
    reader.rewind()
    return {name: s / max(count, 1) for name, s in sums.items()}


def prepare_weights(src: Path | str, dst: Path | str, reader: ArrayReader, qmax: int, *,
                    clip: bool = True, correct_bias: bool = True) -> WeightReport:
    """Write `src` to `dst` with the networks' convolution weights clipped and biases
    corrected for rounding onto `qmax` levels each side (see the module docstring).

    Args:
        src: FP32 ONNX file (after `quant_pre_process`).
        dst: where to write the prepared FP32 file.
        reader: the calibration images (their layer-input means drive the correction).
        qmax: top level of the weight grid: 64 for 7-bit (reduce_range), 127 for 8-bit.
        clip: clip each channel to its least-error range.
        correct_bias: subtract the rounding's mean output shift from each layer's bias.
    """
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    chosen = set(network_nodes(model))
    uses = Counter(i for n in model.graph.node for i in n.input if i in inits)
    layers = []
    for n in model.graph.node:
        if n.name not in chosen or n.op_type not in CORRECTED_OPS or not is_layer(n, inits):
            continue
        if any(uses[i] > 1 for i in n.input[1:3] if i in inits):
            # A weight or bias shared with another node would be clipped and corrected once
            # per user, for weights no longer in the file: such layers are left as they are.
            log.info("INT8 weight preparation skips %s: its weight or bias is shared", n.name)
            continue
        layers.append(n)
    report = WeightReport(layers=len(layers))
    means = _input_means(model, sorted({n.input[0] for n in layers}), reader) if correct_bias else {}
    for node in layers:
        weight = inits[node.input[1]]
        w = numpy_helper.to_array(weight).astype(np.float64)
        axis = _channel_axis(node)
        wc = np.moveaxis(w, axis, 0).copy()  # (out, …)
        q = np.empty_like(wc)
        for c in range(wc.shape[0]):
            if clip:
                clipped = clip_channel(wc[c], qmax)
                report.clipped_channels += int(not np.array_equal(clipped, wc[c]))
                wc[c] = clipped
            q[c] = rounded(wc[c], qmax)
        report.channels += wc.shape[0]
        weight.CopyFrom(numpy_helper.from_array(np.moveaxis(wc, 0, axis).astype(np.float32), weight.name))
        error = np.moveaxis(q, 0, axis) - w  # rounded (clipped) − original
        if correct_bias and _correct_bias(model, inits, node, error, means[node.input[0]]):
            report.corrected_layers += 1
    onnx.save(model, str(dst))
    log.info("INT8 weight preparation (%d levels each side): %s", qmax, report.summary())
    return report


def output_shift(node: onnx.NodeProto, error: np.ndarray, mean_map: np.ndarray) -> np.ndarray:
    """Mean output shift per channel that the weight `error` causes in `node` on inputs whose
    mean is `mean_map` (C, H, W): the layer is linear in its input, so this is the layer itself
    (same padding, strides, dilations, groups) run once on the mean map with `error` as its
    weights and no bias, averaged over the output's pixels. Exact at the borders, where a
    3×3 kernel on a 4×4 map sees padding for over half of its taps."""
    import onnxruntime as ort

    layer = helper.make_node(node.op_type, ["x", "w"], ["y"], name="layer")
    layer.attribute.extend(node.attribute)
    x = mean_map[None].astype(np.float32)
    graph = helper.make_graph([layer], "shift",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(error.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    y = ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return y[0].reshape(y.shape[1], -1).astype(np.float64).mean(axis=1)


def _correct_bias(model: onnx.ModelProto, inits: dict[str, onnx.TensorProto], node: onnx.NodeProto,
                  error: np.ndarray, mean_map: np.ndarray) -> bool:
    """Subtract the mean output shift of `error` (rounded − original weights) from the bias
    of `node`, adding a bias where it has none. False (nothing changed) where the layer's
    bias is not an initializer, and for grouped transposed convolutions, whose per-channel
    bias ONNX Runtime's quantizer cannot scale."""
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if has_bias and node.input[2] not in inits:
        log.info("INT8 weight preparation: %s's bias is computed, not a weight; not corrected", node.name)
        return False
    if node.op_type == "ConvTranspose" and any(a.name == "group" and a.i > 1 for a in node.attribute):
        return False
    shift = output_shift(node, error, mean_map)
    if has_bias:
        bias = inits[node.input[2]]
        b = numpy_helper.to_array(bias).astype(np.float64)
        bias.CopyFrom(numpy_helper.from_array((b - shift).astype(np.float32), bias.name))
    else:
        name = f"{node.name or node.output[0]}_corrected_bias"
        model.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
        inits[name] = model.graph.initializer[-1]
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name
    return True

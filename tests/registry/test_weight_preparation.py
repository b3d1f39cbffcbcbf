"""Weight preparation for INT8 (`registry.variants.weights`): clipping and bias correction,
checked through ONNX Runtime's real quantizer and CPU kernels on a small real graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from registry.variants.calibration import ArrayReader
from registry.variants.ptq import quantize_int8
from registry.variants.weights import clip_channel, prepare_weights, rounded


def _conv_graph(path: Path, transpose: bool = False) -> None:
    """X (N, 8, 16, 16) → Conv 3×3 (16 channels, no bias; two channels with an outlier
    weight) → Relu → Conv 1×1 (or ConvTranspose 2×2 stride 2) with bias → y."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32)
    w1[3, 0, 1, 1], w1[11, 5, 0, 2] = 1.5, -1.2  # a few large weights waste the grid
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu")]
    inits = [numpy_helper.from_array(w1, "w1")]
    if transpose:
        w2 = rng.normal(0, 0.2, (16, 4, 2, 2)).astype(np.float32)
        nodes.append(helper.make_node("ConvTranspose", ["r", "w2", "b2"], ["y"], name="up", strides=[2, 2]))
        out_shape = [None, 4, 32, 32]
    else:
        w2 = rng.normal(0, 0.2, (4, 16, 1, 1)).astype(np.float32)
        nodes.append(helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"))
        out_shape = [None, 4, 16, 16]
    inits += [numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(4, np.float32), "b2")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def _inputs(n: int, seed: int) -> np.ndarray:
    # Inputs with a non-zero mean, as activations after a ReLU are: rounding errors then
    # shift each output channel's mean, which bias correction must take back.
    return np.random.default_rng(seed).gamma(2.0, 0.5, (n, 8, 16, 16)).astype(np.float32)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_clipping_never_rounds_worse_and_stays_on_the_grid() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        w = rng.standard_t(3, 200)  # heavy tails: clipping has something to win
        c = clip_channel(w, 64)
        assert np.abs(c).max() <= np.abs(w).max()
        assert np.sum((rounded(c, 64) - w) ** 2) <= np.sum((rounded(w, 64) - w) ** 2) + 1e-12
        q = rounded(c, 64) / (np.abs(c).max() / 64)
        assert np.allclose(q, np.round(q)) and np.abs(q).max() <= 64 + 1e-9


@pytest.mark.parametrize("transpose", [False, True], ids=["conv", "conv-transpose"])
def test_prepared_int8_graph_is_unbiased_and_closer_to_fp32(tmp_path: Path, transpose: bool) -> None:
    fp32 = tmp_path / "fp32.onnx"
    _conv_graph(fp32, transpose)
    calib, held_out = _inputs(32, 0), _inputs(32, 1)
    plain = quantize_int8(fp32, tmp_path / "plain.onnx", ArrayReader(calib, "x"), weight_preparation=False)
    prepared = quantize_int8(fp32, tmp_path / "prepared.onnx", ArrayReader(calib, "x"))
    ref = _run(fp32, held_out)
    err_plain, err_prep = _run(plain, held_out) - ref, _run(prepared, held_out) - ref
    channel_bias = lambda e: np.abs(e.mean(axis=(0, 2, 3))).mean()  # noqa: E731
    assert channel_bias(err_prep) < 0.2 * channel_bias(err_plain)  # measured: about 0.04×
    assert np.mean(err_prep ** 2) < np.mean(err_plain ** 2)
    # The quantized file stays portable: every weight on the 7-bit grid of `u8s8-rr`.
    model = onnx.load(str(prepared))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    assert weights and all(np.abs(w.astype(np.int32)).max() <= 64 for w in weights)


def test_preparation_adds_a_bias_where_a_layer_has_none(tmp_path: Path) -> None:
    fp32, out = tmp_path / "fp32.onnx", tmp_path / "prepared.onnx"
    _conv_graph(fp32)
    report = prepare_weights(fp32, out, ArrayReader(_inputs(8, 0), "x"), 64)
    assert report.layers == 2 and report.corrected_layers == 2 and report.channels == 20
    assert report.clipped_channels >= 2  # at least the two channels with an outlier
    conv1 = next(n for n in onnx.load(str(out)).graph.node if n.name == "conv1")
    assert len(conv1.input) == 3 and conv1.input[2]
    onnx.checker.check_model(onnx.load(str(out)))


def _graph(path: Path, nodes: list, inits: list, inputs: list | None = None) -> None:
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 16, 16])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_layers_it_cannot_prepare_safely_are_left_as_they_are(tmp_path: Path) -> None:
    """A weight shared by two layers (it would be clipped twice and corrected for weights no
    longer in the file), a bias fed at run time, a grouped transposed convolution without a
    bias (ORT cannot scale the bias it would get): each still quantizes and runs."""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_t(3, (8, 8, 3, 3)).astype(np.float32) * 0.1, "w")
    cases = {
        "shared": ([helper.make_node("Conv", ["x", "w"], ["h"], name="a", pads=[1, 1, 1, 1]),
                    helper.make_node("Relu", ["h"], ["r"], name="relu"),
                    helper.make_node("Conv", ["r", "w"], ["y"], name="b", pads=[1, 1, 1, 1])], [w], None),
        "runtime-bias": ([helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="a", pads=[1, 1, 1, 1])],
                         [w], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 16, 16]),
                               helper.make_tensor_value_info("bias", TensorProto.FLOAT, [8])]),
        "grouped-transpose": ([helper.make_node("ConvTranspose", ["x", "wt"], ["y"], name="a", strides=[2, 2],
                                                group=2)],
                              [numpy_helper.from_array(rng.normal(0, 0.2, (8, 4, 2, 2)).astype(np.float32),
                                                       "wt")], None),
    }
    for name, (nodes, inits, inputs) in cases.items():
        src = tmp_path / f"{name}.onnx"
        _graph(src, nodes, inits, inputs)
        report = prepare_weights(src, tmp_path / f"{name}-prepared.onnx", ArrayReader(_inputs(8, 0), "x"), 64)
        assert report.corrected_layers == 0, name
        if name == "shared":
            assert report.layers == 0
            prepared_model = onnx.load(str(tmp_path / f"{name}-prepared.onnx"))
            prepared = {i.name: numpy_helper.to_array(i) for i in prepared_model.graph.initializer}
            assert np.array_equal(prepared["w"], numpy_helper.to_array(w))
        if name != "runtime-bias":
            out = quantize_int8(src, tmp_path / f"{name}-int8.onnx", ArrayReader(_inputs(8, 0), "x"))
            assert np.isfinite(_run(out, _inputs(2, 1))).all()


def test_uint8_weights_are_not_prepared(tmp_path: Path) -> None:
    """`u8u8` keeps uint8 weights around zero point 128, another grid than the one prepared
    for: its file is the plain one."""
    fp32 = tmp_path / "fp32.onnx"
    _conv_graph(fp32)
    reader = ArrayReader(_inputs(16, 0), "x")
    a = quantize_int8(fp32, tmp_path / "a.onnx", reader, scheme="u8u8")
    b = quantize_int8(fp32, tmp_path / "b.onnx", reader, scheme="u8u8", weight_preparation=False)
    inits = lambda p: {i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}  # noqa: E731
    ia, ib = inits(a), inits(b)
    assert ia.keys() == ib.keys() and all(np.array_equal(ia[k], ib[k]) for k in ia)

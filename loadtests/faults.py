"""Broken model versions, made on purpose: what the fault-injection soak and the tests put
in a registry to check that a server refuses them and keeps serving.

Two kinds:

- **Tiny ONNX graphs** that honour the serving contract (`image (B, 3, H, W)` →
  `anomaly_map (B, 1, H, W)`, `score (B,)`) and misbehave in one way each (`tiny_onnx`):
  `nan` (every output NaN), `nan_on_black` (NaN only where a pixel is exactly black, so it
  passes validation and fails on a black image at request time), `hang` (a loop that runs
  for hours), `huge` (a 6 GB intermediate tensor). `none` is a well-behaved tiny model.
- **Mutations of a good artifact folder** (`MUTATIONS`): garbage bytes for the ONNX file,
  an `MLmodel` that is not YAML, an `MLmodel` that points outside its folder.

Needs the `onnx` package (the `train` extra), like everything that builds models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FAULTS = ("none", "nan", "nan_on_black", "hang", "huge")
OPSET = 17


def tiny_onnx(path: Path | str, input_size: tuple[int, int], fault: str = "none") -> Path:
    """Write a tiny anomaly model (map = mean over the colour channels, score = max).

    Args:
        path: where to write the `.onnx` file.
        input_size: (height, width) of its input.
        fault: one of `FAULTS`.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; choose from {FAULTS}")
    h, w = input_size
    nodes = [helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1], keepdims=1)]
    inits = []
    last = "mean"
    if fault == "nan":
        inits.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
        nodes.append(helper.make_node("Mul", ["mean", "nan"], ["bad"]))
        last = "bad"
    elif fault == "nan_on_black":  # 0/0 where the mean is exactly 0, else 1 × mean
        nodes += [helper.make_node("Div", ["mean", "mean"], ["ratio"]),
                  helper.make_node("Mul", ["ratio", "mean"], ["bad"])]
        last = "bad"
    elif fault in ("hang", "huge"):
        zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
        inits.append(zero)
        if fault == "hang":  # a loop of 2^40 trivial iterations
            body = helper.make_graph(
                [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                 helper.make_node("Identity", ["v_in"], ["v_out"])], "spin",
                [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
                [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])])
            inits += [numpy_helper.from_array(np.array(1 << 40, np.int64), "trips"),
                      numpy_helper.from_array(np.array(True), "true")]
            nodes.append(helper.make_node("Loop", ["trips", "true", "zero"], ["spun"], body=body))
            extra = "spun"
        else:  # ConstantOfShape of 1 × 1 × 40000 × 40000 floats = 6.4 GB
            inits.append(numpy_helper.from_array(np.array([1, 1, 40000, 40000], np.int64), "shape"))
            nodes += [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
                      helper.make_node("ReduceMax", ["big"], ["big_max"], keepdims=0)]
            extra = "big_max"
        nodes += [helper.make_node("Mul", [extra, "zero"], ["nothing"]),
                  helper.make_node("Add", ["mean", "nothing"], ["bad"])]
        last = "bad"
    nodes += [helper.make_node("Identity", [last], ["anomaly_map"]),
              helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0)]
    graph = helper.make_graph(
        nodes, f"tiny-{fault}",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["B", 3, h, w])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["B", 1, h, w]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, ["B"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def garbage_onnx(folder: Path) -> None:
    """The ONNX file replaced by bytes that are no ONNX graph (a bad upload)."""
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage, not an ONNX graph")


def malformed_mlmodel(folder: Path) -> None:
    """`MLmodel` that is not valid YAML."""
    (folder / "MLmodel").write_text("flavors: {onnx: [unclosed\n  : : :\n")


def escaping_mlmodel(folder: Path) -> None:
    """`MLmodel` whose onnx flavor names a file outside the artifact folder."""
    text = (folder / "MLmodel").read_text()
    (folder / "MLmodel").write_text(text.replace("data: model.onnx", "data: ../../../../../etc/hostname"))


MUTATIONS = {"garbage-onnx": garbage_onnx, "malformed-mlmodel": malformed_mlmodel,
             "escaping-mlmodel": escaping_mlmodel}

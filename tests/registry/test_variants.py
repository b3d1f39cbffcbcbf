"""FP16 / PTQ-INT8 / QAT-INT8 variants: graph surgery, registration, serving, the study."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from edge_anomaly_client.sdk import AnomalyClient
from registry.variants import VARIANTS

ARCHS = ("stfpm", "rd", "us")


def _category(path: Path) -> str:
    return path.parents[2].name


def test_network_nodes_leave_the_anomaly_map_head_in_fp32(store, other_architectures) -> None:
    from registry.variants.graph import head_nodes, is_layer, network_nodes

    for build in (store.build, other_architectures["rd"]):
        model = onnx.load(str(build.onnx_path))
        inits = {i.name: i for i in model.graph.initializer}
        net = set(network_nodes(model))
        by_name = {n.name: n for n in model.graph.node}
        layers = [n.name for n in model.graph.node if is_layer(n, inits)]
        assert layers and set(layers) <= net
        head = head_nodes(model)
        head_ops = {by_name[n].op_type for n in head}
        assert {"ReduceMax", "Resize"} <= head_ops  # score and upsampling stay float
        assert not net & set(head)
    # RD's Gaussian blur is a single-channel Conv on the map: a filter, not a layer.
    rd = onnx.load(str(other_architectures["rd"].onnx_path))
    inits = {i.name: i for i in rd.graph.initializer}
    blur = [n for n in rd.graph.node if n.op_type == "Conv" and not is_layer(n, inits)]
    assert len(blur) == 2 and not {n.name for n in blur} & set(network_nodes(rd))


def test_fold_batchnorm_keeps_the_output_and_removes_every_bn() -> None:
    from registry.architectures import ModelConfig, build_model
    from registry.variants.qat import fold_batchnorm

    model = build_model("rd", ModelConfig(input_size=(64, 64))).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for m in model.modules():  # non-trivial statistics so folding is really exercised
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        before = model(x)[0]
    n = fold_batchnorm(model, x)
    with torch.no_grad():
        after = model(x)[0]
    assert n > 10
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert torch.allclose(before, after, rtol=1e-3, atol=1e-4 * float(before.abs().max()))


def test_fp16_keeps_the_head_in_float32_without_round_trips(other_architectures, variant_builds) -> None:
    """RD's cosine head multiplies squared norms far beyond float16's 65504: the head must
    stay float32 end to end, and the FP16 graph must score like the FP32 one."""
    import onnxruntime as ort

    fp32 = other_architectures["rd"]
    fp16 = variant_builds["rd"][0].onnx_path
    model = onnx.load(str(fp16))
    producer = {o: n for n in model.graph.node for o in n.output}
    casts = {n.name: next(a.i for a in n.attribute if a.name == "to")
             for n in model.graph.node if n.op_type == "Cast"}
    for n in model.graph.node:
        if n.op_type == "Cast" and casts[n.name] == onnx.TensorProto.FLOAT:
            src = producer.get(n.input[0])
            origin = producer.get(src.input[0]) if src is not None and src.op_type == "Cast" else None
            assert not (origin is not None and origin.op_type not in ("Cast", "Constant")
                        and casts.get(src.name) == onnx.TensorProto.FLOAT16), n.name
    x = np.random.default_rng(0).random((2, 3, 128, 128), dtype=np.float32)
    a = ort.InferenceSession(str(fp32.onnx_path)).run(["score"], {"image": x})[0]
    b = ort.InferenceSession(str(fp16)).run(["score"], {"image": x})[0]
    assert np.isfinite(b).all()
    np.testing.assert_allclose(b, a, rtol=0.05, atol=0.05 * float(np.abs(a).max()))


def test_calibration_sources() -> None:
    from registry.variants.calibration import random_normal_images

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = random_normal_images((32, 32), 16, mean, std, seed=1)
    z = (x - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))
    assert x.shape == (16, 3, 32, 32) and x.dtype == np.float32
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


def test_all_variants_of_all_architectures_are_registered(store, variant_builds) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.tracking_uri)
    for arch in ARCHS:
        for variant in VARIANTS:
            mv = client.get_model_version_by_alias(store.model_name, f"{arch}-{variant}")
            assert mv.tags["architecture"] == arch and mv.tags["variant"] == variant
            assert mv.tags["precision"] == {"fp32": "fp32", "fp16": "fp16"}.get(variant, "int8")
            if variant == "ptq-int8":
                assert mv.tags["calibration"] == "real-minmax"
            assert float(mv.tags["image_auroc"]) > 0
        fp16, ptq, qat = variant_builds[arch]
        assert (fp16.variant, ptq.variant, qat.variant) == ("fp16", "ptq-int8", "qat-int8")
        assert qat.train is not None and len(qat.train.history) == 1


def test_int8_graphs_hold_int8_weights_at_a_quarter_of_the_size(store, variant_builds) -> None:
    from registry.variants.graph import census

    fp32 = census(store.build.onnx_path)
    for build in variant_builds["stfpm"][1:]:
        g = census(build.onnx_path)
        assert g.ops.get("QuantizeLinear", 0) > 10 and g.ops.get("DequantizeLinear", 0) > 10
        assert g.int8_weight_fraction > 0.6, g.initializer_bytes
        assert g.file_mb < 0.45 * fp32.file_mb
    fp16 = onnx.load(str(variant_builds["stfpm"][0].onnx_path))
    types = {i.data_type for i in fp16.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
               for i in list(fp16.graph.input) + list(fp16.graph.output))


@pytest.mark.parametrize("arch", ARCHS)
def test_every_variant_is_served_and_separates_defects(arch: str, grpc_target: str, variant_builds,
                                                      good_and_defect) -> None:
    good, defect = good_and_defect
    with AnomalyClient(grpc_target) as client:
        for build in variant_builds[arch]:
            alias = build.label
            g = [client.score(p, alias=alias, category=_category(p)).score for p in good]
            d = [client.score(p, alias=alias, category=_category(p)) for p in defect]
            assert {r.model.version for r in d} == {build.registered.version}
            assert statistics.median(r.score for r in d) > statistics.median(g), alias


def test_quant_study_writes_tables_and_plot(store, variant_builds, sample_root: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import mlflow

    from registry.variants import ptq
    from studies import quant_study

    # The entropy calibrator's KL search is a Python loop over its histogram (ORT's own code):
    # with the real 2048 bins it takes over a minute per run on this test's model. The study's
    # plumbing is what is tested here; 256 bins run the same calibrator in seconds.
    monkeypatch.setattr(ptq, "entropy_ranges", functools.partial(ptq.entropy_ranges, bins=256))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    mlflow.set_tracking_uri(store.tracking_uri)
    rows = quant_study.registered_variants(store.model_name, list(ARCHS))
    assert {(r.architecture, r.variant) for r in rows} == {(a, v) for a in ARCHS for v in VARIANTS}
    calib = quant_study.calibration_study(sample_root, store.model_name, ["stfpm"], n_images=8)
    assert {(c.data, c.method) for c in calib} == {(d, m) for d in ("real", "random")
                                                   for m in ("minmax", "entropy", "percentile")}
    assert all(0 <= c.image_auroc <= 1 and c.images_per_s_b8 > 0 for c in calib)
    speed = quant_study.side_by_side_speed(store.model_name, ["stfpm"], rounds=1, seconds=0.2)
    assert [r.variant for r in speed] == list(VARIANTS) and all(r.images_per_s_b8 > 0 for r in speed)
    png = quant_study.plot(rows, tmp_path / "variants.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "results.md"
    out.write_text("# Results\n\n## Other\n\nkept\n")
    section = quant_study.render(rows, calib, plot_name=png.name, command="anomaly quant-study",
                                 seconds=1.0, n_images=8, speed=speed)
    quant_study.replace_section(out, quant_study.HEADING, section)
    quant_study.replace_section(out, quant_study.HEADING, section)  # idempotent
    text = out.read_text()
    assert text.count(quant_study.HEADING) == 1 and "kept" in text
    assert "| stfpm | qat-int8 |" in text and "| stfpm | random | entropy |" in text
    assert "### Speed, side by side" in text


def test_demo_rejects_an_unknown_variant() -> None:
    from cli.main import app

    result = CliRunner().invoke(app, ["demo", "--variants", "int4"])
    assert result.exit_code == 2
    assert "unknown variant" in result.output


def test_demo_tables_fit_120_columns(store, other_architectures, variant_builds, sample_root: Path) -> None:
    """Every table the demo prints, filled with this session's real builds and the sample
    data's longest image name, is at most 120 columns wide (rendered on a wider console, so
    nothing is squeezed)."""
    import io

    from rich.console import Console

    from registry.data.mvtec import load_test_split
    from studies.demo import MAX_WIDTH, comparison_tables, decision_cell, per_category_table, wire_table

    builds = [store.build, *other_architectures.values(), *(b for bs in variant_builds.values() for b in bs)]
    console = Console(width=250, file=io.StringIO(), color_system=None)
    for table in comparison_tables(builds, builds[-1], {b.label: 1234.0 for b in builds}):
        console.print(table)
    console.print(per_category_table(builds[-1]))
    wire = wire_table()
    longest = max((f"{s.category}/{s.defect}/{s.path.name}" for s in load_test_split(sample_root)), key=len)
    wire.add_row(longest, "NG", "0.0001234", "0.50", decision_cell(True), "0.0001234", decision_cell(False),
                 "10", "1234.5")
    console.print(wire)
    lines = console.file.getvalue().splitlines()
    assert len(lines) > 2 * len(builds)
    assert max(len(line) for line in lines) <= MAX_WIDTH, "\n".join(lines)


def test_tensorrt_target_uses_symmetric_int8_activations(store, sample_root: Path, tmp_path: Path) -> None:
    from registry.data.mvtec import load_train_split
    from registry.pipeline import calibration_images
    from registry.variants.calibration import CalibrationAlgo, CalibrationData
    from registry.variants.ptq import quantize_int8

    reader = calibration_images(CalibrationData.real, load_train_split(sample_root), store.build.metadata, 8)
    out = quantize_int8(store.build.onnx_path, tmp_path / "trt.onnx", reader, CalibrationAlgo.minmax,
                        target="tensorrt")
    model = onnx.load(str(out))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    with pytest.raises(ValueError, match="unknown target"):
        quantize_int8(store.build.onnx_path, tmp_path / "x.onnx", reader, target="jetson")


def test_quant_study_command_is_mounted_and_refuses_an_empty_store(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(app, ["quant-study", "--home", str(tmp_path), "--out",
                                      str(tmp_path / "r.md")])
    assert result.exit_code == 2, result.output
    assert "run `make demo` first" in result.output
    assert not (tmp_path / "r.md").exists()


def test_export_folds_same_padding_into_the_convolutions(store) -> None:
    model = onnx.load(str(store.build.onnx_path))
    ops = [n.op_type for n in model.graph.node]
    assert "Pad" not in ops and ops.count("Conv") > 20
    padded = [n for n in model.graph.node if n.op_type == "Conv"
              and any(a.name == "pads" and list(a.ints) in ([0, 0, 1, 1], [1, 1, 2, 2]) for a in n.attribute)]
    assert padded  # the asymmetric TF "SAME" pads of the stride-2 convolutions live on the Conv now


def test_qat_learned_ranges_reach_the_int8_graph(sample_root: Path, tmp_path: Path) -> None:
    from onnx import numpy_helper

    from registry.architectures import ModelConfig, build_model
    from registry.data.mvtec import load_train_split
    from registry.export import export_onnx
    from registry.variants.calibration import ArrayReader, CalibrationAlgo, real_images
    from registry.variants.graph import is_layer
    from registry.variants.ptq import quantize_int8
    from registry.variants.qat import QATConfig, learned_overrides, qat_finetune

    train = load_train_split(sample_root)[:12]
    model = build_model("stfpm", ModelConfig(input_size=(64, 64)))
    result, state = qat_finetune(model, train, QATConfig(epochs=1, ranges="learned"), show_progress=False)
    assert state["bn_folded"] > 10 and len(result.history) == 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    path = export_onnx(model, tmp_path / "qat.onnx")
    overrides = learned_overrides(path, state)
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    assert len(overrides) == len({n.input[0] for n in graph.node if is_layer(n, inits)})
    out = quantize_int8(path, tmp_path / "qat-int8.onnx", ArrayReader(real_images(train, (64, 64), 4)),
                        CalibrationAlgo.minmax, tensor_overrides=overrides,
                        weight_preparation=False)  # as registry.pipeline quantizes QAT weights
    q = onnx.load(str(out)).graph
    qinits = {i.name: numpy_helper.to_array(i) for i in q.initializer}
    checked = 0
    for node in q.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in overrides:
            o = overrides[node.input[0]][0]
            lo, hi = min(float(o["rmin"]), 0.0), max(float(o["rmax"]), 0.0)
            assert float(qinits[node.input[1]]) == pytest.approx((hi - lo) / 255, rel=1e-3)
            checked += 1
    assert checked >= 5


def test_champion_rule_times_accurate_builds_side_by_side(store, other_architectures, sample_root) -> None:
    """Among builds within a point of the best image AUROC, the champion is the fastest when
    they are timed together, not the one whose own evaluation happened to time fastest; an
    inaccurate build never wins, however fast."""
    from dataclasses import replace

    from studies.demo import choose_champion

    def as_if(build, auroc: float, p50: float):  # noqa: ANN001, ANN202
        report = replace(build.report, metrics={**build.report.metrics, "image_auroc": auroc},
                         latency_ms_p50=p50)
        return replace(build, report=report)

    stfpm = as_if(store.build, 0.95, 50.0)  # its sequential timing looked slow
    us = as_if(other_architectures["us"], 0.948, 0.1)  # a lucky sequential timing; far slower really
    rd = as_if(other_architectures["rd"], 0.80, 0.01)  # fastest of all, but not accurate
    assert choose_champion([stfpm, us, rd]) is us  # the old rule: sequential numbers
    timings: dict[str, float] = {}
    assert choose_champion([stfpm, us, rd], sample_root, timings) is stfpm
    assert set(timings) == {stfpm.label, us.label} and timings[stfpm.label] < timings[us.label]

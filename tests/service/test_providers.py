"""The execution-provider check on a machine without a GPU: CUDA and TensorRT are requested,
ONNX Runtime has neither, so every version falls back to CPU with a warning, the scores are
the CPU ones exactly, and the report says so."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from cli.main import app
from loadtests.providers import BEGIN, END, check_providers

GPU = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


@pytest.fixture(autouse=True)
def _cpu_only() -> None:
    if set(GPU) & set(ort.get_available_providers()):
        pytest.skip("this ONNX Runtime has a GPU provider; the fallback path is not taken here")


def test_requested_gpu_providers_fall_back_to_cpu(store, sample_root: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="service.runtime.engine"):
        rows = check_providers(store.tracking_uri, store.model_name, sample_root, GPU,
                               versions=[str(store.version)], batch=4, seconds=0.4)
    assert [r.version for r in rows] == [str(store.version)]
    (row,) = rows
    assert row.accel.provider == row.cpu.provider == "CPUExecutionProvider"
    assert row.fell_back and row.requested == ",".join(GPU)
    assert row.max_score_diff == 0.0 and row.decisions_changed == 0 and row.images > 0
    assert row.accel.p50_ms > 0 and row.accel.images_per_s > 0 and row.accel.load_s > 0
    warned = [r.getMessage() for r in caplog.records if "not available here" in r.getMessage()]
    assert any("TensorrtExecutionProvider" in m for m in warned), warned
    assert any("CUDAExecutionProvider" in m for m in warned), warned


def test_unknown_model_is_a_clear_error(store, sample_root: Path) -> None:
    with pytest.raises(ValueError, match="no registered versions of 'no-such-model'"):
        check_providers(store.tracking_uri, "no-such-model", sample_root, GPU)


def test_providers_check_cli_writes_the_report(store, sample_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    out.write_text("# GPU\n\nmy reading\n")
    args = ["providers-check", "--tracking-uri", store.tracking_uri, "--model", store.model_name,
            "--versions", str(store.version), "--images", str(sample_root), "--batch", "2",
            "--seconds", "0.4", "--providers", "CUDAExecutionProvider", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "CPUExecutionProvider (fell back)" in r.output and "0 decisions changed" in r.output
    text = out.read_text()
    assert text.startswith("# GPU\n\nmy reading\n") and BEGIN in text and text.rstrip().endswith(END)
    assert f"\n| {store.version} | " in text and "CPUExecutionProvider (fell back)" in text
    assert "| 0 of " in text
    again = CliRunner().invoke(app, args)  # a rerun replaces the table, keeps the reading
    assert again.exit_code == 0, again.output
    assert out.read_text().count(BEGIN) == 1 and out.read_text().startswith("# GPU\n\nmy reading\n")


def test_unknown_version_is_a_clear_cli_error(store, sample_root: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["providers-check", "--tracking-uri", store.tracking_uri, "--versions",
                                 "999", "--images", str(sample_root), "--out", str(tmp_path / "x.md")])
    assert r.exit_code == 1
    assert "has no version 999 (has " in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.md").exists()

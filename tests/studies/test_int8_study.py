"""`anomaly int8-study` (studies/int8_cpus.py) without QEMU: the subset, the native columns,
the "not measured" emulated columns, and the section it writes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest


def test_subset_is_deterministic_balanced_and_in_order(sample_root: Path) -> None:
    from registry.data.mvtec import load_test_split
    from studies.int8_cpus import test_subset

    samples = load_test_split(sample_root)
    sub = test_subset(samples, 8)
    assert sub == test_subset(samples, 8) and len(sub) < len(samples)
    groups = Counter((s.category, s.label) for s in sub)
    assert set(groups) == {(s.category, s.label) for s in samples} and min(groups.values()) >= 2
    assert [samples.index(s) for s in sub] == sorted(samples.index(s) for s in sub)
    assert test_subset(samples, 0) == samples


def test_study_without_qemu_writes_its_section(store, sample_root: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from loadtests.report import replace_section
    from studies import int8_cpus

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    mlflow.set_tracking_uri(store.tracking_uri)
    monkeypatch.setattr(int8_cpus.shutil, "which", lambda name: None)  # no qemu-x86_64 on PATH
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\n## Other\n\nother text\n")
    result = int8_cpus.run_and_write(sample_root, doc, ["stfpm"], "anomaly int8-study", n_images=0,
                                     schemes=("u8s8-rr",))
    assert result.cpus.emulated is None
    assert [(r.architecture, r.scheme) for r in result.schemes] == [("stfpm", "fp32"), ("stfpm", "u8s8-rr")]
    fp32 = result.schemes[0]
    # The lean evaluation scores exactly as registry.evaluate.evaluate (the build's report).
    assert fp32.native.image_auroc == pytest.approx(store.build.report.image_auroc, abs=1e-9)
    assert fp32.native.pixel_auroc == pytest.approx(store.build.report.pixel_auroc, abs=1e-9)
    assert all(r.emulated is None and r.latency_ms_p50 > 0 for r in result.schemes)
    checks = {c.scheme: c for c in result.checks}
    assert checks["fp32"].native_error == 0 and 0 < checks["u8s8"].native_error < 10
    text = doc.read_text()
    assert text.count(int8_cpus.HEADING) == 1 and "other text" in text
    assert "not measured" in text and "| stfpm | u8s8-rr |" in text and "0.824" in text
    # The hand-written text between the markers survives a rerun.
    doc.write_text(text.replace(int8_cpus.DEFAULT_KEPT, "by hand: the demo of record"))
    section = int8_cpus.render(result.schemes, result.registered, result.checks, result.cpus,
                               command="anomaly int8-study", seconds=1.0, n_subset=5, n_test=10, probe=2,
                               version="commit x", kept=int8_cpus.kept_text(doc))
    replace_section(doc, int8_cpus.HEADING, section)
    text = doc.read_text()
    assert "by hand: the demo of record" in text and int8_cpus.DEFAULT_KEPT not in text
    assert text.count(int8_cpus.HEADING) == 1 and "other text" in text


def test_a_failed_emulated_child_leaves_its_models_not_measured(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from studies import int8_cpus

    def answers_one_then_fails(dirs, data_root, n_images, first=0):  # type: ignore[no-untyped-def]
        yield dirs[0], int8_cpus.Accuracy(0.5, 0.5, 1, 0.0, [0.1])
        raise RuntimeError("emulated child exited 1: killed")

    monkeypatch.setattr(int8_cpus, "emulated_accuracy", answers_one_then_fails)
    messages: list[str] = []
    out = int8_cpus._emulate([tmp_path / "a", tmp_path / "b"], tmp_path, 4, messages.append)
    assert list(out) == [tmp_path / "a"] and "1 model(s) not measured" in messages[-1]

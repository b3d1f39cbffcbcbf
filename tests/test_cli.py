"""`anomaly score` against the running server, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _anomaly(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})


def test_score_folder_prints_table(grpc_target: str, store, sample_root: Path) -> None:
    folder = sample_root / "brick" / "test" / "patch"
    proc = _anomaly("score", str(folder), "--target", grpc_target, "--category", "brick")
    assert proc.returncode == 0, proc.stderr
    assert "2 image(s) scored" in proc.stdout
    assert f"{store.model_name}/{store.version}" in proc.stdout


def test_score_missing_path_is_usage_error(grpc_target: str) -> None:
    proc = _anomaly("score", "/no/such/file.png", "--target", grpc_target)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_models_lists_loaded(grpc_target: str, store) -> None:
    proc = _anomaly("models", "--target", grpc_target)
    assert proc.returncode == 0, proc.stderr
    assert "stfpm" in proc.stdout and store.version in proc.stdout


def test_train_on_a_wrong_layout_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "img.png").write_bytes(b"not really")
    proc = _anomaly("train", "--data", str(tmp_path / "flat"), "--tracking-uri",
                    f"sqlite:///{tmp_path / 'm.db'}", "--work-dir", str(tmp_path / "w"))
    assert proc.returncode == 2
    assert "MVTec AD layout" in proc.stderr

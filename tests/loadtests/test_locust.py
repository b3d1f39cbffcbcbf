"""The Locust load test, run headless for real: bounded (a few seconds, loopback), both users
(gRPC and HTTP) against the session's real server and gateway, zero failures required."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtests" / "locustfile.py"


def _run_locust(tmp_path: Path, host: str, grpc_target: str, images: Path, seconds: int,
                *extra: str) -> tuple[dict[str, dict[str, str]], subprocess.CompletedProcess]:
    prefix = tmp_path / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4",
           "-t", f"{seconds}s", "--stop-timeout", "5", "--host", host, "--grpc-target", grpc_target,
           "--images", str(images), "--csv", str(prefix), "--html", str(tmp_path / "report.html"),
           "--only-summary", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    stats = Path(f"{prefix}_stats.csv")
    assert stats.is_file(), proc.stderr[-2000:]
    with stats.open(newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    return rows, proc


@pytest.mark.timeout(120)
def test_headless_run_has_no_failures(tmp_path: Path, grpc_target: str, http_base: str,
                                      sample_root: Path) -> None:
    rows, proc = _run_locust(tmp_path, http_base, grpc_target, sample_root, 8, "--category-from-path")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(rows["Score"]["Request Count"]) > 10, rows  # the gRPC user
    assert int(rows["/v1/score"]["Request Count"]) > 10, rows  # the HTTP user
    assert int(rows["Aggregated"]["Failure Count"]) == 0, rows
    assert (tmp_path / "report.html").stat().st_size > 10_000


@pytest.mark.timeout(120)
def test_failures_are_reported(tmp_path: Path, grpc_target: str, http_base: str,
                               sample_root: Path) -> None:
    """An alias the server does not know: every call fails and Locust counts each failure
    (so the zero above means something), and the run exits non-zero."""
    rows, proc = _run_locust(tmp_path, http_base, grpc_target, sample_root, 3, "--alias", "no-such-alias")
    assert proc.returncode != 0
    for name in ("Score", "/v1/score"):
        assert int(rows[name]["Request Count"]) > 0
        assert rows[name]["Failure Count"] == rows[name]["Request Count"], rows[name]
    failures = Path(f"{tmp_path / 'locust'}_failures.csv").read_text()
    assert "NOT_FOUND" in failures and "HTTP 404" in failures, failures

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


def test_json_output_of_score_and_models(grpc_target: str, store, sample_root: Path) -> None:
    import json

    folder = sample_root / "brick" / "test" / "patch"
    proc = _anomaly("score", str(folder), "--target", grpc_target, "--category", "brick", "--json",
                    "--model", f"models:/{store.model_name}@champion")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == 2 and all(r["model"]["name"] == store.model_name for r in lines)
    assert {r["image"] for r in lines} == {str(f) for f in folder.iterdir()}
    assert all(isinstance(r["score"], float) and r["is_anomalous"] in (True, False) for r in lines)
    proc = _anomaly("models", "--target", grpc_target, "--json")
    assert proc.returncode == 0, proc.stderr
    models = json.loads(proc.stdout)
    assert any(m["ref"]["version"] == store.version and "brick" in m["categories"] for m in models)


def test_version_and_one_line_errors_with_exit_codes(tmp_path: Path) -> None:
    """No tracebacks: a stopped server and an unreachable database are one line and exit 5; a
    database without an inspection log is one line and exit 1; a bad `models:/` URI is usage (2)."""
    from importlib.metadata import version

    proc = _anomaly("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"anomaly {version('edge-anomaly')}"
    from loadtests.launch import free_port

    stopped = f"127.0.0.1:{free_port()}"
    proc = _anomaly("models", "--target", stopped)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.startswith("error: UNAVAILABLE:") and proc.stderr.count("\n") == 1
    proc = _anomaly("inspections-export", str(tmp_path / "x.csv"), "--db",
                    f"postgresql://nobody@127.0.0.1:{free_port()}/x")
    assert proc.returncode == 5 and proc.stderr.startswith("error: database unavailable:"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    proc = _anomaly("shadow-report", "--json", "--db", f"sqlite:///{tmp_path / 'empty.db'}")
    assert proc.returncode == 1 and "holds no inspection log" in proc.stderr, proc.stderr
    proc = _anomaly("score", str(tmp_path), "--model", "models:/x/not-a-version")
    assert proc.returncode == 2 and "models:/<name>@<alias>" in proc.stderr


def test_a_taken_http_port_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """`anomaly serve --http` and `anomaly gateway` on a port another process holds: one error
    line naming the address, exit 1, no traceback (uvicorn exits 3 on its own)."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        from loadtests.launch import free_port

        proc = _anomaly("serve", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--port",
                        str(free_port()), "--http", "--http-port", str(taken))
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"could not listen on 127.0.0.1:{taken}" in proc.stderr and "Traceback" not in proc.stderr
        proc = _anomaly("gateway", "--port", str(taken))
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert f"could not listen on 127.0.0.1:{taken}" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        holder.close()


def test_scoring_against_a_stopped_server_exits_5(tmp_path: Path, sample_root: Path) -> None:
    from loadtests.launch import free_port

    image = next((sample_root / "brick" / "test" / "patch").glob("*.png"))
    for extra in ((), ("--json",)):
        proc = _anomaly("score", str(image), "--target", f"127.0.0.1:{free_port()}", "--timeout", "2", *extra)
        assert proc.returncode == 5, proc.stdout + proc.stderr

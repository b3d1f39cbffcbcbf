"""The SDK as plant software installs it: the `edge-anomaly-client` wheel alone, in a fresh
virtual environment, scores against a running server, and brings none of the server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_client_distribution_alone_scores_against_a_server(tmp_path: Path, grpc_target: str,
                                                                http_base: str, sample_root: Path,
                                                                store) -> None:
    wheel = subprocess.run([sys.executable, str(ROOT / "clients" / "dist" / "build.py"), "--out",
                            str(tmp_path / "dist")], capture_output=True, text=True, timeout=300, check=True)
    wheel_path = wheel.stdout.strip().splitlines()[-1]
    venv = tmp_path / "plant"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "-c", str(ROOT / "constraints.txt"),
                              wheel_path], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    image = next((sample_root / "brick" / "test" / "patch").glob("*.png"))
    program = textwrap.dedent(f"""
        import importlib.util, sys
        from edge_anomaly_client import AnomalyClient, AnomalyError, ScoreResult
        for target in ({grpc_target!r}, {http_base!r}):
            with AnomalyClient(target, timeout=30) as client:
                r = client.score({str(image)!r}, category="brick", request_id="plant-1")
                assert isinstance(r, ScoreResult) and r.request_id == "plant-1", r
                print(target, r.model.name, r.model.version, r.is_anomalous)
        try:
            with AnomalyClient({grpc_target!r}, retries=0) as client:
                client.score(b"not an image")
        except AnomalyError as exc:
            print("refused", exc.code)
        print("server-side", [m for m in ("service", "registry", "clients", "cli", "onnxruntime", "torch",
                                           "fastapi", "mlflow", "numpy") if importlib.util.find_spec(m)])
    """)
    proc = subprocess.run([python, "-c", program], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[1:3] == [store.model_name, store.version]
    assert lines[1].split()[1:3] == [store.model_name, store.version]
    assert lines[2] == "refused INVALID_ARGUMENT"
    assert lines[3] == "server-side []"
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert (site / "edge_anomaly_client" / "py.typed").exists()

"""KServe's and Triton's own Open Inference Protocol clients against the real server and
gateway: `tritonclient` gRPC and HTTP (health, metadata, a batch, load and unload) and
KServe's `InferenceGRPCClient` and `InferenceRESTClient`, run from the peers environment
(`make peers-venv`: they pin protobuf 6). Their decisions and scores equal `anomaly.v1`'s."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import register_tiny

from anomaly.channel import grpc_channel
from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SPARE = "spare-detector"


@pytest.mark.skipif(
    not PEERS_PYTHON.exists(), reason="no .venv-peers: run `make peers-venv` (make test does)"
)
def test_triton_and_kserve_clients(
    grpc_target: str, http_base: str, store, sample_root: Path, tmp_path: Path
) -> None:
    register_tiny(store, "none", tmp_path, aliases=("champion",), model_name=SPARE)
    test = sample_root / "brick" / "test"
    images = sorted((test / "good").glob("*.png"))[:2] + sorted((test / "patch").glob("*.png"))[:2]
    report = {}
    for client in ("triton", "kserve"):
        proc = subprocess.run(
            [
                str(PEERS_PYTHON),
                str(ROOT / "tests" / "peer_v2_clients.py"),
                client,
                grpc_target,
                http_base,
                store.model_name,
                SPARE,
                "brick",
                *map(str, images),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        report.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    with grpc_channel(grpc_target, aio=False) as channel:
        stub = pb_grpc.AnomalyDetectionStub(channel)
        v1 = [
            stub.Score(pb.ScoreRequest(encoded=p.read_bytes(), category="brick"), timeout=30) for p in images
        ]
    expected = {
        "score": [np.float32(r.score).item() for r in v1],
        "normalized_score": [np.float32(r.normalized_score).item() for r in v1],
        "threshold": [np.float32(r.threshold).item() for r in v1],
        "is_anomalous": [r.is_anomalous for r in v1],
    }
    assert expected["is_anomalous"][2:] == [True, True]
    for client in ("triton_grpc", "triton_http"):
        got = report[client]
        assert got["live"] and got["ready"] and got["model_ready"], client
        assert got["versions"] == [store.version] and got["inputs"] == ["image"], client
        assert got["result"] == expected, client
        assert got["spare_ready_after_load"] and not got["spare_ready_after_unload"], client
        assert "watched alias" in got["watched_unload"], client
    kserve = report["kserve"]
    assert kserve["grpc_ready"] and kserve["rest_ready"]
    assert kserve["grpc"] == expected and kserve["rest"] == expected

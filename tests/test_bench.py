"""The serving benchmark runs end to end (tiny budget) and reports ratios to bare ORT,
with stock `mlflow models serve` and KServe (from `.venv-peers`, which `make test` builds)
as peers, and a peer that cannot run reported as such; CUDA is requested and, on a
CPU-only ONNX Runtime, everything falls back to CPU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from loadtests import peers
from loadtests.bench import run_benchmark
from loadtests.targets import GRPC_OFF, GRPC_ON, GRPC_ONE, GRPC_RAW, GRPC_STREAM, HTTP, V2_GRPC
from loadtests.timing import BARE, LATENCY, SATURATION


@pytest.mark.timeout(600)
@pytest.mark.skipif(peers.kserve_python() is None, reason="no .venv-peers (make test builds it)")
def test_benchmark_small_run(store, sample_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Mine\n\nbefore\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nafter\n")
    results = run_benchmark(store.tracking_uri, store.model_name, "champion", sample_root,
                            seconds=1.0, rounds=2, concurrency=2, max_requests=40,
                            peers=("mlflow", "kserve"), out=out,
                            providers=("CUDAExecutionProvider",), max_batch_size=4)
    got = {(r.name, r.mode): r for r in results}
    for path in (BARE, GRPC_OFF, GRPC_RAW, GRPC_STREAM, GRPC_ON, GRPC_ONE, HTTP, V2_GRPC, peers.MLFLOW,
                 peers.KSERVE):
        for mode in (LATENCY, SATURATION):
            r = got[(path, mode)]
            assert r.images_per_s > 0 and 0 < r.p50_ms <= r.p99_ms, r
            assert len(r.per_round) == 2 and r.ratio > 0, r
    assert got[(BARE, SATURATION)].ratio == 1.0
    text = out.read_text()
    assert text.startswith("# Mine\n\nbefore") and text.rstrip().endswith("after")  # hand-written kept
    assert "old table" not in text and "| bare ORT | batch-1 latency |" in text
    assert "| mlflow models serve | saturation |" in text
    assert "Execution provider: CPUExecutionProvider." in text  # CUDA requested, not in this ORT
    assert "b=4 x" in text  # bare ORT probed at the batching server's batch size
    assert "| KServe ModelServer | saturation |" in text and "not measured" not in text
    assert text.count("\n| ") == 21  # header + 10 paths × 2 modes
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_peer_that_cannot_run_is_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANOMALY_KSERVE_PYTHON", str(tmp_path / "no-such-python"))

    async def start() -> list:
        async with peers.started(("kserve",), "sqlite:///m.db", "m", "1", [], [], tmp_path, 2) as targets:
            return targets

    assert asyncio.run(start()) == []
    assert peers.status_lines() == ["- KServe ModelServer: not measured (no environment with KServe (make "
                                    "peers-venv, or set ANOMALY_KSERVE_PYTHON))"]

"""The serving benchmark runs end to end (tiny budget) and reports ratios to bare ORT,
with stock `mlflow models serve` as a peer and KServe reported when it cannot run; CUDA
is requested and, on a CPU-only ONNX Runtime, everything falls back to CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests import peers
from loadtests.bench import run_benchmark
from loadtests.targets import GRPC_OFF, GRPC_ON, GRPC_ONE, GRPC_RAW, GRPC_STREAM, HTTP, V2_GRPC
from loadtests.timing import BARE, LATENCY, SATURATION


@pytest.mark.timeout(600)
def test_benchmark_small_run(store, sample_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANOMALY_KSERVE_PYTHON", str(tmp_path / "no-such-python"))
    out = tmp_path / "benchmarks.md"
    out.write_text("# Mine\n\nbefore\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nafter\n")
    results = run_benchmark(store.tracking_uri, store.model_name, "champion", sample_root,
                            seconds=1.0, rounds=2, concurrency=2, max_requests=40,
                            peers=("mlflow", "kserve"), out=out,
                            providers=("CUDAExecutionProvider",), max_batch_size=4)
    got = {(r.name, r.mode): r for r in results}
    for path in (BARE, GRPC_OFF, GRPC_RAW, GRPC_STREAM, GRPC_ON, GRPC_ONE, HTTP, V2_GRPC, peers.MLFLOW):
        for mode in (LATENCY, SATURATION):
            r = got[(path, mode)]
            assert r.images_per_s > 0 and 0 < r.p50_ms <= r.p99_ms, r
            assert len(r.per_round) == 2 and r.ratio > 0, r
    assert (peers.KSERVE, SATURATION) not in got
    assert got[(BARE, SATURATION)].ratio == 1.0
    text = out.read_text()
    assert text.startswith("# Mine\n\nbefore") and text.rstrip().endswith("after")  # hand-written kept
    assert "old table" not in text and "| bare ORT | batch-1 latency |" in text
    assert "| mlflow models serve | saturation |" in text
    assert "Execution provider: CPUExecutionProvider." in text  # CUDA requested, not in this ORT
    assert "b=4 x" in text  # bare ORT probed at the batching server's batch size
    assert "KServe ModelServer: not measured (no environment with KServe" in text
    assert text.count("\n| ") == 19  # header + 9 paths × 2 modes
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

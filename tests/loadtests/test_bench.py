"""The serving benchmark runs end to end (tiny budget) and reports ratios to bare ORT,
with stock `mlflow models serve`, KServe (V1 REST and V2 gRPC, from `.venv-peers`) and
MLServer's MLflow runtime (V2 REST and gRPC, from `.venv-mlserver`; `make test` builds both)
as peers, and a peer that cannot run reported as such; CUDA is requested and, on a
CPU-only ONNX Runtime, everything falls back to CPU."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from loadtests import peers
from loadtests.bench import run_benchmark
from loadtests.targets import (
    GRPC_EVIDENCE,
    GRPC_OFF,
    GRPC_ON,
    GRPC_ONE,
    GRPC_PROCS,
    GRPC_RAW,
    GRPC_STREAM,
    GRPC_TRACED,
    HTTP,
    HTTP_IN,
    V2_GRPC,
)
from loadtests.timing import BARE, LATENCY, SATURATION


@pytest.mark.timeout(600)
@pytest.mark.skipif(peers.kserve_python() is None, reason="no .venv-peers (make test builds it)")
@pytest.mark.skipif(peers.mlserver_bin() is None, reason="no .venv-mlserver (make test builds it)")
def test_benchmark_small_run(store, sample_root: Path, tmp_path: Path) -> None:
    from registry.data.sample import make_camera_frames

    make_camera_frames(tmp_path / "camera", n=2, size=(600, 960))
    out = tmp_path / "benchmarks.md"
    out.write_text("# Mine\n\nbefore\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nafter\n")
    results = run_benchmark(store.tracking_uri, store.model_name, "champion", sample_root,
                            seconds=0.5, rounds=2, concurrency=2, max_requests=40,
                            peers=("mlflow", "kserve", "mlserver"), out=out,
                            providers=("CUDAExecutionProvider",), max_batch_size=4,
                            camera_dir=tmp_path / "camera")
    got = {(r.name, r.mode): r for r in results}
    decoding = (GRPC_OFF, HTTP_IN, HTTP, V2_GRPC, peers.KSERVE, peers.KSERVE_V2)
    camera = [f"{p} [960×600 JPEG]" for p in decoding]
    every = (BARE, GRPC_OFF, GRPC_RAW, GRPC_STREAM, GRPC_TRACED, GRPC_EVIDENCE, GRPC_ON, GRPC_ONE, GRPC_PROCS,
             HTTP_IN, HTTP, V2_GRPC, peers.MLFLOW,
             peers.KSERVE, peers.KSERVE_V2, peers.MLSERVER_REST, peers.MLSERVER_GRPC, *camera)
    for path in every:
        for mode in (LATENCY, SATURATION):
            r = got[(path, mode)]
            assert r.images_per_s > 0 and 0 < r.p50_ms <= r.p99_ms, r
            assert len(r.per_round) == 2 and r.ratio > 0, r
        served = got[(path, SATURATION)].server_ms_per_image  # the serving processes' CPU per image
        assert (served != served) if path == BARE else served > 0, (path, served)
    assert got[(BARE, SATURATION)].ratio == 1.0
    text = out.read_text()
    assert text.startswith("# Mine\n\nbefore") and text.rstrip().endswith("after")  # hand-written kept
    assert "old table" not in text and "| bare ORT | batch-1 latency |" in text
    assert "| mlflow models serve | saturation |" in text
    assert "Execution provider: CPUExecutionProvider." in text  # CUDA requested, not in this ORT
    assert "b=4 x" in text  # bare ORT probed at the batching server's batch size
    assert "| KServe ModelServer | saturation |" in text and "not measured" not in text
    assert "| MLServer V2 gRPC | saturation |" in text and "| KServe V2 gRPC | saturation |" in text
    assert text.count("\n| ") == 1 + 2 * len(every)  # header + every path × 2 modes
    spans = re.search(re.escape(GRPC_TRACED) + r" \((\d+) spans exported", text)
    assert spans and int(spans.group(1)) > 0, text  # the traced server's spans reached the OTLP sink
    kept = re.search(re.escape(GRPC_EVIDENCE) + r" \((\d+) NG and (\d+) sampled OK parts kept", text)
    assert kept and int(kept.group(1)) > 0, text  # the sample data's defects were kept as evidence
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_peer_that_cannot_run_is_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ANOMALY_KSERVE_PYTHON", str(tmp_path / "no-such-python"))

    async def start() -> list:
        async with peers.started(("kserve",), "sqlite:///m.db", "m", "1", [], [], tmp_path, 2) as targets:
            return targets

    assert asyncio.run(start()) == []
    assert peers.status_lines() == ["- KServe ModelServer: not measured (no environment with KServe (make "
                                    "peers-venv, or set ANOMALY_KSERVE_PYTHON))"]


def test_an_mlserver_that_cannot_load_the_model_is_reported(tmp_path: Path, monkeypatch) -> None:
    """MLServer present (or a stand-in that exits at once) but the version not in the store:
    the peer is skipped with the reason and the log to read, and nothing is left running."""
    fake = tmp_path / "bin" / "mlserver"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'no such model' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("ANOMALY_MLSERVER", str(peers.mlserver_bin() or fake))
    uri = f"sqlite:///{tmp_path / 'empty.db'}"

    async def start() -> list:
        work = tmp_path / "work"
        work.mkdir()
        async with peers.started(("mlserver",), uri, "nope", "1", [], [], work, 1) as targets:
            return targets

    assert asyncio.run(start()) == []
    (line,) = peers.status_lines()
    assert line.startswith("- MLServer: not measured (did not start: ") and "mlserver.log" in line

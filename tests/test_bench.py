"""The serving benchmark runs end to end (tiny budget) and reports ratios to bare ORT."""

from __future__ import annotations

from pathlib import Path

from loadtests.bench import run_benchmark


def test_benchmark_small_run(store, sample_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    results = run_benchmark(store.tracking_uri, store.model_name, "champion", sample_root,
                            seconds=1.0, concurrency=2, max_requests=40, out=out)
    names = {(r.name, r.mode.split(" (")[0]) for r in results}
    for path in ("bare ORT", "gRPC (batching on)", "gRPC raw pixels (batching on)",
                 "gRPC (batching off)", "HTTP gateway"):
        assert (path, "batch-1 latency") in names and (path, "saturation") in names, path
    assert all(r.images_per_s > 0 and 0 < r.p50_ms <= r.p99_ms for r in results)
    text = out.read_text()
    assert "| bare ORT | batch-1 latency |" in text and "÷ bare ORT" in text
    assert text.count("\n| ") == 11  # header + 10 rows

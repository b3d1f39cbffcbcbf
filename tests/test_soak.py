"""The fault-injection soak, short (CI): `anomaly soak` against the session's trained model,
with every fault kind injected at least once. The run of record (≥ 10 minutes) is in
docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

from loadtests.soak import render, run_soak


def test_short_soak_loses_nothing_and_passes_no_defect(store, sample_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_soak(store.tracking_uri, store.model_name, "champion", sample_root, minutes=1.2,
                      work=tmp_path / "soak", progress=lines.append)
    report = render(result, "test_soak", "CI")
    print("\n".join(lines), report, sep="\n")
    assert [line for line in lines if "fault:" in line][:6], lines
    assert not result.failures(), report
    assert result.acknowledged > 50 and result.missing == 0
    assert result.broken_moves >= 2 and result.broken_swapped_in == 0
    assert result.good_moves == result.good_followed >= 2
    assert result.registry_outages >= 1 and result.db_outages >= 1 and result.server_kills >= 1, report
    assert any(k.startswith("HTTP 64 MiB chunked body: 413") for k in result.outcomes), result.outcomes
    assert result.gateway_chunked_growth_mb < 64

"""The fault-injection soak, short (CI): `anomaly soak` against the session's trained model,
with every fault kind injected at least once. The run of record (≥ 10 minutes) is in
docs/reliability.md."""

from __future__ import annotations

from pathlib import Path

from loadtests.soak import render, run_soak


def test_short_soak_loses_nothing_and_passes_no_defect(store, sample_root: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_soak(store.tracking_uri, store.model_name, "champion", sample_root, minutes=4.5,
                      work=tmp_path / "soak", progress=lines.append)
    report = render(result, "test_soak", "CI")
    print("\n".join(lines), report, sep="\n")
    assert len([line for line in lines if "fault:" in line]) >= 11, lines  # every kind at least once
    assert not result.failures(), report
    assert result.acknowledged > 50 and result.missing == 0
    assert result.broken_moves >= 2 and result.broken_swapped_in == 0
    assert result.good_moves == result.good_followed >= 2
    assert result.registry_outages >= 1 and result.db_outages >= 1 and result.server_kills >= 1, report
    # The fail-safe faults: none passed a refused version, a refused threshold, lost a record,
    # left an orphan or kept health from answering.
    assert result.refused_moves >= 1 and result.refused_served == 0
    assert result.threshold_escapes >= 1 and result.refused_threshold_served == 0
    assert result.disk_full >= 1 and result.damaged_segments >= 1 and result.damaged_set_aside >= 1, report
    assert result.watch_windows >= 1 and result.health_checks > 20 and result.health_failures == 0
    assert result.supervisor_kills >= 1 and result.orphans == 0
    assert any(k.startswith("HTTP 64 MiB chunked body: 413") for k in result.outcomes), result.outcomes
    assert result.gateway_chunked_growth_mb < 64


def test_short_hotfolder_soak_files_every_image_exactly_once(store, sample_root: Path,
                                                             tmp_path: Path) -> None:
    from loadtests.soak import render_hotfolder, run_hotfolder_soak

    lines: list[str] = []
    result = run_hotfolder_soak(store.tracking_uri, store.model_name, "champion", sample_root, minutes=1.2,
                                work=tmp_path / "hot", count=200, progress=lines.append)
    report = render_hotfolder(result, "test_soak", "CI")
    print("\n".join(lines[-20:]), report, sep="\n")
    assert not result.failures(), report
    assert result.scored_once == result.good_dropped > 200  # and the slow camera's image
    assert result.poison_filed == result.poison_dropped and result.poison_dropped["oversize"] >= 1
    assert result.server_kills >= 1 and result.db_outages >= 1

"""The robustness studies' bookkeeping: rows measured in different runs are merged by
(architecture, setup, options), and the report renders from the merged rows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from studies.robustness import Row, _load, _store, _table, families


def _row(arch: str, setup: str, auroc: float, extra: str = "") -> Row:
    return Row(arch, setup, auroc, 0.9, 0.8, {"coins": auroc}, 5.0, 10.0, 20, "abc1234", extra)


def test_rows_of_a_rerun_replace_only_their_own(tmp_path: Path) -> None:
    cache = tmp_path / "rows.json"
    _store(cache, [], [_row("stfpm", "family 2", 0.9), _row("us", "family 2", 0.7, "teacher_epochs=10")])
    rows = _store(cache, _load(cache), [_row("us", "family 2", 0.8, "teacher_epochs=10"),
                                        _row("us", "family 2", 0.75, "compactness=0, teacher_epochs=10")])
    assert sorted((r.architecture, r.extra, r.image_auroc) for r in _load(cache)) == sorted(
        (r.architecture, r.extra, r.image_auroc) for r in rows)
    assert {(r.architecture, r.extra): r.image_auroc for r in rows} == {
        ("stfpm", ""): 0.9, ("us", "teacher_epochs=10"): 0.8,
        ("us", "compactness=0, teacher_epochs=10"): 0.75}
    table = _table(rows, ["coins", "ihc"])
    assert table.splitlines()[0].startswith("| architecture | options | image AUROC")
    assert "| us | compactness=0, teacher_epochs=10 | 0.750 |" in table


def test_report_renders_from_the_cache_without_training(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "results.md"
    home.mkdir()
    out.write_text("# Results\n\n## Other\n\nkept\n")
    _store(home / "robustness.json", [], [_row("rd", "family 2", 0.88)])
    families(home, out, [], [], "anomaly families-study --arch ''")
    text = out.read_text()
    assert "## Other\n\nkept" in text and "## Two defect families" in text
    assert "| rd | - | 0.880 |" in text


@pytest.mark.parametrize(("extra", "message"), [
    ('{"teacher": "distilled"}', "no chosen architecture reads option(s) teacher"),
    ("{teacher: distilled}", "not JSON"),
    ('["teacher"]', "must be a JSON object"),
])
def test_families_study_refuses_bad_options_before_any_work(tmp_path: Path, extra: str, message: str) -> None:
    """`anomaly families-study --extra` with an option the chosen architectures do not read
    (or not a JSON object) is exit 2 with the reason, before any data is written or any
    model trained, and the report is left as it was."""
    home, out = tmp_path / "home", tmp_path / "results.md"
    out.write_text("# Results\n\nkept\n")
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "families-study", "--home", str(home), "--out", str(out),
         "--arch", "rd", "--families", "2", "--extra", extra],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).parents[2])})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not home.exists()
    assert out.read_text() == "# Results\n\nkept\n"

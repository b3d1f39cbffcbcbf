"""The review station (issue 40, point 2), driven from outside: a real server (inspection log
and evidence on, API keys with roles), the real gateway in front of it and the same pages in
the server's own process, and Debian's Chromium through Playwright as a quality engineer uses
it. The screenshots in docs/review.md are taken here."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, wait_for

from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, start_gateway, start_server, wait_http_ready

ROOT = Path(__file__).resolve().parents[2]
OPERATE, SCORE = "k-operate-review", "k-score-line"
KEYS = json.dumps([f"operate:qe:{OPERATE}", f"score:line:{SCORE}"])


def _basic(user: str, key: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


@pytest.fixture(scope="module")
def station(store, tmp_path_factory: pytest.TempPathFactory, good_and_defect):
    """A server keeping evidence, its gateway, its in-process HTTP, and parts scored on line 1:
    returns (gateway URL, in-process URL, inspection database, the NG part's request id)."""
    work = tmp_path_factory.mktemp("review")
    db, http_port = work / "inspections.db", free_port()
    env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{db}",
           "ANOMALY_EVIDENCE": "true", "ANOMALY_EVIDENCE_DIR": str(work / "evidence"),
           "ANOMALY_EVIDENCE_OK_FRACTION": "0", "ANOMALY_API_KEYS": KEYS,
           "ANOMALY_HTTP_IN_PROCESS": "true", "ANOMALY_HTTP_PORT": str(http_port)}
    server, target = start_server(store.tracking_uri, work / "server.log", cache_dir=store.home / "cache",
                                  env=env)
    gateway, base = start_gateway(target, work / "gateway.log")
    inproc = f"http://127.0.0.1:{http_port}"
    wait_http_ready(f"{inproc}/healthz", 30)
    try:
        goods, defects = good_and_defect
        parts = {**{f"SN-defect-{i}": p for i, p in enumerate(defects[:4])},
                 **{f"SN-good-{i}": p for i, p in enumerate(goods[:3])}}
        with AnomalyClient(target, api_key=SCORE) as client:
            answers = {rid: client.score(p.read_bytes(), request_id=rid, station="line-1",
                                         category=p.parent.parent.parent.name) for rid, p in parts.items()}
        flagged = max((a for a in answers.values() if a.is_anomalous), key=lambda a: a.score, default=None)
        assert flagged is not None, "the session's model should flag one of its defective parts"
        with sqlite3.connect(db) as conn:
            count = "SELECT COUNT(*) FROM inspections"
            wait_for(lambda: conn.execute(count).fetchone()[0] == len(answers), 30,
                     "every decision in the inspection database", retry_on=(sqlite3.OperationalError,))
        yield base, inproc, db, flagged.request_id
    finally:
        gateway.stop()
        assert server.stop() == 0, (work / "server.log").read_text()[-3000:]


def _feedback(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        query = "SELECT request_id, verdict, defect_type, operator, sender FROM feedback"
        return conn.execute(query).fetchall()


@pytest.mark.parametrize("where", ["gateway", "in-process"])
def test_a_reviewer_without_the_role_is_refused_and_nothing_is_recorded(station, where: str) -> None:
    base, inproc, db, part = station
    url = base if where == "gateway" else inproc
    before = _feedback(db)
    with httpx.Client(base_url=url, timeout=30) as http:
        anonymous = http.get("/review")
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic ")
        assert "text/html" in anonymous.headers["content-type"] and "operate" in anonymous.text
        wrong = http.get("/review", headers=_basic("Mallory", "not-a-key"))
        assert wrong.status_code == 401
        scorer = http.get("/review", headers=_basic("Line PC", SCORE))
        assert scorer.status_code == 403 and "needs the role operate" in scorer.text
        form = {"request_id": part, "verdict": "OK"}
        posted = http.post("/review/parts/x/verdict", data=form, headers=_basic("Line PC", SCORE))
        assert posted.status_code == 403
        unsigned = http.post("/review/parts/x/verdict", data=form)
        assert unsigned.status_code == 401
        # the right key, from another site's page (a forged form): refused before any call
        forged = http.post("/review/parts/x/verdict", data=form,
                           headers={**_basic("QE", OPERATE), "origin": "http://attacker.example"})
        assert forged.status_code == 403
        overlay = http.get("/review/parts/x/overlay.png", headers=_basic("Line PC", SCORE))
        assert overlay.status_code == 403
        assert http.get("/review/quality", headers=_basic("Line PC", SCORE)).status_code == 403
        # a password gRPC metadata cannot carry: refused as unsigned (and asked again), not a 500
        odd = http.get("/review", headers={"authorization": "Basic " + base64.b64encode(
            "QE:k-öp".encode()).decode()})
        assert odd.status_code == 401 and odd.headers["www-authenticate"].startswith("Basic ")
        # a browser's cached sign-in is a key on the review pages only: another site cannot make
        # API calls with it (here: model control with the operate key, or a part scored)
        signed_in = {**_basic("QE", OPERATE), "origin": "http://attacker.example"}
        assert http.post("/v2/repository/models/anomaly-detector/unload", headers=signed_in,
                         content=b"").status_code == 401
        assert http.post("/v1/score", headers={**signed_in, "content-type": "image/png"},
                         content=b"\x89PNG").status_code == 401
        # the operate key reads the queue; an unknown part is a 404 page, not an error
        page = http.get("/review", headers=_basic("QE", OPERATE))
        assert part in page.text and page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["cache-control"] == "no-store"
        assert http.get("/review/parts/0000", headers=_basic("QE", OPERATE)).status_code == 404
    assert _feedback(db) == before  # nothing recorded


sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                               "(the dev extra)")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: Debian's chromium package is not installed "
                                                  "(apt-get install chromium)")
def test_a_quality_engineer_confirms_a_flagged_part_in_the_browser(station) -> None:
    base, _, db, part = station
    docs = ROOT / "docs"
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            signed_in = {"username": "Quality Engineer", "password": OPERATE}
            context = browser.new_context(viewport={"width": 1280, "height": 800},  # a panel PC
                                          http_credentials=signed_in)
            page = context.new_page()
            page.goto(f"{base}/review?station=line-1")
            row = page.locator("tr", has=page.get_by_role("link", name=part, exact=True))
            thumb = row.locator("img.thumb")
            thumb.wait_for()
            loaded = "img => img.complete && img.naturalWidth > 0"
            wait_for(lambda: page.evaluate(loaded, thumb.element_handle()), 20, "the thumbnail to load")
            assert row.locator(".badge.NG").count() == 1
            page.screenshot(path=str(docs / "review-queue.png"))
            row.get_by_role("link", name=part, exact=True).click()
            page.wait_for_url("**/review/parts/**")
            heat = page.locator("#heat")
            assert page.evaluate("img => img.naturalWidth > 0", page.locator("#image").element_handle())
            assert page.evaluate("img => img.naturalWidth > 0", heat.element_handle())
            page.keyboard.press("]")  # the heat map a little more opaque, by keyboard
            assert heat.evaluate("img => img.style.opacity") == "0.7"
            page.screenshot(path=str(docs / "review-part.png"))
            page.keyboard.press("n")  # NG: the defect type first
            assert page.evaluate("document.activeElement.id") == "defect_type"
            page.keyboard.type("scratch")
            page.keyboard.press("Enter")
            page.wait_for_url("**/review?**recorded=**")
            assert f"Verdict recorded for {part}" in page.content()
            assert page.get_by_role("link", name=part, exact=True).count() == 0  # reviewed: off the queue
            page.get_by_role("link", name="Quality").click()  # the quality view, from the header
            page.wait_for_url("**/review/quality")
            chart = page.locator("section.chart").first
            assert "1 reviewed" in chart.inner_text() and chart.locator("svg rect").count() >= 4
            proposal = page.locator("table tbody tr").first
            assert "threshold." in proposal.inner_text() and "anomaly thresholds apply" in page.content()
            page.screenshot(path=str(docs / "review-quality.png"), full_page=True)
        finally:
            browser.close()
    recorded = [r for r in _feedback(db) if r[0] == part]
    assert recorded == [(part, "NG", "scratch", "Quality Engineer", "qe")]
    report = subprocess.run([sys.executable, "-m", "cli.main", "quality-report", "--db", f"sqlite:///{db}",
                             "--json"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert report.returncode == 0, report.stderr
    rows = [r for r in json.loads(report.stdout)["rows"] if r["station"] == "line-1"]
    assert sum(r["reviewed"] for r in rows) == 1 and sum(r["false_calls"] + r["escapes"] for r in rows) == 0

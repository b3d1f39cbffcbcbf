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
import time
from pathlib import Path
from typing import NamedTuple

import grpc
import httpx
import pytest
from conftest import CHROMIUM, CHROMIUM_ARGS, register_copy, wait_for
from mlflow import MlflowClient

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from edge_anomaly_client.sdk import AnomalyClient
from loadtests.launch import free_port, start_gateway, start_server, wait_http_ready

ROOT = Path(__file__).resolve().parents[2]
OPERATE, SCORE = "k-operate-review", "k-score-line"
LINE, CHALLENGER = "review-line", "review-challenger"  # the aliases the station serves and shadows
KEYS = json.dumps([f"operate:qe:{OPERATE}", f"score:line:{SCORE}"])


class Station(NamedTuple):
    base: str  # the gateway's URL
    target: str  # the server's gRPC address
    inproc: str  # the server's own HTTP
    db: Path  # the inspection database
    part: str  # the request id of the part flagged NG with the highest score
    blind: str  # the challenger's version (it passes every part)
    served: str  # the version the line's alias serves
    flagged: int  # how many parts the served version flagged NG


@pytest.fixture(scope="module")
def client(store) -> MlflowClient:
    return MlflowClient(tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri)


def _basic(user: str, key: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}


@pytest.fixture(scope="module")
def station(store, client, tmp_path_factory: pytest.TempPathFactory, good_and_defect):
    """A server keeping evidence, following a shadow challenger that passes every part, its
    gateway, its in-process HTTP, and parts scored on line 1: returns (gateway URL, in-process
    URL, inspection database, the NG part's request id)."""
    work = tmp_path_factory.mktemp("review")
    db, http_port = work / "inspections.db", free_port()
    client.set_registered_model_alias(store.model_name, LINE, store.version)
    blind = register_copy(store, work, "review-blind", threshold_scale=1e6)  # passes every part
    client.set_registered_model_alias(store.model_name, CHALLENGER, blind)
    env = {"ANOMALY_INSPECTION_LOG": "true", "ANOMALY_INSPECTION_DB_URL": f"sqlite:///{db}",
           "ANOMALY_EVIDENCE": "true", "ANOMALY_EVIDENCE_DIR": str(work / "evidence"),
           "ANOMALY_EVIDENCE_OK_FRACTION": "0", "ANOMALY_API_KEYS": KEYS,
           "ANOMALY_HTTP_IN_PROCESS": "true", "ANOMALY_HTTP_PORT": str(http_port),
           "ANOMALY_SHADOW_ALIAS": CHALLENGER, "ANOMALY_POLL_INTERVAL_S": "0.3"}
    server, target = start_server(store.tracking_uri, work / "server.log", cache_dir=store.home / "cache",
                                  alias=LINE, env=env)
    gateway, base = start_gateway(target, work / "gateway.log")
    inproc = f"http://127.0.0.1:{http_port}"
    wait_http_ready(f"{inproc}/healthz", 30)
    try:
        goods, defects = good_and_defect
        parts = {**{f"SN-defect-{i}": p for i, p in enumerate(defects[:4])},
                 **{f"SN-good-{i}": p for i, p in enumerate(goods[:3])}}
        with AnomalyClient(target, api_key=SCORE) as client:
            answers = {}
            for rid, p in parts.items():
                answers[rid] = client.score(p.read_bytes(), request_id=rid, station="line-1",
                                            category=p.parent.parent.parent.name)
                time.sleep(0.05)  # one at a time: every part is shadowed
        flagged = max((a for a in answers.values() if a.is_anomalous), key=lambda a: a.score, default=None)
        assert flagged is not None, "the session's model should flag one of its defective parts"
        with sqlite3.connect(db) as conn:
            count = "SELECT COUNT(*) FROM inspections WHERE role = ?"
            wait_for(lambda: [conn.execute(count, (r,)).fetchone()[0] for r in ("serve", "shadow")]
                     == [len(answers)] * 2, 30, "every decision and its shadow in the inspection database",
                     retry_on=(sqlite3.OperationalError,))
        yield Station(base, target, inproc, db, flagged.request_id, blind, store.version,
                      sum(a.is_anomalous for a in answers.values()))
    finally:
        gateway.stop()
        assert server.stop() == 0, (work / "server.log").read_text()[-3000:]


def _feedback(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        query = "SELECT request_id, verdict, defect_type, operator, sender FROM feedback"
        return conn.execute(query).fetchall()


@pytest.mark.parametrize("where", ["gateway", "in-process"])
def test_a_reviewer_without_the_role_is_refused_and_nothing_is_recorded(station, where: str) -> None:
    base, inproc, db, part = station.base, station.inproc, station.db, station.part
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
        assert http.get("/review/promotion", headers=_basic("Line PC", SCORE)).status_code == 403
        assert http.get("/review/promotion").status_code == 401
        for days in ("abc", "0", "367", "1e3", "99999999999999999999"):  # a page that says so, not JSON
            bad = http.get(f"/review/promotion?days={days}", headers=_basic("QE", OPERATE))
            assert bad.status_code == 400 and "text/html" in bad.headers["content-type"], (days, bad.text)
            assert "days must be" in bad.text
            assert http.get(f"/review/quality?days={days}", headers=_basic("QE", OPERATE)).status_code == 400
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
    base, db, part = station.base, station.db, station.part
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
            # reviewed: off the queue once the verdict reached the database (shipped from the spool)
            gone = lambda: page.reload() or page.get_by_role("link", name=part, exact=True).count() == 0  # noqa: E731
            wait_for(gone, 20, "the reviewed part off the queue")
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


def _promotion(target: str) -> pb.Promotion:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.AnomalyDetectionStub(channel)
        return stub.GetPromotion(pb.GetPromotionRequest(), metadata=[("x-api-key", OPERATE)], timeout=30)


@pytest.fixture(scope="module")
def refused_move(station: Station, store, client: MlflowClient) -> pb.Promotion:
    """The line's alias moved in the registry to the challenger (it passes every part): the gate
    refuses it, and the line keeps its version. Returns the promotion view then."""
    client.set_registered_model_alias(store.model_name, LINE, station.blind)
    try:
        def judged() -> pb.Promotion | None:
            found = _promotion(station.target)
            wanted = (station.blind, "server", LINE)
            refused = any(a.alias == LINE and a.last_error_version == station.blind for a in found.aliases)
            judged = any((v.version, v.origin, v.alias) == wanted for v in found.verdicts)
            recorded = any((v.version, v.origin) == (station.blind, "registry") for v in found.verdicts)
            return found if refused and judged and recorded else None  # the registry's read: ≤ 10 s old

        return wait_for(judged, 60, "the gate's verdict on the move")
    finally:  # the line's alias back where it serves: the server has nothing to judge
        client.set_registered_model_alias(store.model_name, LINE, station.served)


def test_the_promotion_view_shows_what_serves_the_gate_and_the_challenger(station: Station,
                                                                          refused_move: pb.Promotion) -> None:
    """GetPromotion (role operate) answers what the promotion page draws: each alias and its
    version, the refusal with the known defects that would have passed (thumbnails), the
    registry's record of it, and the challenger's disagreements with the served answers."""
    view = refused_move
    aliases = {a.alias: a for a in view.aliases}
    assert (aliases[LINE].role, aliases[LINE].version) == ("served", station.served)
    assert aliases[LINE].last_error_version == station.blind
    assert "would pass as OK" in aliases[LINE].last_error
    assert (aliases[CHALLENGER].role, aliases[CHALLENGER].version) == ("shadow", station.blind)
    refusal = next(v for v in view.verdicts if v.origin == "server" and v.version == station.blind)
    assert (refusal.status, refusal.alias, refusal.against) == ("refused", LINE, station.served)
    assert refusal.known_parts > len(refusal.parts) > 0
    for i, part in enumerate(refusal.parts):  # every known defect passes the blind version
        assert part.why.startswith("escape") and (part.expect, part.got) == ("NG", "OK")
        assert i >= 5 or part.label in refusal.reason  # the reason names the first five
        assert part.thumbnail_jpeg.startswith(b"\xff\xd8\xff")  # a JPEG
    recorded = next(v for v in view.verdicts if v.origin == "registry" and v.version == station.blind)
    assert recorded.status == "refused" and recorded.against == station.served and not recorded.parts
    versions = (station.served, station.blind)
    pairs = [r for r in view.shadow if (r.served_version, r.shadow_version) == versions]
    assert sum(r.pairs for r in pairs) == 7 and sum(r.ok_to_ng_count for r in pairs) == 0
    assert sum(r.ng_to_ok_count for r in pairs) == station.flagged == sum(len(r.ng_to_ok) for r in pairs)
    assert sum(r.agree for r in pairs) == 7 - station.flagged
    with grpc.insecure_channel(station.target) as channel:  # the role operate, as every review call
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.AnomalyDetectionStub(channel).GetPromotion(
                pb.GetPromotionRequest(), metadata=[("x-api-key", SCORE)], timeout=30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_refusal_the_override_cannot_force_keeps_its_parts(station: Station, store,
                                                              client: MlflowClient) -> None:
    """`gate.override=true` without who and why: refused again, the reason saying the override
    was not honoured, and the view still shows the known parts and their count."""
    from service.promotion.rules import GATE_OVERRIDE

    client.set_model_version_tag(store.model_name, station.blind, GATE_OVERRIDE, "true")
    client.set_registered_model_alias(store.model_name, LINE, station.blind)
    try:
        def judged() -> pb.GateVerdict | None:
            return next((v for v in _promotion(station.target).verdicts if v.origin == "server"
                         and v.version == station.blind and "not honoured" in v.reason), None)

        refusal = wait_for(judged, 60, "the verdict with the unheeded override")
        assert refusal.status == "refused" and refusal.known_parts > 0 and refusal.parts
        assert all(p.thumbnail_jpeg for p in refusal.parts)
    finally:
        client.set_registered_model_alias(store.model_name, LINE, station.served)
        client.delete_model_version_tag(store.model_name, station.blind, GATE_OVERRIDE)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: Debian's chromium package is not installed "
                                                  "(apt-get install chromium)")
def test_the_promotion_page_in_the_browser(station: Station, refused_move: pb.Promotion) -> None:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800},
                                          http_credentials={"username": "QE", "password": OPERATE})
            page = context.new_page()
            page.goto(f"{station.base}/review")
            page.get_by_role("link", name="Promotion").click()  # from the header
            page.wait_for_url("**/review/promotion")
            served = page.locator("#aliases tr", has_text=f"@{LINE}")
            assert "served" in served.inner_text() and station.served in served.inner_text()
            verdict = page.locator("section.verdict", has=page.locator(".status.refused")).first
            assert f"version {station.blind} for @{LINE}" in verdict.inner_text()
            thumbs = verdict.locator(".parts img")
            assert thumbs.count() > 0
            loaded = "img => img.complete && img.naturalWidth > 0"
            assert all(page.evaluate(loaded, thumbs.nth(i).element_handle()) for i in range(thumbs.count()))
            assert "escape" in verdict.inner_text()
            assert page.locator("#shadow tbody tr").count() >= 1
            page.screenshot(path=str(ROOT / "docs" / "review-promotion.png"), full_page=True)
        finally:
            browser.close()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="no browser: Debian's chromium package is not installed "
                                                  "(apt-get install chromium)")
@pytest.mark.parametrize("viewport", [(800, 1280), (1280, 800)], ids=["portrait", "landscape"])
def test_every_page_fits_a_tablet_and_reads_at_arms_length(station: Station,
                                                           viewport: tuple[int, int]) -> None:
    """No page scrolls sideways on a tablet (wide tables scroll in their own box), and no text is
    under 16 px (the charts' axis labels scale with them)."""
    fits = "() => document.documentElement.scrollWidth <= window.innerWidth"
    smallest = """() => [...document.querySelectorAll('body *')]
        .filter(e => e.offsetParent !== null && !e.closest('svg')
                && [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))
        .map(e => [parseFloat(getComputedStyle(e).fontSize),
                   e.tagName + ': ' + e.textContent.trim().slice(0, 30)])
        .sort((a, b) => a[0] - b[0])[0]"""
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            width, height = viewport
            context = browser.new_context(viewport={"width": width, "height": height}, has_touch=True,
                                          is_mobile=True, device_scale_factor=2,
                                          http_credentials={"username": "QE", "password": OPERATE})
            page = context.new_page()
            for path in ("/review?reviewed=true", f"/review/parts/{station.part}", "/review/quality",
                         "/review/promotion"):
                page.goto(f"{station.base}{path}")
                assert page.evaluate(fits), f"{path} scrolls sideways at {width}×{height}"
                size, text = page.evaluate(smallest)
                assert size >= 16, f"{path} at {width}×{height}: {text!r} is {size} px"
        finally:
            browser.close()

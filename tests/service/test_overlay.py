"""Overlays (issue 40, point 3): the image with its heat map and the defect region outlined,
over gRPC (`return_overlay`) and HTTP (`POST /v1/score?render=overlay` answers the PNG itself,
for MES screens), from the session's real server and gateway; and the drawing's rules on
hand-made maps (the region follows the decision: none for OK, never none for NG)."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from edge_anomaly_client.sdk import AnomalyClient, AnomalyError
from service.runtime.imaging import OUTLINE_RGB, OVERLAY_MAX_SIDE, overlay_base, overlay_png

MAGENTA = np.array(OUTLINE_RGB, np.uint8)


def _outlined(png: bytes) -> int:
    """Pixels of the region's outline colour in an overlay."""
    arr = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return int((arr == MAGENTA).all(axis=-1).sum())


Parts = tuple[list[Path], list[Path]]


def test_overlays_over_grpc_and_http_follow_the_decision(grpc_target: str, http_base: str,
                                                          good_and_defect: Parts) -> None:
    images = [p.read_bytes() for p in (*good_and_defect[0][:3], *good_and_defect[1][:4])]
    with AnomalyClient(grpc_target) as client, httpx.Client(base_url=http_base, timeout=60) as http:
        results = [client.score(image, return_overlay=True, request_id=f"overlay-{i}")
                   for i, image in enumerate(images)]
        assert {r.is_anomalous for r in results} == {True, False}, "the session's model should call both"
        for image, result in zip(images, results, strict=True):
            overlay = Image.open(io.BytesIO(result.overlay_png))
            assert overlay.format == "PNG" and overlay.mode == "RGB"
            assert overlay.size == Image.open(io.BytesIO(image)).size  # 160 px: under the 1024 px cap
            assert not result.anomaly_map_png  # an overlay alone does not send the map too
            assert (_outlined(result.overlay_png) > 0) == result.is_anomalous
            plain = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"), np.int16)
            change = np.abs(np.asarray(overlay, np.int16) - plain)
            assert change.max() > 0  # the heat map is drawn: faint where the map is cold,
            if result.is_anomalous:  # strong where it is hot
                assert change.max() >= 40
        # HTTP: the PNG itself, the decision in headers, the same as over gRPC
        ng = next(i for i, r in enumerate(results) if r.is_anomalous)
        r = http.post("/v1/score", content=images[ng], params={"render": "overlay", "request_id": "ov-http"},
                      headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["x-request-id"] == "ov-http"
        assert r.headers["x-anomaly-decision"] == "NG" and r.headers["cache-control"] == "no-store"
        assert float(r.headers["x-anomaly-score"]) == pytest.approx(results[ng].score, rel=1e-6)
        assert float(r.headers["x-anomaly-threshold"]) == pytest.approx(results[ng].threshold)
        assert r.headers["x-anomaly-model"].startswith("anomaly-detector/")
        assert r.content == results[ng].overlay_png  # the same drawing either way
        # in JSON, on request, beside the decision
        body = http.post("/v1/score", content=images[ng], params={"return_overlay": "true"},
                         headers={"content-type": "image/png"}).json()
        assert body["overlay_png_base64"] and body["anomaly_map_png_base64"] is None
        plain = http.post("/v1/score", content=images[ng], headers={"content-type": "image/png"}).json()
        assert plain["overlay_png_base64"] is None
        bad = http.post("/v1/score", content=images[ng], params={"render": "jpeg"},
                        headers={"content-type": "image/png"})
        assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"
        broken = http.post("/v1/score", content=b"not an image", params={"render": "overlay"},
                           headers={"content-type": "image/png"})
        assert broken.status_code == 400 and broken.headers["content-type"] == "application/problem+json"


def test_the_drawing_outlines_the_region_it_is_given_and_caps_the_size() -> None:
    base = overlay_base(Image.new("RGB", (3000, 1500), (90, 90, 90)))
    assert base.shape == (OVERLAY_MAX_SIDE // 2, OVERLAY_MAX_SIDE, 3) and base.dtype == np.uint8
    amap = np.zeros((64, 64), np.float32)
    amap[20:30, 40:50] = 1.0
    region = amap >= 0.5
    png = overlay_png(base, amap, 0.0, 1.0, region)
    arr = np.asarray(Image.open(io.BytesIO(png)))
    outline = (arr == MAGENTA).all(axis=-1)
    ys, xs = np.nonzero(outline)
    # the square's border, scaled from the 64-px map to the 1024 x 512 image
    assert 20 / 64 * 512 - 3 <= ys.min() and ys.max() <= 30 / 64 * 512 + 3
    assert 40 / 64 * 1024 - 3 <= xs.min() and xs.max() <= 50 / 64 * 1024 + 3
    assert not outline[int(25 / 64 * 512), int(45 / 64 * 1024)]  # outlined, not filled
    assert _outlined(overlay_png(base, amap, 0.0, 1.0, np.zeros_like(region))) == 0
    gray = overlay_base(np.full((10, 20), 7, np.uint8))  # a gray raw image
    assert gray.shape == (10, 20, 3)


def test_an_overlay_the_decode_budget_can_never_hold_is_refused_at_once(store, tmp_path: Path) -> None:
    """A 1000 × 1000 overlay needs ~76 MB to draw; with 16 MB of decode memory it is a clear 400
    before any work (not a 429 the client would retry for ever); without an overlay, 200."""
    from loadtests.launch import start_server

    child, target = start_server(store.tracking_uri, tmp_path / "server.log", cache_dir=store.home / "cache",
                                 env={"ANOMALY_DECODE_MEMORY_MB": "16"})
    buf = io.BytesIO()
    Image.fromarray(np.full((1000, 1000, 3), 90, np.uint8)).save(buf, format="PNG")
    try:
        with AnomalyClient(target) as client:
            with pytest.raises(AnomalyError, match="ANOMALY_DECODE_MEMORY_MB") as refused:
                client.score(buf.getvalue(), return_overlay=True)
            assert refused.value.code == "INVALID_ARGUMENT"
            assert client.score(buf.getvalue()).score >= 0
    finally:
        assert child.stop() == 0

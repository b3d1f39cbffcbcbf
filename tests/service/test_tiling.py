"""Tiling for large images: the split/stitch geometry, the engine against a hand-stitched
reference with the session's real ONNX model, and a tiled version served over gRPC."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TEST_INPUT, register_copy
from PIL import Image

from anomaly.v1 import anomaly_pb2 as pb
from anomaly.v1 import anomaly_pb2_grpc as pb_grpc
from edge_anomaly_client.sdk import AnomalyClient
from service.runtime.engine import OnnxModel
from service.runtime.imaging import decode_image, preprocess
from service.runtime.tiling import Tiling, axis_origins, image_score, origins, scored_region, split, stitch

# 320×448 working size, 128-pixel tiles every 96 pixels: overlapping, last tiles flush with the edge.
TILING = Tiling(image_height=320, image_width=448, stride=96, score_margin=4)


def _synthetic(height: int = 640, width: int = 896) -> bytes:
    """A large camera-like frame: a smooth gradient, seeded noise and one small bright spot."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:height, 0:width]
    base = (60 + 80 * xx / width + 40 * yy / height)[..., None] + rng.normal(0, 8, (height, width, 3))
    base[400:412, 600:614] = 250
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_origins_cover_the_axis_flush_with_its_end() -> None:
    assert axis_origins(320, 128, 96) == [0, 96, 192]
    assert axis_origins(448, 128, 96) == [0, 96, 192, 288, 320]
    assert axis_origins(256, 128, 128) == [0, 128]
    assert axis_origins(128, 128, 64) == [0]
    with pytest.raises(ValueError, match="does not fit"):
        axis_origins(100, 128, 64)


def test_split_then_stitch_gives_back_the_image() -> None:
    chw = np.random.default_rng(0).random((3, 320, 448), dtype=np.float32)
    tiles = split(chw, (128, 128), 96)
    assert tiles.shape == (15, 3, 128, 128)
    y, x = origins((320, 448), (128, 128), 96)[7]
    np.testing.assert_array_equal(tiles[7], chw[:, y:y + 128, x:x + 128])
    np.testing.assert_allclose(stitch(tiles[:, 1], (320, 448), 96), chw[1], rtol=1e-6)
    np.testing.assert_allclose(stitch(tiles[:, 1], (320, 448), 96, margin=4), chw[1], rtol=1e-5)


def test_tiling_rejects_a_margin_that_leaves_nothing() -> None:
    with pytest.raises(ValueError, match="score_margin"):
        Tiling(image_height=64, image_width=64, stride=32, score_margin=32)


@pytest.mark.parametrize("tiling", [
    Tiling(image_height=320, image_width=448, stride=TEST_INPUT + 1),  # gaps between tiles
    Tiling(image_height=64, image_width=448, stride=96),  # smaller than one tile
])
def test_a_tiling_that_leaves_pixels_unscored_is_refused_at_load(store, tiling: Tiling) -> None:
    from service.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not fit"):
        OnnxModel(store.build.onnx_path, store.build.metadata.model_copy(update={"tiling": tiling}))


def test_engine_matches_a_hand_stitched_reference(store) -> None:
    """The engine's tiled path against the obvious loop: resize to the working size, run
    every tile alone, add its map into place weighted 1 inside and 1e-3 on its 4-pixel
    border band, divide by the summed weights, take the maximum over the tiles' interiors."""
    md = store.build.metadata.model_copy(update={"tiling": TILING})
    model = OnnxModel(store.build.onnx_path, md)
    image = decode_image(_synthetic())
    scores, maps = model.infer(model.prepare(image)[None])
    assert maps.shape == (1, 320, 448)

    full = preprocess(image, (320, 448))
    total, weight = np.zeros((320, 448)), np.zeros((320, 448))
    interior = np.zeros((320, 448), dtype=bool)
    w = np.full((TEST_INPUT, TEST_INPUT), 1e-3)
    w[4:-4, 4:-4] = 1.0
    for y in (0, 96, 192):
        for x in (0, 96, 192, 288, 320):
            _, amap = model.run(full[None, :, y:y + TEST_INPUT, x:x + TEST_INPUT])
            total[y:y + TEST_INPUT, x:x + TEST_INPUT] += amap[0] * w
            weight[y:y + TEST_INPUT, x:x + TEST_INPUT] += w
            interior[y + 4:y + TEST_INPUT - 4, x + 4:x + TEST_INPUT - 4] = True
    reference = total / weight
    np.testing.assert_allclose(maps[0], reference, rtol=1e-4, atol=1e-5)
    # stride 96 ≤ 128 − 2·4: every pixel but the image's own 4-pixel border is scored
    assert interior.sum() == (320 - 8) * (448 - 8)
    assert scores[0] == pytest.approx(reference[interior].max(), rel=1e-5)
    assert scores[0] == pytest.approx(image_score(maps[0], interior), rel=1e-6)
    # Two images in one call give the same as each alone (the batched path).
    other = decode_image(_synthetic(480, 640))
    both_scores, both_maps = model.infer(np.stack([model.prepare(image), model.prepare(other)]))
    np.testing.assert_allclose(both_maps[0], maps[0], rtol=1e-4, atol=1e-5)
    assert both_scores[1] == pytest.approx(model.infer(model.prepare(other)[None])[0][0], rel=1e-4)


def test_without_overlap_the_bands_between_tiles_are_not_scored() -> None:
    region = scored_region((256, 256), (128, 128), 128, 4)
    assert region[4:124, 4:124].all() and not region[124:132, :].any() and not region[:, 124:132].any()
    assert Tiling.full_coverage_stride(128, 4) == 120
    assert scored_region((256, 256), (128, 128), 120, 4)[4:-4, 4:-4].all()


def test_a_tiled_version_is_served_over_grpc(store, grpc_target: str, http_base: str, tmp_path: Path) -> None:
    version = register_copy(store, tmp_path, "fp32", model_name="tiled-detector", aliases=("champion",),
                            metadata={"tiling": TILING})
    md = store.build.metadata.model_copy(update={"tiling": TILING})
    local = OnnxModel(store.build.onnx_path, md)
    data = _synthetic()
    expected = local.infer(local.prepare(decode_image(data))[None])[0][0]
    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.AnomalyDetectionStub(channel)
        reply = stub.Score(pb.ScoreRequest(encoded=data, model="tiled-detector", category="brick",
                                           return_anomaly_map=True), timeout=60)
        untiled = stub.Score(pb.ScoreRequest(encoded=data, category="brick"), timeout=60)
        info = stub.GetModel(pb.GetModelRequest(model="tiled-detector"), timeout=30)
    assert (info.tiling.image_height, info.tiling.image_width, info.tiling.stride) == (320, 448, 96)
    assert reply.model.version == version
    assert reply.score == pytest.approx(expected, rel=1e-4)
    assert reply.score != pytest.approx(untiled.score, rel=1e-3)  # a different view of the image
    heat = Image.open(io.BytesIO(reply.anomaly_map_png))
    assert heat.size == (896, 640)  # the stitched map, shown at the original size
    with AnomalyClient(http_base) as client:  # the gateway describes it the same way
        assert client.get_model(model="tiled-detector").tiling == (320, 448, 96)
        assert client.get_model().tiling is None

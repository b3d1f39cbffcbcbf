"""Tiling for images much larger than the model input (anomalib #1401, #1172).

A tiled model sees the image at a fixed *working size* (`Tiling.image_height` ×
`image_width`, e.g. 1024² for a 2048² camera frame), cut into tiles of the model's input
size every `stride` pixels (stride < tile: overlapping tiles). The tiles run as one batch;
their anomaly maps are stitched back into one working-size map and the image score is the
maximum of the stitched map over the pixels inside some tile's interior, i.e. away from
every tile's border band of `score_margin` pixels (the band an untiled model's score
ignores: zero padding makes its features unreliable, and on a 2048² test category the
spurious maxima of good frames sat on tile borders). Overlaps are averaged with the border
bands nearly weightless. With `stride` = tile − 2·margin every pixel away from the image
border is scored; with stride = tile the bands between tiles are not. Training,
calibration, evaluation and serving all go through these functions, so a threshold means
the same everywhere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, model_validator

from service.runtime.imaging import preprocess


class Tiling(BaseModel):
    """How a model covers a large image (stored in its `anomaly_model.json`)."""

    image_height: int = Field(gt=0, description="working height the image is resized to first")
    image_width: int = Field(gt=0, description="working width the image is resized to first")
    stride: int = Field(gt=0, description="pixels between tile origins (< tile side: overlap)")
    score_margin: int = Field(0, ge=0, description="border band of each tile the image score ignores")

    @model_validator(mode="after")
    def _fits(self) -> Tiling:
        if 2 * self.score_margin >= min(self.image_height, self.image_width):
            raise ValueError("score_margin leaves nothing of the image")
        return self

    @staticmethod
    def full_coverage_stride(tile: int, margin: int) -> int:
        """The largest stride at which every pixel away from the image border lies inside
        some tile's interior."""
        return tile - 2 * margin

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the working image (and of the stitched map)."""
        return self.image_height, self.image_width


def axis_origins(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis: every `stride` pixels, the last one flush with the end
    (so the whole axis is covered and no tile reaches past it).

    Raises:
        ValueError: the axis is shorter than a tile.
    """
    if length < tile:
        raise ValueError(f"a {tile}-pixel tile does not fit in {length} pixels")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def origins(image_size: tuple[int, int], tile_size: tuple[int, int], stride: int) -> list[tuple[int, int]]:
    """(y, x) of every tile, row by row."""
    ys = axis_origins(image_size[0], tile_size[0], stride)
    xs = axis_origins(image_size[1], tile_size[1], stride)
    return [(y, x) for y in ys for x in xs]


def split(chw: np.ndarray, tile_size: tuple[int, int], stride: int) -> np.ndarray:
    """Cut a `(C, H, W)` image into `(N, C, th, tw)` tiles (order of `origins`)."""
    th, tw = tile_size
    tiles = [chw[:, y:y + th, x:x + tw] for y, x in origins(chw.shape[1:], tile_size, stride)]
    return np.ascontiguousarray(np.stack(tiles))


# Weight of a tile's border band (its `score_margin`, where zero padding makes features
# unreliable) when stitching: another tile's interior covering the same pixel wins.
EDGE_WEIGHT = 1e-3


def _weights(tile_size: tuple[int, int], margin: int) -> np.ndarray:
    w = np.full(tile_size, EDGE_WEIGHT, dtype=np.float32)
    w[margin:tile_size[0] - margin, margin:tile_size[1] - margin] = 1.0
    return w


def stitch(maps: np.ndarray, image_size: tuple[int, int], stride: int, margin: int = 0) -> np.ndarray:
    """Put `(N, th, tw)` tile maps back into one `(H, W)` map: a weighted average where a
    tile's `margin`-pixel border band counts `EDGE_WEIGHT` and its interior 1, so a pixel
    inside some tile's interior gets (almost only) interior values."""
    th, tw = maps.shape[-2:]
    w = _weights((th, tw), margin)
    total = np.zeros(image_size, dtype=np.float32)
    weight = np.zeros(image_size, dtype=np.float32)
    for amap, (y, x) in zip(maps, origins(image_size, (th, tw), stride), strict=True):
        total[y:y + th, x:x + tw] += amap * w
        weight[y:y + th, x:x + tw] += w
    return total / weight


def scored_region(image_size: tuple[int, int], tile_size: tuple[int, int], stride: int,
                  margin: int) -> np.ndarray:
    """Pixels the image score reads: inside some tile's interior and away from the image
    border (with `stride` ≤ tile − 2·margin, every pixel away from the border)."""
    covered = np.zeros(image_size, dtype=bool)
    th, tw = tile_size
    for y, x in origins(image_size, tile_size, stride):
        covered[y + margin:y + th - margin, x + margin:x + tw - margin] = True
    return covered


def image_score(amap: np.ndarray, region: np.ndarray) -> float:
    """Maximum of a stitched `(H, W)` map over the scored `region`."""
    return float(amap[region].max())


def prepare_input(image: np.ndarray | Image.Image, input_size: tuple[int, int],
                  tiling: Tiling | None) -> np.ndarray:
    """The model input for one decoded image, the one pre-processing path of training,
    calibration, evaluation and serving: `(3, H, W)` at the input size, or for a tiled
    model `(N, 3, H, W)` tiles of the image at its working size."""
    if tiling is None:
        return preprocess(image, input_size)
    return split(preprocess(image, tiling.image_size), input_size, tiling.stride)

"""Tiling for images much larger than the model input (anomalib #1401, #1172).

A tiled model sees the image at a fixed *working size* (`Tiling.image_height` ×
`image_width`, e.g. 1024² for a 2048² camera frame), cut into tiles of the model's input
size every `stride` pixels (stride < tile: overlapping tiles). The tiles run as one batch;
their anomaly maps are stitched back into one working-size map (overlaps averaged) and the
image score is the maximum of the stitched map away from the image border (the same margin
as an untiled model's score). Training, calibration, evaluation and serving all go through
these functions, so a threshold means the same everywhere.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field, model_validator

from service.imaging import preprocess


class Tiling(BaseModel):
    """How a model covers a large image (stored in its `anomaly_model.json`)."""

    image_height: int = Field(gt=0, description="working height the image is resized to first")
    image_width: int = Field(gt=0, description="working width the image is resized to first")
    stride: int = Field(gt=0, description="pixels between tile origins (< tile side: overlap)")
    score_margin: int = Field(0, ge=0, description="border of the stitched map the image score ignores")

    @model_validator(mode="after")
    def _fits(self) -> Tiling:
        if 2 * self.score_margin >= min(self.image_height, self.image_width):
            raise ValueError("score_margin leaves nothing of the image")
        return self

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


def stitch(maps: np.ndarray, image_size: tuple[int, int], stride: int) -> np.ndarray:
    """Put `(N, th, tw)` tile maps back into one `(H, W)` map, averaging overlaps."""
    th, tw = maps.shape[-2:]
    total = np.zeros(image_size, dtype=np.float32)
    count = np.zeros(image_size, dtype=np.float32)
    for amap, (y, x) in zip(maps, origins(image_size, (th, tw), stride), strict=True):
        total[y:y + th, x:x + tw] += amap
        count[y:y + th, x:x + tw] += 1
    return total / count


def image_score(amap: np.ndarray, margin: int) -> float:
    """Maximum of a stitched `(H, W)` map inside a `margin`-pixel border."""
    h, w = amap.shape
    return float(amap[margin:h - margin, margin:w - margin].max())


def prepare_input(image: np.ndarray | Image.Image, input_size: tuple[int, int],
                  tiling: Tiling | None) -> np.ndarray:
    """The model input for one decoded image, the one pre-processing path of training,
    calibration, evaluation and serving: `(3, H, W)` at the input size, or for a tiled
    model `(N, 3, H, W)` tiles of the image at its working size."""
    if tiling is None:
        return preprocess(image, input_size)
    return split(preprocess(image, tiling.image_size), input_size, tiling.stride)

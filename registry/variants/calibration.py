"""Calibration data for post-training quantization.

Two sources, as compared in the seed paper:

- `real`: normal training images, decoded and preprocessed by `service.runtime.imaging` exactly as
  the server does (a category-balanced subset);
- `random`: random-normal inputs. The graph normalises with the ImageNet mean/std, so
  `x = mean + std · N(0, 1)` in the [0, 1] input space becomes N(0, 1) after the graph's
  normalisation: the distribution the backbone was trained to see, with no real images.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import StrEnum

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod

from registry.data.mvtec import Sample
from service.runtime.tiling import Tiling, origins


class CalibrationData(StrEnum):
    """Where calibration inputs come from."""

    real = "real"
    random = "random"


class CalibrationAlgo(StrEnum):
    """How activation ranges are chosen from calibration outputs (ONNX Runtime's methods)."""

    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"

    @property
    def ort(self) -> CalibrationMethod:
        """The ONNX Runtime `CalibrationMethod`."""
        return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile}[self.value]


def balanced_subset(samples: list[Sample], n: int, seed: int = 0) -> list[Sample]:
    """Up to `n` samples, the same number from each category, chosen at random."""
    rng = np.random.default_rng(seed)
    by_cat: dict[str, list[Sample]] = {}
    for s in samples:
        by_cat.setdefault(s.category, []).append(s)
    per_cat = max(1, n // max(1, len(by_cat)))
    picked = []
    for cat in sorted(by_cat):
        group = by_cat[cat]
        idx = rng.permutation(len(group))[:per_cat]
        picked += [group[i] for i in sorted(idx)]
    return picked[:n]


def real_images(samples: list[Sample], size: tuple[int, int], n: int, seed: int = 0,
                tiling: Tiling | None = None) -> np.ndarray:
    """`(n, 3, H, W)` float32: normal images through the serving pre-processing (a tiled
    model: `n` tiles, every tile of as many images as it takes)."""
    from registry.train import load_images

    per_image = 1 if tiling is None else len(origins(tiling.image_size, size, tiling.stride))
    return load_images(balanced_subset(samples, -(-n // per_image), seed), size, tiling).numpy()[:n]


def random_normal_images(size: tuple[int, int], n: int, mean: list[float], std: list[float],
                         seed: int = 0) -> np.ndarray:
    """`(n, 3, H, W)` float32 whose graph-normalised values are N(0, 1)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3, *size), dtype=np.float32)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return m + s * z


class ArrayReader(CalibrationDataReader):
    """Feeds an `(N, 3, H, W)` array to ONNX Runtime's calibrator in batches."""

    def __init__(self, images: np.ndarray, input_name: str = "image", batch_size: int = 8) -> None:
        self.images = images.astype(np.float32, copy=False)
        self.input_name = input_name
        self.batch_size = batch_size
        self._iter: Iterator[dict[str, np.ndarray]] | None = None
        self.rewind()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.images), self.batch_size):
            yield {self.input_name: self.images[i:i + self.batch_size]}

    def get_next(self) -> dict[str, np.ndarray] | None:  # noqa: D102
        assert self._iter is not None
        return next(self._iter, None)

    def rewind(self) -> None:  # noqa: D102
        self._iter = self._batches()

    def __len__(self) -> int:
        return len(self.images)

"""General natural images, a small offline stand-in for ImageNet: random views of the
photos bundled with scikit-image that the sample data does not use.

Uninformed Students' patch-descriptor teachers are pretrained on ImageNet patches in the
paper, so that their descriptors are specific for any content, not only for the normal
parts the students learn; a teacher distilled on the normal images alone describes an
unseen defect about as the students extrapolate it, and the regression error stays low.
No machine here may download ImageNet, so `general_views` draws varied views (random
crop scale and position, flips, quarter turns, a colour permutation or grey, a gain) of
the bundled photos of people, animals, a rocket, a street scene, a retina, deep-sky
galaxies, cells, printed text, a clock and colour charts. None of them is a photo the
sample data is made from (`registry.data.sample`), so the sample data's test images
stay unseen.
"""

from __future__ import annotations

from functools import cache

import numpy as np
from PIL import Image

# scikit-image loaders of the bundled photos (none needs a download).
GENERAL_PHOTOS = ("astronaut", "camera", "cat", "rocket", "hubble_deep_field", "retina",
                  "stereo_motorcycle", "page", "text", "cell", "colorwheel", "clock", "logo")


@cache
def _photo(name: str) -> np.ndarray:
    """One bundled photo as `(H, W, 3)` uint8 RGB."""
    from skimage import data as skdata

    img = getattr(skdata, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def general_views(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """`n` random views of the bundled general photos, `(n, 3, H, W)` float32 in [0, 1]
    (the layout `registry.train` feeds the models).

    Args:
        n: number of views.
        size: `(height, width)` of each view.
        seed: the draw (deterministic for a given seed).
    """
    rng = np.random.default_rng(seed)
    h, w = size
    out = np.empty((n, 3, h, w), np.float32)
    for i in range(n):
        src = _photo(GENERAL_PHOTOS[int(rng.integers(len(GENERAL_PHOTOS)))])
        sh, sw = src.shape[:2]
        side = int(min(sh, sw) * rng.uniform(0.25, 1.0))
        y, x = int(rng.integers(0, sh - side + 1)), int(rng.integers(0, sw - side + 1))
        im = Image.fromarray(src).crop((x, y, x + side, y + side)).resize((w, h), Image.BILINEAR)
        arr = np.asarray(im).astype(np.float32) / 255.0
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = np.rot90(arr, int(rng.integers(4)))
        if arr.shape[:2] != (h, w):  # a quarter turn of a non-square view
            arr = np.asarray(Image.fromarray((arr * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR),
                             np.float32) / 255.0
        if rng.random() < 0.8:  # a colour permutation, else grey
            arr = arr[..., rng.permutation(3)]
        else:
            arr = arr.mean(-1, keepdims=True).repeat(3, -1)
        arr = np.clip(arr * rng.uniform(0.8, 1.2), 0.0, 1.0)
        out[i] = arr.transpose(2, 0, 1)
    return out

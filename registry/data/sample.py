"""Generate a small MVTec-AD-style dataset from real photos bundled with scikit-image.

Layout written (the same as MVTec AD, so the same loader reads both)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png

Categories: three textures (`brick`, `grass`, `gravel`) and one object (`coffee`, a cup
photographed from above). Good images are jittered crops of the source photo; defects
are synthetic (`scratch`, `patch` pasted from another category, `stain`) and their masks
are exact: a mask pixel is 255 exactly where the defect changed the image. Everything is
deterministic for a given seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

TEXTURES = ("brick", "grass", "gravel")
OBJECTS = ("coffee",)
DEFAULT_CATEGORIES = TEXTURES + OBJECTS
DEFECT_TYPES = ("scratch", "patch", "stain")


@dataclass(frozen=True)
class SampleSpec:
    """How much to generate per category."""

    image_size: int = 256
    n_train: int = 40
    n_test_good: int = 10
    n_test_per_defect: int = 6
    seed: int = 0


def _source_photo(category: str) -> np.ndarray:
    """The bundled scikit-image photo for a category, as (H, W, 3) uint8 RGB."""
    from skimage import data as skdata

    if category not in DEFAULT_CATEGORIES:
        raise ValueError(f"unknown sample category {category!r}; choose from {DEFAULT_CATEGORIES}")
    img = np.asarray(getattr(skdata, category)())
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def _good_image(src: np.ndarray, category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One defect-free view of the source photo: a jittered crop, resized to `size`."""
    h, w = src.shape[:2]
    if category in TEXTURES:
        crop = int(rng.uniform(0.45, 0.6) * min(h, w))
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        box = (x, y, x + crop, y + crop)
    else:  # object: centred square with a small shift and scale jitter
        crop = int(min(h, w) * rng.uniform(0.92, 1.0))
        cy = h // 2 + int(rng.integers(-8, 9))
        cx = w // 2 + int(rng.integers(-8, 9))
        y = int(np.clip(cy - crop // 2, 0, h - crop))
        x = int(np.clip(cx - crop // 2, 0, w - crop))
        box = (x, y, x + crop, y + crop)
    im = Image.fromarray(src).crop(box).resize((size, size), Image.BILINEAR)
    if category in TEXTURES:
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_TOP_BOTTOM)
    gain = rng.uniform(0.95, 1.05)
    arr = np.asarray(im).astype(np.float32) * gain
    return np.clip(arr, 0, 255).astype(np.uint8)


def _scratch(img: np.ndarray, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    """A thin polyline across part of the image: dark, bright, rust or blue."""
    size = img.shape[0]
    mask_im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_im)
    pts = [tuple(rng.uniform(0.2, 0.8, 2) * size)]
    angle = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(3, 6))):
        angle += rng.uniform(-0.5, 0.5)
        step = rng.uniform(0.08, 0.15) * size
        x, y = pts[-1]
        pts.append((float(np.clip(x + step * np.cos(angle), 2, size - 3)),
                    float(np.clip(y + step * np.sin(angle), 2, size - 3))))
    draw.line(pts, fill=255, width=int(rng.integers(4, 8)))
    mask = np.asarray(mask_im) > 0
    palette = (np.array([25, 20, 15]), np.array([240, 240, 235]), np.array([150, 40, 30]),
               np.array([40, 60, 150]))
    colour = palette[int(rng.integers(len(palette)))]
    out = img.copy()
    out[mask] = colour
    mask &= np.any(out != img, axis=-1)
    return out, mask


def _patch(img: np.ndarray, rng: np.random.Generator, *, donor: np.ndarray,
           **_: object) -> tuple[np.ndarray, np.ndarray]:
    """An elliptical piece of another category's texture pasted in."""
    size = img.shape[0]
    rh, rw = (rng.uniform(0.08, 0.16, 2) * size).astype(int)
    cy, cx = rng.integers(rh + 2, size - rh - 2), rng.integers(rw + 2, size - rw - 2)
    mask_im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_im).ellipse((cx - rw, cy - rh, cx + rw, cy + rh), fill=255)
    mask = np.asarray(mask_im) > 0
    out = img.copy()
    out[mask] = donor[mask]
    # Only pixels that really changed are defective.
    mask &= np.any(out != img, axis=-1)
    return out, mask


def _stain(img: np.ndarray, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    """An irregular blob with a colour cast (oil, rust, burn)."""
    size = img.shape[0]
    noise = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8))
    noise = np.asarray(noise.filter(ImageFilter.GaussianBlur(radius=size / 40))).astype(float)
    r = rng.uniform(0.07, 0.13) * size
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.hypot(yy - cy, xx - cx) / r
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    mask = (dist + 0.35 * noise) < 1.0
    tint = rng.choice([np.array([0.55, 0.35, 0.2]), np.array([0.3, 0.3, 0.35]),
                       np.array([1.0, 0.6, 0.3])])
    out = img.astype(np.float32)
    out[mask] = out[mask] * 0.35 + 255 * tint * 0.65
    out = np.clip(out, 0, 255).astype(np.uint8)
    mask &= np.any(out != img, axis=-1)
    return out, mask


DEFECTS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "patch": _patch,
    "stain": _stain,
}


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def make_sample_dataset(
    root: Path | str,
    categories: tuple[str, ...] = DEFAULT_CATEGORIES,
    spec: SampleSpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the sample dataset under `root` and return `root`.

    Args:
        root: output folder (created; existing files are overwritten).
        categories: which of `DEFAULT_CATEGORIES` to write.
        spec: sizes and seed.
        progress: called with the category name as each one finishes.

    Returns:
        The dataset root.
    """
    spec = spec or SampleSpec()
    root = Path(root)
    sources = {c: _source_photo(c) for c in DEFAULT_CATEGORIES}
    for ci, category in enumerate(categories):
        rng = np.random.default_rng([spec.seed, ci])
        src = sources[category]
        base = root / category
        for i in range(spec.n_train):
            _save(_good_image(src, category, spec.image_size, rng), base / "train/good" / f"{i:03d}.png")
        for i in range(spec.n_test_good):
            _save(_good_image(src, category, spec.image_size, rng), base / "test/good" / f"{i:03d}.png")
        donors = [c for c in DEFAULT_CATEGORIES if c != category]
        for defect in DEFECT_TYPES:
            for i in range(spec.n_test_per_defect):
                good = _good_image(src, category, spec.image_size, rng)
                donor_cat = donors[int(rng.integers(len(donors)))]
                donor = _good_image(sources[donor_cat], donor_cat, spec.image_size, rng)
                img, mask = DEFECTS[defect](good, rng, donor=donor)
                _save(img, base / "test" / defect / f"{i:03d}.png")
                _save((mask * 255).astype(np.uint8), base / "ground_truth" / defect / f"{i:03d}_mask.png")
        log.info("sample category %s written to %s", category, base)
        if progress:
            progress(category)
    return root

"""Generate a small MVTec-AD-style dataset from real photos bundled with scikit-image.

Layout written (the same as MVTec AD, so the same loader reads both)::

    <root>/<category>/train/good/000.png
    <root>/<category>/test/good/000.png
    <root>/<category>/test/<defect>/000.png
    <root>/<category>/ground_truth/<defect>/000_mask.png

Two families, made differently, so that choices are not tuned to one generator:

- family 1 (the default): three textures (`brick`, `grass`, `gravel`) and one object
  (`coffee`, a cup photographed from above), with `scratch`, `patch` (pasted from another
  category) and `stain` defects;
- family 2: other photos (`moon`, a cratered surface; `ihc`, stained tissue; `coins`, a
  tray of coins) and other kinds of defect: `crack` (thin branching dark line), `warp`
  (a local geometric distortion, no colour added) and `smudge` (a locally blurred and
  dulled region).

Good images are jittered crops of the source photo; the masks are exact: a mask pixel is
255 exactly where the defect changed the image. `make_highres_category` writes one
2048×2048 category with defects of a few pixels (for tiling). Everything is deterministic
for a given seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

TEXTURES = ("brick", "grass", "gravel", "moon", "ihc")
OBJECTS = ("coffee", "coins")
DEFAULT_CATEGORIES = ("brick", "grass", "gravel", "coffee")  # this order seeds each category: keep it
FAMILIES: dict[int, tuple[str, ...]] = {1: DEFAULT_CATEGORIES, 2: ("coins", "ihc", "moon")}
DEFECT_TYPES = ("scratch", "patch", "stain")
FAMILY_DEFECTS: dict[int, tuple[str, ...]] = {1: DEFECT_TYPES, 2: ("crack", "warp", "smudge")}
_PHOTOS = {"ihc": "immunohistochemistry"}  # category → scikit-image loader
HIGHRES_CATEGORY = "gravel_2k"


@dataclass(frozen=True)
class SampleSpec:
    """How much to generate per category."""

    image_size: int = 256
    n_train: int = 40
    n_test_good: int = 10
    n_test_per_defect: int = 6
    seed: int = 0
    family: int = 1


def _source_photo(category: str) -> np.ndarray:
    """The bundled scikit-image photo for a category, as (H, W, 3) uint8 RGB."""
    from skimage import data as skdata

    known = TEXTURES + OBJECTS
    if category not in known:
        raise ValueError(f"unknown sample category {category!r}; choose from {known}")
    img = np.asarray(getattr(skdata, _PHOTOS.get(category, category))())
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


# -- family 2 -------------------------------------------------------------------------
CHANGED = 10  # a warp or smudge pixel is defective where some channel moved by this much or more
# A warp or smudge on a smooth stretch changes almost nothing: such a draw is made again on
# another view (up to MAX_TRIES times) until it changes at least this fraction of the image.
MIN_DEFECT_FRACTION = 0.002
MAX_TRIES = 30


def _changed(out: np.ndarray, img: np.ndarray, region: np.ndarray) -> np.ndarray:
    return region & (np.abs(out.astype(np.int16) - img.astype(np.int16)).max(axis=-1) >= CHANGED)


def _blob(size: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """An irregular blob mask (radius `lo`–`hi` of the side, noisy edge)."""
    noise = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8))
    noise = np.asarray(noise.filter(ImageFilter.GaussianBlur(radius=size / 40))).astype(float)
    noise = (noise - noise.mean()) / (noise.std() + 1e-6)
    r = rng.uniform(lo, hi) * size
    cy, cx = rng.uniform(0.25, 0.75, 2) * size
    yy, xx = np.mgrid[0:size, 0:size]
    return (np.hypot(yy - cy, xx - cx) / r + 0.3 * noise) < 1.0


def _crack(img: np.ndarray, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    """A thin, branching, darkened line (a random walk with one or two side branches)."""
    size = img.shape[0]
    mask_im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_im)

    def walk(start: tuple[float, float], angle: float, steps: int) -> list[tuple[float, float]]:
        pts = [start]
        for _ in range(steps):
            angle += rng.uniform(-0.7, 0.7)
            x, y = pts[-1]
            step = rng.uniform(0.02, 0.04) * size
            pts.append((float(np.clip(x + step * np.cos(angle), 1, size - 2)),
                        float(np.clip(y + step * np.sin(angle), 1, size - 2))))
        return pts

    start = tuple(rng.uniform(0.25, 0.75, 2) * size)
    trunk = walk(start, rng.uniform(0, 2 * np.pi), int(rng.integers(8, 14)))
    draw.line(trunk, fill=255, width=int(rng.integers(2, 4)))
    for _ in range(int(rng.integers(1, 3))):
        start = trunk[int(rng.integers(1, len(trunk)))]
        draw.line(walk(start, rng.uniform(0, 2 * np.pi), int(rng.integers(3, 7))), fill=255, width=2)
    region = np.asarray(mask_im) > 0
    out = img.copy()
    out[region] = (img[region] * rng.uniform(0.15, 0.35)).astype(np.uint8)
    return out, _changed(out, img, region)


def _warp(img: np.ndarray, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    """A local swirl of the surface: pixels move, no colour is added."""
    from skimage.transform import swirl

    size = img.shape[0]
    radius = rng.uniform(0.1, 0.16) * size
    centre = tuple(rng.uniform(0.25, 0.75, 2) * size)
    strength = rng.choice([-1, 1]) * rng.uniform(3.0, 6.0)
    out = (swirl(img, center=centre, strength=strength, radius=radius, preserve_range=True,
                 mode="reflect", order=1)).round().clip(0, 255).astype(np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    region = np.hypot(xx - centre[0], yy - centre[1]) < 1.5 * radius
    out[~region] = img[~region]
    return out, _changed(out, img, region)


def _smudge(img: np.ndarray, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    """A region blurred and dulled towards its mean colour (a smear of grease or dust)."""
    size = img.shape[0]
    region = _blob(size, rng, 0.06, 0.12)
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=size / 64)), np.float32)
    mean = img[region].reshape(-1, 3).mean(axis=0) if region.any() else img.reshape(-1, 3).mean(axis=0)
    dull = 0.6 * blurred + 0.4 * mean
    out = img.copy()
    out[region] = dull[region].round().clip(0, 255).astype(np.uint8)
    return out, _changed(out, img, region)


DEFECTS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "patch": _patch,
    "stain": _stain,
    "crack": _crack,
    "warp": _warp,
    "smudge": _smudge,
}


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", optimize=False, compress_level=6)


def make_sample_dataset(
    root: Path | str,
    categories: tuple[str, ...] | None = None,
    spec: SampleSpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the sample dataset under `root` and return `root`.

    Args:
        root: output folder (created; existing files are overwritten).
        categories: which categories of the spec's family to write (default: all of them).
        spec: sizes, seed and family (1 or 2, see the module docstring).
        progress: called with the category name as each one finishes.

    Returns:
        The dataset root.
    """
    spec = spec or SampleSpec()
    if spec.family not in FAMILIES:
        raise ValueError(f"unknown sample family {spec.family}; choose from {sorted(FAMILIES)}")
    categories = categories or FAMILIES[spec.family]
    root = Path(root)
    sources = {c: _source_photo(c) for c in (*DEFAULT_CATEGORIES, *categories)}
    for ci, category in enumerate(categories):
        rng = np.random.default_rng([spec.seed, ci] if spec.family == 1 else [spec.seed, ci, spec.family])
        src = sources[category]
        base = root / category
        for i in range(spec.n_train):
            _save(_good_image(src, category, spec.image_size, rng), base / "train/good" / f"{i:03d}.png")
        for i in range(spec.n_test_good):
            _save(_good_image(src, category, spec.image_size, rng), base / "test/good" / f"{i:03d}.png")
        donors = [c for c in DEFAULT_CATEGORIES if c != category]
        for defect in FAMILY_DEFECTS[spec.family]:
            for i in range(spec.n_test_per_defect):
                good = _good_image(src, category, spec.image_size, rng)
                donor_cat = donors[int(rng.integers(len(donors)))]
                donor = _good_image(sources[donor_cat], donor_cat, spec.image_size, rng)
                img, mask = DEFECTS[defect](good, rng, donor=donor)
                for _ in range(MAX_TRIES if spec.family > 1 else 0):  # family 1 as it always was
                    if mask.sum() >= MIN_DEFECT_FRACTION * mask.size:
                        break
                    good = _good_image(src, category, spec.image_size, rng)  # too faint: another view
                    img, mask = DEFECTS[defect](good, rng, donor=donor)
                _save(img, base / "test" / defect / f"{i:03d}.png")
                _save((mask * 255).astype(np.uint8), base / "ground_truth" / defect / f"{i:03d}_mask.png")
        log.info("sample category %s written to %s", category, base)
        if progress:
            progress(category)
    return root


# -- a high-resolution category (tiling) ------------------------------------------------
@dataclass(frozen=True)
class HighResSpec:
    """The high-resolution category: `image_size`² frames, defects of a few pixels."""

    image_size: int = 2048
    n_train: int = 16
    n_test_good: int = 10
    n_test_per_defect: int = 8
    seed: int = 0


def _mosaic(src: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A large defect-free frame: 4 × 4 jittered views of the gravel photo side by side."""
    block = size // 4
    rows = [np.concatenate([_good_image(src, "gravel", block, rng) for _ in range(4)], axis=1)
            for _ in range(4)]
    return np.concatenate(rows, axis=0)


def _pit(img: np.ndarray, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    """A few small rust pits (radius 8–14 px on a 2048² frame: 1–2 px once resized to 256²)."""
    size = img.shape[0]
    mask_im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask_im)
    for _ in range(int(rng.integers(1, 4))):
        r = rng.uniform(8, 14) * size / 2048
        cx, cy = rng.uniform(0.05, 0.95, 2) * size
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    region = np.asarray(mask_im) > 0
    out = img.copy()
    out[region] = (img[region] * 0.3 + np.array([150, 55, 25]) * 0.7).astype(np.uint8)
    return out, _changed(out, img, region)


def _fleck(img: np.ndarray, rng: np.random.Generator, **_: object) -> tuple[np.ndarray, np.ndarray]:
    """A short blue fleck (40–80 px long, 6–8 px wide on a 2048² frame: about 1 px wide once
    resized to 256²), like a fibre or a paint chip."""
    size = img.shape[0]
    scale = size / 2048
    mask_im = Image.new("L", (size, size), 0)
    x, y = rng.uniform(0.05, 0.9, 2) * size
    angle, length = rng.uniform(0, np.pi), rng.uniform(40, 80) * scale
    ImageDraw.Draw(mask_im).line([(x, y), (x + length * np.cos(angle), y + length * np.sin(angle))],
                                 fill=255, width=max(1, int(round(rng.uniform(6, 8.5) * scale))))
    region = np.asarray(mask_im) > 0
    out = img.copy()
    out[region] = (50, 80, 190)
    return out, _changed(out, img, region)


HIGHRES_DEFECTS: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {"pit": _pit, "fleck": _fleck}


def make_highres_category(root: Path | str, spec: HighResSpec | None = None,
                          progress: Callable[[str], None] | None = None) -> Path:
    """Write the `gravel_2k` category (MVTec layout, JPEG frames, PNG masks) under `root`:
    camera-sized frames whose defects shrink to a pixel or two when the frame is resized to
    a model input of 256², so only tiling sees them. Returns `root`."""
    spec = spec or HighResSpec()
    root = Path(root)
    base = root / HIGHRES_CATEGORY
    rng = np.random.default_rng([spec.seed, 2048])
    src = _source_photo("gravel")

    def save_jpeg(arr: np.ndarray, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path, format="JPEG", quality=92)

    for i in range(spec.n_train):
        save_jpeg(_mosaic(src, spec.image_size, rng), base / "train/good" / f"{i:03d}.jpg")
    for i in range(spec.n_test_good):
        save_jpeg(_mosaic(src, spec.image_size, rng), base / "test/good" / f"{i:03d}.jpg")
    for defect, make in HIGHRES_DEFECTS.items():
        for i in range(spec.n_test_per_defect):
            img, mask = make(_mosaic(src, spec.image_size, rng), rng)
            save_jpeg(img, base / "test" / defect / f"{i:03d}.jpg")
            _save((mask * 255).astype(np.uint8), base / "ground_truth" / defect / f"{i:03d}_mask.png")
    if progress:
        progress(HIGHRES_CATEGORY)
    return root


# -- camera-sized frames (the serving benchmark's second image set) ----------------------
CAMERA_SIZE = (1200, 1920)  # (height, width): a 2.3-megapixel industrial camera frame


def make_camera_frames(root: Path | str, n: int = 16, size: tuple[int, int] = CAMERA_SIZE,
                       seed: int = 0) -> list[Path]:
    """Write `n` defect-free JPEG frames of `size` (quality 90) under `root/<category>/`,
    each a 5 × 3 mosaic of jittered views of one sample category's bundled photo (cycling
    through `DEFAULT_CATEGORIES`): the real-texture, camera-sized images the serving
    benchmark decodes. Returns the paths written."""
    h, w = size
    block = int(np.ceil(max(w / 5, h / 3)))
    rng = np.random.default_rng([seed, h, w])
    sources = {c: _source_photo(c) for c in DEFAULT_CATEGORIES}
    paths = []
    for i in range(n):
        category = DEFAULT_CATEGORIES[i % len(DEFAULT_CATEGORIES)]
        src = sources[category]
        rows = [np.concatenate([_good_image(src, category, block, rng) for _ in range(5)], axis=1)
                for _ in range(3)]
        frame = np.concatenate(rows, axis=0)[:h, :w]
        path = Path(root) / category / f"frame_{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(frame).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths

"""Image decoding, pre-processing and heat-map encoding: the one path shared by
evaluation (registry) and serving.

Serving works in two steps so that memory is admitted before it is spent:

1. `probe_image` (or `probe_raw`) reads only the header: format, size, pixel mode. It
   refuses what can be refused undecoded (empty, over the byte or pixel limit, zero size,
   not an image, 32-bit float) and estimates the memory decoding will take (`Probe.cost`).
2. `decode_probe` decodes to a PIL image in mode `L` (gray, 16-bit scaled to 8) or `RGB`;
   `preprocess` resizes it to the model input `(3, H, W)` float32 in [0, 1]. Gray stays one
   channel until after the resize, and nothing is copied into a full-size numpy array, so
   a 20-megapixel image costs its decoded size plus at most one conversion.

A JPEG much larger than the size the model works at (`draft`: its input, or a tiled
model's working size) is decoded in libjpeg's reduced-size DCT mode, at 1/2, 1/4 or 1/8
scale, the smallest that still holds the working size in both directions: a 1920×1200
camera frame for a 256² model decodes as 480×300, skipping most of the inverse DCT and
colour conversion. The resize then starts from fewer pixels; the input differs from a
full decode's by a few grey levels (`tests/service/test_imaging.py`). Training, evaluation and
serving all decode through here with the same `draft`, so they see the same pixels.

`decode_image` (both steps, as an `(H, W, 3)` uint8 RGB array) is what evaluation and the
tools call; `preprocess` accepts either form and gives identical results. ImageNet
normalisation happens inside the ONNX graph.

The memory estimate (bytes, `Probe.cost`) is `pixels × (storage + conversion)` plus the
resize's intermediate rows, where storage is Pillow's bytes per pixel for the mode (1 for
L/P/1, 2 for 16-bit, 4 for everything else) and conversion what reaching L or RGB adds
(0 for L/RGB; 1 for 1/LA; 4 for RGBA/CMYK/YCbCr/P; 8 for P with transparency and PA,
through RGBA; 4 for 16-bit, 6 for 32-bit integers, through numpy and a lookup table).
`tests/service/test_imaging.py` checks it against the peak resident memory actually measured.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_PIXELS = 24_000_000
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}
_NATIVE = {"L", "RGB"}
_TO_GRAY = {"1", "LA", "La"}
# 0..65535 → 0..255 with rounding, as one table lookup (no 32-bit temporaries).
_LUT16 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
_RESIZE_SLACK = 1 << 20


def _storage_bpp(mode: str) -> int:
    """Bytes per pixel Pillow uses to hold an image of `mode`."""
    if mode in ("1", "L", "P"):
        return 1
    if mode in _SIXTEEN_BIT_MODES:
        return 2
    return 4


def _conversion_bpp(mode: str, transparent: bool) -> int:
    """Bytes per pixel that reaching mode L or RGB adds (see the module docstring)."""
    if mode in _NATIVE:
        return 0
    if mode in _TO_GRAY:
        return 1
    if mode in _SIXTEEN_BIT_MODES:
        return 4
    if mode == "I":
        return 6
    if mode == "PA" or (mode == "P" and transparent):
        return 8
    return 4


def _resize_bytes(height: int) -> int:
    """Pillow resizes in two passes; the intermediate is (output width ≤ 1024) × input height, RGBX."""
    return 4 * 1024 * height + _RESIZE_SLACK


@dataclass
class Probe:
    """An encoded image whose header was read: what decoding it will take.

    Attributes:
        image: the opened, not yet decoded, Pillow image.
        width, height: from the header.
        mode: Pillow's pixel mode (e.g. `RGB`, `L`, `I;16`).
        cost: estimated peak bytes that decoding and preprocessing will allocate.
    """

    image: Image.Image
    width: int
    height: int
    mode: str
    cost: int


def probe_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Probe:
    """Read an encoded image's header (PNG, JPEG, BMP, TIFF …) and check it against the limits.

    Raises:
        InvalidInput: empty, too large, not an image, zero-size, over the pixel limit
            (decompression bomb), or a pixel format that is not supported.
    """
    if not data:
        raise InvalidInput("empty image: the request carried no image bytes")
    if len(data) > max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image exceeds the pixel limit: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput("not an image: the bytes are not a format the server can decode") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"corrupt or truncated image: {exc}") from exc
    w, h = im.size
    if w == 0 or h == 0:
        raise InvalidInput(f"image has zero size ({w}x{h})")
    if w * h > max_pixels:
        raise InvalidInput(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
    if im.mode == "F":
        raise InvalidInput("32-bit float images are not supported; send 8- or 16-bit integers")
    transparent = "transparency" in im.info
    cost = w * h * (_storage_bpp(im.mode) + _conversion_bpp(im.mode, transparent)) + _resize_bytes(h)
    return Probe(im, w, h, im.mode, cost)


def decode_probe(probe: Probe, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode a probed image to a Pillow image in mode `L` or `RGB`.

    Args:
        probe: from `probe_image`.
        draft: (height, width) the image will be resized to; a JPEG at least twice as large
            in both directions is decoded at reduced scale (module docstring). The original
            size stays in `probe.width`/`probe.height`.

    Raises:
        InvalidInput: truncated or corrupt data, or an unsupported pixel format.
    """
    im = probe.image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if draft is not None and im.format == "JPEG":
                im.draft(None, (draft[1], draft[0]))
            im.load()
            return _to_l_or_rgb(im)
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image exceeds the pixel limit: {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"corrupt or truncated image: {exc}") from exc


def _to_l_or_rgb(im: Image.Image) -> Image.Image:
    """Convert any supported Pillow mode to `L` or `RGB` (16/32-bit integers scaled to 8 bits)."""
    mode = im.mode
    if mode in _NATIVE:
        return im
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        arr = np.array(im)  # a writable copy (uint16, or int32 for "I")
        if mode == "I":
            np.clip(arr, 0, 65535, out=arr)
        return Image.fromarray(_LUT16[arr])
    if mode == "F":
        raise InvalidInput("32-bit float images are not supported; send 8- or 16-bit integers")
    if mode in _TO_GRAY:
        return im.convert("L")
    if mode == "PA" or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    return im.convert("RGB")


def as_rgb_array(im: Image.Image | np.ndarray) -> np.ndarray:
    """An `L`/`RGB` image (or a `(H, W)` / `(H, W, 3)` array) as `(H, W, 3)` uint8 RGB."""
    arr = np.asarray(im)
    return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF …) to (H, W, 3) uint8 RGB.

    The header is read first, so size limits are enforced before pixels are decoded.
    `draft`: the (height, width) it will be resized to, as in `decode_probe`.

    Raises:
        InvalidInput: as `probe_image` and `decode_probe`.
    """
    probe = probe_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    return as_rgb_array(decode_probe(probe, draft))


def raw_cost(width: int, height: int, channels: int, bits: int = 8) -> int:
    """Estimated peak bytes that converting and preprocessing raw pixels allocates (the
    buffer itself is already held): 16-bit scaling, dropping alpha, Pillow's copy."""
    n = width * height
    per_pixel = (channels if bits == 16 else 0) + (3 if channels == 4 else 0) + (1 if channels == 1 else 4)
    return n * per_pixel + _resize_bytes(height)


def raw_pixels(
    data: bytes, width: int, height: int, channels: int, bits: int = 8,
    *, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Wrap raw interleaved pixels (H, W, C) without copying: `(H, W)` uint8 for gray,
    `(H, W, 3)` uint8 RGB otherwise (16-bit scaled to 8, alpha dropped).

    Raises:
        InvalidInput: on bad dimensions, channel count, dtype or byte length.
    """
    check_raw(len(data), width, height, channels, bits, max_pixels=max_pixels)
    dtype = np.uint8 if bits == 8 else np.dtype("<u2")
    arr = np.frombuffer(data, dtype=dtype).reshape(height, width, channels)
    if bits == 16:
        arr = _LUT16[arr]
    return arr[..., 0] if channels == 1 else arr[..., :3]


def check_raw(length: int, width: int, height: int, channels: int, bits: int = 8,
              *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Check raw pixel fields against each other and the limits (no pixel is touched).

    Raises:
        InvalidInput: on bad dimensions, channel count, dtype or byte length.
    """
    if width == 0 or height == 0:
        raise InvalidInput(f"raw image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidInput(f"raw image is {width}x{height}; the limit is {max_pixels} pixels")
    if channels not in (1, 3, 4):
        raise InvalidInput(f"raw image has {channels} channels; expected 1, 3 or 4")
    if bits not in (8, 16):
        raise InvalidInput(f"raw pixel depth {bits} bits is not supported; use 8 or 16")
    expected = width * height * channels * (bits // 8)
    if length != expected:
        raise InvalidInput(
            f"raw image byte length {length} does not match "
            f"{width}x{height}x{channels}x{bits // 8} = {expected}"
        )


def raw_to_rgb(
    data: bytes, width: int, height: int, channels: int, bits: int = 8,
    *, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """`raw_pixels` as `(H, W, 3)` uint8 RGB."""
    return as_rgb_array(raw_pixels(data, width, height, channels, bits, max_pixels=max_pixels))


def preprocess(img: np.ndarray | Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Resize (bilinear) to `size` = (height, width) and return (3, H, W) float32 in [0, 1].

    `img` is a Pillow image in mode `L` or `RGB`, or a `(H, W)` / `(H, W, 3)` uint8 array;
    gray is resized as one channel and repeated afterwards (the same values as resizing
    three equal channels).
    """
    h, w = size
    if isinstance(img, np.ndarray):
        if img.shape[:2] == (h, w):
            arr = img
        else:
            img = Image.fromarray(np.ascontiguousarray(img))
    if isinstance(img, Image.Image):
        if img.size != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        arr = np.asarray(img)
    if arr.ndim == 2:
        chw = np.broadcast_to(arr, (3, h, w))
    else:
        chw = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(chw, dtype=np.float32) * np.float32(1 / 255)


def anomaly_map_png(amap: np.ndarray, out_size: tuple[int, int], lo: float, hi: float) -> bytes:
    """Encode a (H, W) anomaly map as an 8-bit gray PNG of `out_size` = (height, width).

    Values are scaled linearly so that `lo` → 0 and `hi` → 255 (clipped).
    """
    scale = 255.0 / max(hi - lo, 1e-12)
    img8 = np.clip((amap - lo) * scale, 0, 255).astype(np.uint8)
    im = Image.fromarray(img8)
    if im.size != (out_size[1], out_size[0]):
        im = im.resize((out_size[1], out_size[0]), Image.BILINEAR)
    return png_bytes(im)


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """`image` (an array: gray, RGB or RGBA uint8) as PNG bytes, compressed for speed."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


OVERLAY_MAX_SIDE = 1024  # pixels on the longer side of an overlay (a panel PC's screen)
OVERLAY_OPACITY = 0.55  # the heat map's opacity where the map is at its hottest
OUTLINE_RGB = (255, 0, 255)  # the defect region's outline at the threshold (magenta: in no heat map colour)
OVERLAY_BYTES_PER_PIXEL = 80  # what drawing an overlay allocates per pixel (float32 planes and masks)


def overlay_base(image: Image.Image | np.ndarray) -> np.ndarray:
    """The image an overlay is drawn on: `(H, W, 3)` uint8 RGB, its longer side at most
    `OVERLAY_MAX_SIDE` (a smaller copy made while the decoded image is still in memory)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.ascontiguousarray(image))
    im = _to_l_or_rgb(im)
    if max(im.size) > OVERLAY_MAX_SIDE:
        im = im.copy()
        im.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.BILINEAR)
    return as_rgb_array(im.convert("RGB"))


def overlay_cost(base: np.ndarray) -> int:
    """Peak bytes `overlay_png` allocates to draw on `base`."""
    return overlay_cost_of(*base.shape[:2])


def overlay_cost_of(height: int, width: int) -> int:
    """`overlay_cost` of the overlay of an image of `height` × `width` (before `overlay_base`
    shrinks it to `OVERLAY_MAX_SIDE`)."""
    scale = min(1.0, OVERLAY_MAX_SIDE / max(height, width, 1))
    return max(1, round(height * scale)) * max(1, round(width * scale)) * OVERLAY_BYTES_PER_PIXEL


def _heat(t: np.ndarray) -> np.ndarray:
    """A blue → cyan → yellow → red colour scale of `t` in [0, 1] as `(H, W, 3)` float in [0, 1]."""
    return np.clip(np.stack([1.5 - np.abs(4 * t - 3), 1.5 - np.abs(4 * t - 2), 1.5 - np.abs(4 * t - 1)],
                            axis=-1), 0, 1)


def _layer(amap: np.ndarray, lo: float, hi: float, region: np.ndarray,
           size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The heat map of `amap` at `size` = (height, width): its colours `(H, W, 3)` in [0, 255]
    and their weight `(H, W, 1)` in [0, 1] (`lo` → cold and clear, `hi` → hot and opaque), with
    `region`'s outline (the third value, a mask) in `OUTLINE_RGB` at full weight."""
    h, w = size
    resized = np.asarray(Image.fromarray(np.asarray(amap, np.float32)).resize((w, h), Image.BILINEAR))
    t = np.clip((resized - lo) / max(hi - lo, 1e-12), 0, 1)[..., None]
    colour, weight = _heat(t[..., 0]) * 255, t.copy()
    scaled = Image.fromarray(region.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    outline = _outline(np.asarray(scaled) > 0)
    colour[outline] = OUTLINE_RGB
    weight[outline] = 1.0
    return colour, weight, outline


def heat_png(amap: np.ndarray, lo: float, hi: float, region: np.ndarray, size: tuple[int, int]) -> bytes:
    """The heat map of `amap` (as in `overlay_png`) as an RGBA PNG of `size` = (height, width),
    clear where the map is cold: a layer to put over the image at any opacity."""
    colour, weight, _ = _layer(amap, lo, hi, region, size)
    rgba = np.concatenate([colour, weight * 255], axis=-1)
    return png_bytes(np.clip(rgba, 0, 255).astype(np.uint8))


def overlay_png(base: np.ndarray, amap: np.ndarray, lo: float, hi: float, region: np.ndarray) -> bytes:
    """`base` (from `overlay_base`) with the anomaly map `amap` over it as a heat map (scaled
    as `anomaly_map_png`: `lo` → cold, `hi` → hot; more opaque where hotter, at most
    `OVERLAY_OPACITY`) and `region` (a boolean mask of `amap`'s shape: the defect region,
    `defect_region`) outlined, as an RGB PNG of `base`'s size."""
    colour, weight, outline = _layer(amap, lo, hi, region, base.shape[:2])
    alpha = OVERLAY_OPACITY * weight
    alpha[outline] = 1.0
    out = base.astype(np.float32) * (1 - alpha) + colour * alpha
    return png_bytes(np.clip(out, 0, 255).astype(np.uint8))


def defect_region(amap: np.ndarray, threshold: float, anomalous: bool,
                  scored: np.ndarray | None = None) -> np.ndarray:
    """Where `amap` reaches `threshold`, as a mask of its shape, kept to the decision: empty
    for an OK part, never empty for an NG one (at least the map's hottest pixel), and within
    `scored` (a tiled model's scored pixels) when given."""
    if not anomalous:
        return np.zeros(amap.shape, dtype=bool)
    scored = np.ones(amap.shape, dtype=bool) if scored is None else scored
    region = (amap >= threshold) & scored
    if not region.any():
        region.flat[int(np.argmax(np.where(scored, amap, -np.inf)))] = True
    return region


def _outline(region: np.ndarray) -> np.ndarray:
    """The border of a boolean mask, two pixels wide (to be seen at arm's length)."""
    inner = region.copy()  # the region less its border pixels (a 4-neighbour erosion)
    inner[1:, :] &= region[:-1, :]
    inner[:-1, :] &= region[1:, :]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    edge = region & ~inner
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:, 1:] |= edge[:, :-1]
    return thick

"""Image decoding, pre-processing and heat-map encoding: the one path shared by
evaluation (registry) and serving.

Decoded images are `(H, W, 3)` uint8 RGB arrays. `preprocess` turns one into the model
input `(3, H, W)` float32 in [0, 1]; ImageNet normalisation happens inside the ONNX graph.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import InvalidInput

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _to_rgb8(im: Image.Image) -> np.ndarray:
    """Convert any supported PIL mode to (H, W, 3) uint8 RGB."""
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im)
        # 16-bit data (PNG/TIFF) comes as I;16* or I (int32): scale 0..65535 to 0..255.
        arr8 = (np.clip(arr, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
        return np.repeat(arr8.astype(np.uint8)[..., None], 3, axis=-1)
    if im.mode == "F":
        raise InvalidInput("32-bit float images are not supported; send 8- or 16-bit integers")
    if im.mode in ("P", "PA") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im)


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, BMP, TIFF …) to (H, W, 3) uint8 RGB.

    The header is read first, so size limits are enforced before pixels are decoded.

    Raises:
        InvalidInput: empty, too large, not an image, truncated, zero-size, over the
            pixel limit (decompression bomb), or an unsupported pixel format.
    """
    if not data:
        raise InvalidInput("empty image: the request carried no image bytes")
    if len(data) > max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w == 0 or h == 0:
                raise InvalidInput(f"image has zero size ({w}x{h})")
            if w * h > max_pixels:
                raise InvalidInput(
                    f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}"
                )
            im.load()
    except InvalidInput:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidInput(f"image exceeds the pixel limit: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidInput("not an image: the bytes are not a format the server can decode") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidInput(f"corrupt or truncated image: {exc}") from exc
    return _to_rgb8(im)


def raw_to_rgb(
    data: bytes, width: int, height: int, channels: int, bits: int = 8,
    *, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Wrap raw interleaved pixels (H, W, C) without copying and convert to RGB uint8.

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
    dtype = np.uint8 if bits == 8 else np.dtype("<u2")
    expected = width * height * channels * (bits // 8)
    if len(data) != expected:
        raise InvalidInput(
            f"raw image byte length {len(data)} does not match "
            f"{width}x{height}x{channels}x{bits // 8} = {expected}"
        )
    arr = np.frombuffer(data, dtype=dtype).reshape(height, width, channels)
    if bits == 16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if channels == 1:
        return np.repeat(arr, 3, axis=-1)
    return arr[..., :3]


def preprocess(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (bilinear) to `size` = (height, width) and return (3, H, W) float32 in [0, 1]."""
    h, w = size
    if rgb.shape[:2] != (h, w):
        rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize((w, h), Image.BILINEAR))
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) * np.float32(1 / 255)


def anomaly_map_png(amap: np.ndarray, out_size: tuple[int, int], lo: float, hi: float) -> bytes:
    """Encode a (H, W) anomaly map as an 8-bit gray PNG of `out_size` = (height, width).

    Values are scaled linearly so that `lo` → 0 and `hi` → 255 (clipped).
    """
    scale = 255.0 / max(hi - lo, 1e-12)
    img8 = np.clip((amap - lo) * scale, 0, 255).astype(np.uint8)
    im = Image.fromarray(img8)
    if im.size != (out_size[1], out_size[0]):
        im = im.resize((out_size[1], out_size[0]), Image.BILINEAR)
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()

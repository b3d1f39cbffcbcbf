"""Decoding and pre-processing: the one path shared by evaluation and serving."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidInput
from service.runtime.imaging import anomaly_map_png, decode_image, preprocess, raw_to_rgb


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_lossless_formats_roundtrip(rgb: np.ndarray, fmt: str) -> None:
    out = decode_image(_encode(Image.fromarray(rgb), fmt))
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert np.array_equal(out, rgb)


def test_jpeg_decodes_close(rgb: np.ndarray) -> None:
    smooth = np.full((40, 60, 3), 120, np.uint8)
    out = decode_image(_encode(Image.fromarray(smooth), "JPEG", quality=95))
    assert np.abs(out.astype(int) - 120).max() <= 3


def _camera_frame() -> bytes:
    """A 1920×1200 JPEG with real texture (a bundled photo, tiled and resized)."""
    from skimage import data

    photo = np.tile(data.astronaut(), (2, 3, 1))  # 1024×1536
    return _encode(Image.fromarray(photo).resize((1920, 1200), Image.BILINEAR), "JPEG", quality=90)


def test_large_jpeg_decodes_at_reduced_scale_close_to_full() -> None:
    frame = _camera_frame()
    full = decode_image(frame)
    reduced = decode_image(frame, draft=(256, 256))
    assert full.shape == (1200, 1920, 3) and reduced.shape == (300, 480, 3)  # 1/4: the smallest ≥ 256
    a, b = preprocess(full, (256, 256)), preprocess(reduced, (256, 256))
    diff = np.abs(a - b)
    assert diff.mean() < 0.01 and np.percentile(diff, 99) < 0.06, (diff.mean(), np.percentile(diff, 99))
    # working sizes that allow no reduction, and formats without one, decode in full
    assert decode_image(frame, draft=(700, 1000)).shape == (1200, 1920, 3)
    png = _encode(Image.fromarray(full[:600, :960]), "PNG")
    assert decode_image(png, draft=(64, 64)).shape == (600, 960, 3)


def test_gray_palette_rgba_become_rgb(rgb: np.ndarray) -> None:
    gray = decode_image(_encode(Image.fromarray(rgb[..., 0]), "PNG"))
    assert gray.shape == (40, 60, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    pal = decode_image(_encode(Image.fromarray(rgb).convert("P"), "PNG"))
    assert pal.shape == (40, 60, 3)
    rgba = np.dstack([rgb, np.full((40, 60), 255, np.uint8)])
    assert np.array_equal(decode_image(_encode(Image.fromarray(rgba), "PNG")), rgb)


def test_png_header_with_zero_or_huge_size_is_refused() -> None:
    """Width × height come from IHDR: a zero or oversized PNG is refused undecoded."""
    import zlib

    def with_width(width: int) -> bytes:
        data = bytearray(_encode(Image.new("RGB", (4, 4)), "PNG"))
        data[16:20] = width.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # a valid IHDR CRC
        return bytes(data)

    with pytest.raises(InvalidInput):
        decode_image(with_width(0))
    with pytest.raises(InvalidInput, match="pixels; the limit"):
        decode_image(with_width(1 << 20), max_pixels=1_000_000)


def test_sixteen_bit_png_scaled_to_eight_bit() -> None:
    arr16 = np.linspace(0, 65535, 40 * 60).reshape(40, 60).astype(np.uint16)
    data = _encode(Image.fromarray(arr16), "PNG")
    out = decode_image(data)
    assert out.shape == (40, 60, 3)
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert np.all(np.diff(out[..., 0].ravel().astype(int)) >= 0)


def test_empty_bytes() -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"")


def test_not_an_image() -> None:
    with pytest.raises(InvalidInput, match="not an image"):
        decode_image(b"hello, this is text, not pixels" * 10)


def test_truncated_png(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "PNG")
    with pytest.raises(InvalidInput, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def test_refusing_corrupt_pngs_leaks_nothing(rgb: np.ndarray, tmp_path) -> None:  # noqa: ANN001
    """Corrupt chunk names and truncations are refused, many times over, without leaking
    references. A faster libpng binding tried here (imagecodecs 2026.3.6) dropped one
    reference to `None` per failed decode on CPython 3.11: a few thousand bad images would
    have crashed the server ("Fatal Python error: none_dealloc"). Counted in a fresh
    interpreter, where no other thread moves the count."""
    import subprocess
    import sys

    data = _encode(Image.fromarray(rgb), "PNG")
    bad = [data[:pos] + b"\0" + data[pos + 1:] for pos in range(37, 41)] + [data[:60], data[:len(data) // 2]]
    for b in bad:
        with pytest.raises(InvalidInput, match="not an image|corrupt or truncated"):
            decode_image(b)
    for i, b in enumerate(bad):
        (tmp_path / f"{i}.png").write_bytes(b)
    script = f"""
import gc, pathlib, sys
from service.errors import InvalidInput
from service.runtime.imaging import decode_image
bad = [p.read_bytes() for p in pathlib.Path({str(tmp_path)!r}).glob("*.png")]
def refuse_all():
    for b in bad:
        try:
            decode_image(b)
        except InvalidInput:
            pass
refuse_all(); gc.collect()
before = sys.getrefcount(None)
for _ in range(500):
    refuse_all()
gc.collect()
print(before - sys.getrefcount(None))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 300  # 3000 refusals; a leaking decoder loses ≥ 3000


def test_byte_limit(rgb: np.ndarray) -> None:
    data = _encode(Image.fromarray(rgb), "PNG")
    with pytest.raises(InvalidInput, match="limit"):
        decode_image(data, max_bytes=len(data) - 1)


def test_decompression_bomb_refused_before_decoding() -> None:
    bomb = _encode(Image.new("L", (6000, 6000), 0), "PNG")  # ~36 MP, tiny file
    assert len(bomb) < 200_000
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(bomb, max_pixels=10_000_000)


def test_float_tiff_refused() -> None:
    data = _encode(Image.fromarray(np.zeros((8, 8), np.float32)), "TIFF")
    with pytest.raises(InvalidInput, match="float"):
        decode_image(data)


def test_raw_pixels(rgb: np.ndarray) -> None:
    assert np.array_equal(raw_to_rgb(rgb.tobytes(), 60, 40, 3), rgb)
    gray = raw_to_rgb(rgb[..., 0].tobytes(), 60, 40, 1)
    assert gray.shape == (40, 60, 3)
    g16 = (rgb[..., 0].astype("<u2") * 257).tobytes()
    assert np.array_equal(raw_to_rgb(g16, 60, 40, 1, 16)[..., 0], rgb[..., 0])
    with pytest.raises(InvalidInput, match="byte length"):
        raw_to_rgb(rgb.tobytes()[:-1], 60, 40, 3)
    with pytest.raises(InvalidInput, match="channels"):
        raw_to_rgb(rgb.tobytes(), 60, 20, 6)
    with pytest.raises(InvalidInput, match="zero size"):
        raw_to_rgb(b"", 0, 40, 3)


def test_preprocess_shape_and_range(rgb: np.ndarray) -> None:
    x = preprocess(rgb, (32, 48))
    assert x.shape == (3, 32, 48) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    same = preprocess(rgb, (40, 60))
    assert np.allclose(same, rgb.transpose(2, 0, 1) / 255.0)


def test_anomaly_map_png_scaled_to_image_size() -> None:
    amap = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    png = anomaly_map_png(amap, (40, 60), lo=0.0, hi=1.0)
    im = Image.open(io.BytesIO(png))
    assert im.size == (60, 40) and im.mode == "L"
    arr = np.asarray(im)
    assert arr[0, 0] < 20 and arr[-1, -1] > 235

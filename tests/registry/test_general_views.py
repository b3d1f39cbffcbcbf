"""The bundled general photos that Uninformed Students' teachers are distilled on."""

from __future__ import annotations

import numpy as np

from registry.data import sample
from registry.data.general import GENERAL_PHOTOS, general_views


def test_views_are_deterministic_varied_images_in_range() -> None:
    views = general_views(12, (48, 64), seed=3)
    assert views.shape == (12, 3, 48, 64) and views.dtype == np.float32
    assert 0.0 <= views.min() and views.max() <= 1.0
    np.testing.assert_array_equal(views, general_views(12, (48, 64), seed=3))
    assert not np.array_equal(views, general_views(12, (48, 64), seed=4))
    # varied: no two views alike, and not flat
    flat = views.reshape(12, -1)
    assert min(np.abs(flat[i] - flat[j]).mean() for i in range(12) for j in range(i)) > 0.01
    assert float(views.std(axis=(2, 3)).mean()) > 0.02


def test_no_general_photo_is_a_sample_data_source() -> None:
    """The sample data's photos (both families, the high-resolution and camera sets) stay
    unseen by the teachers."""
    sources = {sample._PHOTOS.get(c, c) for c in (*sample.TEXTURES, *sample.OBJECTS)}
    assert sources.isdisjoint(GENERAL_PHOTOS)
    assert len(GENERAL_PHOTOS) >= 10

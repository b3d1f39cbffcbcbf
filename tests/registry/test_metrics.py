"""AUPRO and AUROC on hand-made maps with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from registry.metrics import aupro, auroc


def _masks() -> np.ndarray:
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 4:10, 4:10] = True
    masks[1, 20:28, 3:6] = True
    masks[1, 2:5, 25:30] = True  # two regions in one image
    return masks


def test_perfect_map_scores_one() -> None:
    masks = _masks()
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-3)
    assert auroc(masks, masks.astype(float)) == pytest.approx(1.0)


def test_random_map_scores_about_fpr_over_two() -> None:
    masks = _masks()
    rng = np.random.default_rng(0)
    value = aupro(masks, rng.random(masks.shape))
    # PRO ≈ FPR for an uninformative map: area under y=x up to 0.3, over 0.3 → 0.15
    assert value == pytest.approx(0.15, abs=0.05)


def test_inverted_map_scores_zero_and_region_weighting() -> None:
    masks = _masks()
    assert aupro(masks, (~masks).astype(float)) == pytest.approx(0.0, abs=1e-3)
    # Detecting only the region of image 0: PRO 1/3 (one of three regions) at FPR 0; the
    # curve then rises linearly to (FPR 1, PRO 1), so up to 0.3 the area is a trapezoid.
    partial = np.zeros(masks.shape)
    partial[0][masks[0]] = 1.0
    at_limit = 1 / 3 + 0.3 * (2 / 3)
    assert aupro(masks, partial) == pytest.approx((1 / 3 + at_limit) / 2, abs=0.01)


def test_degenerate_inputs_are_nan() -> None:
    assert np.isnan(aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))))
    assert np.isnan(auroc(np.zeros(5), np.arange(5)))

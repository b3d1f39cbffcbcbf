"""Sample dataset generation and the MVTec AD loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from registry.data.mvtec import DatasetLayoutError, discover_categories, load_test_split, load_train_split
from registry.data.sample import DEFECT_TYPES, SampleSpec, make_sample_dataset

SMALL = SampleSpec(image_size=64, n_train=3, n_test_good=2, n_test_per_defect=2, seed=7)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make_sample_dataset(tmp_path / "a", categories=("gravel",), spec=SMALL)
    b = make_sample_dataset(tmp_path / "b", categories=("gravel",), spec=SMALL)
    c = make_sample_dataset(tmp_path / "c", categories=("gravel",),
                            spec=SampleSpec(**{**SMALL.__dict__, "seed": 8}))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_and_exact_masks(sample_root: Path) -> None:
    assert discover_categories(sample_root) == ["brick", "coffee"]
    train = load_train_split(sample_root)
    assert len(train) == 32 and all(s.label == 0 for s in train)
    test = load_test_split(sample_root)
    defects = {s.defect for s in test if s.label}
    assert defects == set(DEFECT_TYPES)
    for s in test:
        if s.label:
            mask = np.asarray(Image.open(s.mask_path)) > 0
            assert 20 < mask.sum() < mask.size // 4, s.path
        else:
            assert s.mask_path is None


def test_masks_mark_exactly_the_changed_pixels(tmp_path: Path) -> None:
    """Family 1: exactly the changed pixels. Family 2 and the high-resolution defects: the
    pixels of the defect's region some channel of which moved by `CHANGED` levels or more,
    and nothing outside the mask moved that much."""
    from registry.data import sample as sample_mod

    rng = np.random.default_rng(3)
    src = sample_mod._source_photo("brick")
    good = sample_mod._good_image(src, "brick", 96, rng)
    donor = sample_mod._good_image(sample_mod._source_photo("grass"), "grass", 96, rng)
    for name, fn in {**sample_mod.DEFECTS, **sample_mod.HIGHRES_DEFECTS}.items():
        img, mask = fn(good, np.random.default_rng(1), donor=donor)
        if name in DEFECT_TYPES:
            assert np.array_equal(np.any(img != good, axis=-1), mask), name
        else:
            moved = np.abs(img.astype(int) - good.astype(int)).max(axis=-1)
            assert mask.any() and (moved[mask] >= sample_mod.CHANGED).all(), name
            assert (moved[~mask] < sample_mod.CHANGED).all(), name


def test_second_family_other_photos_other_defects(tmp_path: Path) -> None:
    from registry.data.sample import FAMILY_DEFECTS, MIN_DEFECT_FRACTION

    root = make_sample_dataset(tmp_path / "f2", spec=SampleSpec(**{**SMALL.__dict__, "family": 2}))
    assert discover_categories(root) == ["coins", "ihc", "moon"]
    test = load_test_split(root)
    assert {s.defect for s in test if s.label} == set(FAMILY_DEFECTS[2])
    for s in test:
        if s.label:
            assert (np.asarray(Image.open(s.mask_path)) > 0).mean() >= MIN_DEFECT_FRACTION * 0.99, s.path
    with pytest.raises(ValueError, match="family"):
        make_sample_dataset(tmp_path / "f3", spec=SampleSpec(family=3))


def test_highres_category_has_small_defects(tmp_path: Path) -> None:
    from registry.data.sample import HIGHRES_CATEGORY, HighResSpec, make_highres_category

    root = make_highres_category(tmp_path / "hr", HighResSpec(image_size=512, n_train=2, n_test_good=1,
                                                             n_test_per_defect=2))
    test = load_test_split(root)
    assert {s.category for s in test} == {HIGHRES_CATEGORY} and len(load_train_split(root)) == 2
    for s in test:
        assert Image.open(s.path).size == (512, 512)
        if s.label:  # a defect covers well under 1 % of the frame
            assert 0 < (np.asarray(Image.open(s.mask_path)) > 0).mean() < 0.01, s.path


def test_wrong_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_train_split(tmp_path / "missing")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(DatasetLayoutError, match="MVTec AD layout"):
        load_train_split(tmp_path / "flat")
    (tmp_path / "empty" / "cat" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no images"):
        load_train_split(tmp_path / "empty")


def test_unknown_category_and_missing_mask(sample_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="not found"):
        load_train_split(sample_root, ["nope"])
    root = make_sample_dataset(tmp_path / "d", categories=("grass",), spec=SMALL)
    next((root / "grass" / "ground_truth" / "patch").iterdir()).unlink()
    with pytest.raises(DatasetLayoutError, match="mask"):
        load_test_split(root)

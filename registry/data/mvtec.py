"""Read an MVTec-AD-style dataset: the real one from a path, or the generated sample.

Only the folder layout is read here (no pixels): a list of `Sample` records. Pixels are
decoded later by `service.runtime.imaging`, the same code the server runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from anomaly.wire import IMAGE_SUFFIXES


class DatasetLayoutError(ValueError):
    """The folder is not in MVTec AD layout, or holds no images."""


@dataclass(frozen=True)
class Sample:
    """One image of the dataset."""

    path: Path
    category: str
    label: int  # 0 good, 1 defective
    defect: str  # "good" or the defect type
    mask_path: Path | None = None


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def discover_categories(root: Path | str) -> list[str]:
    """Categories under `root`: folders that have a `train/good` folder.

    Raises:
        DatasetLayoutError: if `root` is missing or has no category folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist")
    cats = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    if not cats:
        raise DatasetLayoutError(
            f"{root} is not in MVTec AD layout: expected <root>/<category>/train/good/*.png "
            "(and test/<defect>/, ground_truth/<defect>/*_mask.png)"
        )
    return cats


def _resolve_categories(root: Path, categories: list[str] | None) -> list[str]:
    available = discover_categories(root)
    if not categories:
        return available
    missing = [c for c in categories if c not in available]
    if missing:
        raise DatasetLayoutError(f"categories {missing} not found in {root}; available: {available}")
    return list(categories)


def load_train_split(root: Path | str, categories: list[str] | None = None) -> list[Sample]:
    """Good training images of the given (default: all) categories.

    Raises:
        DatasetLayoutError: on a wrong layout or a category without images.
    """
    root = Path(root)
    out: list[Sample] = []
    for cat in _resolve_categories(root, categories):
        imgs = _images(root / cat / "train" / "good")
        if not imgs:
            raise DatasetLayoutError(f"no images in {root / cat / 'train' / 'good'}")
        out += [Sample(p, cat, 0, "good") for p in imgs]
    return out


def load_test_split(root: Path | str, categories: list[str] | None = None) -> list[Sample]:
    """Test images (good and defective, with mask paths) of the given categories.

    Raises:
        DatasetLayoutError: on a wrong layout, no test images, or a missing mask.
    """
    root = Path(root)
    out: list[Sample] = []
    for cat in _resolve_categories(root, categories):
        test_dir = root / cat / "test"
        if not test_dir.is_dir():
            raise DatasetLayoutError(f"{test_dir} is missing")
        for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect = defect_dir.name
            for img in _images(defect_dir):
                if defect == "good":
                    out.append(Sample(img, cat, 0, "good"))
                    continue
                mask = root / cat / "ground_truth" / defect / f"{img.stem}_mask.png"
                if not mask.is_file():
                    raise DatasetLayoutError(f"mask {mask} for {img} is missing")
                out.append(Sample(img, cat, 1, defect, mask))
        if not any(s.category == cat for s in out):
            raise DatasetLayoutError(f"no test images under {test_dir}")
    return out


def fingerprint(samples: list[Sample]) -> str:
    """A short content hash of the files (names and bytes) of a sample list."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: str(s.path)):
        h.update(f"{s.category}/{s.defect}/{s.path.name}".encode())
        h.update(s.path.read_bytes())
    return h.hexdigest()[:16]

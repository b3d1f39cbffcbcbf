"""Anomaly-detection metrics: AUROC (via scikit-learn) and AUPRO.

AUPRO (Bergmann et al., MVTec AD): the per-region overlap (PRO) — for each connected
defect region, the fraction of its pixels above the threshold, averaged over regions —
integrated over the false-positive rate on normal pixels from 0 to `fpr_limit` (0.3) and
divided by `fpr_limit`, so a perfect detector scores 1.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC, NaN when only one class is present."""
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3,
          num_thresholds: int = 400) -> float:
    """Normalised area under the PRO curve up to `fpr_limit`.

    Args:
        masks: `(N, H, W)` bool ground truth.
        maps: `(N, H, W)` anomaly maps (higher = more anomalous).
        fpr_limit: upper integration bound of the false-positive rate.
        num_thresholds: thresholds sampled between the map's min and max.

    Returns:
        AUPRO in [0, 1], NaN when there is no defect region or no normal pixel.
    """
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    normal = np.sort(maps[~masks])
    if normal.size == 0:
        return float("nan")
    regions = []
    for m, amap in zip(masks, maps, strict=True):
        labelled, n = label(m)
        regions += [np.sort(amap[labelled == r]) for r in range(1, n + 1)]
    if not regions:
        return float("nan")
    thresholds = np.linspace(maps.max(), maps.min(), num_thresholds)
    fpr = 1.0 - np.searchsorted(normal, thresholds, side="left") / normal.size
    pro = np.mean([1.0 - np.searchsorted(r, thresholds, side="left") / r.size for r in regions], axis=0)
    order = np.argsort(fpr, kind="stable")
    fpr, pro = fpr[order], pro[order]
    keep = fpr <= fpr_limit
    x = np.concatenate([[0.0], fpr[keep], [fpr_limit]])
    y = np.concatenate([[pro[keep][0] if keep.any() else 0.0], pro[keep],
                        [np.interp(fpr_limit, fpr, pro)]])
    return float(np.trapezoid(y, x) / fpr_limit)

"""STFPM anomaly map: product over levels of the per-pixel feature distance, upsampled."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def stfpm_anomaly_map(
    teacher: list[torch.Tensor], student: list[torch.Tensor], size: tuple[int, int]
) -> torch.Tensor:
    """Per level `0.5 · ‖t̂ − ŝ‖²` over channels `(B, 1, h, w)`, bilinearly upsampled to
    `size`, multiplied together. Returns `(B, 1, H, W)`."""
    amap: torch.Tensor | None = None
    for t, s in zip(teacher, student, strict=True):
        d = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1, keepdim=True)
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        amap = d if amap is None else amap * d
    assert amap is not None
    return amap

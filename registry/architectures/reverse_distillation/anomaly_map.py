"""Reverse-distillation anomaly map: per-level `1 − cos`, upsampled and summed."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from registry.architectures.common import upsample_to


def rd_anomaly_map(encoder: list[torch.Tensor], decoder: list[torch.Tensor],
                   size: tuple[int, int]) -> torch.Tensor:
    """`(B, 1, H, W)`: Σ_levels upsample(1 − cos(e, d))."""
    amap = None
    for e, d in zip(encoder, decoder, strict=True):
        level = upsample_to((1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), size)
        amap = level if amap is None else amap + level
    assert amap is not None
    return amap

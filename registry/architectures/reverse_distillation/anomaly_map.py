"""Reverse-distillation anomaly map: per-level `1 − cos`, upsampled and combined."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from registry.architectures.common import upsample_to

LEVEL_COMBINATIONS = ("product", "sum")


def rd_anomaly_map(encoder: list[torch.Tensor], decoder: list[torch.Tensor],
                   size: tuple[int, int], combine: str = "product") -> torch.Tensor:
    """`(B, 1, H, W)`: the levels' `upsample(1 − cos(e, d))`, multiplied (`product`: a
    position scores high only where every level disagrees, as STFPM's map) or added (`sum`:
    Deng & Li's map)."""
    if combine not in LEVEL_COMBINATIONS:
        raise ValueError(f"level_combine must be one of {LEVEL_COMBINATIONS}, not {combine!r}")
    amap = None
    for e, d in zip(encoder, decoder, strict=True):
        level = upsample_to((1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), size)
        if amap is None:
            amap = level
        else:
            amap = amap * level if combine == "product" else amap + level
    assert amap is not None
    return amap

"""Reverse-distillation anomaly map: per-level `1 − cos`, upsampled and combined."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from registry.architectures.common import upsample_to

LEVEL_COMBINATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "product": torch.mul,  # a position scores high only where every level disagrees (STFPM's map)
    "sum": torch.add,  # Deng & Li's map
}


def level_operation(combine: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The operation that combines two levels' maps for `level_combine` = `combine`.

    Raises:
        ValueError: `combine` is not one of `LEVEL_COMBINATIONS`.
    """
    try:
        return LEVEL_COMBINATIONS[combine]
    except KeyError:
        raise ValueError(f"level_combine must be one of {tuple(LEVEL_COMBINATIONS)}, "
                         f"not {combine!r}") from None


def rd_anomaly_map(encoder: list[torch.Tensor], decoder: list[torch.Tensor],
                   size: tuple[int, int], combine: str = "product") -> torch.Tensor:
    """`(B, 1, H, W)`: the levels' `upsample(1 − cos(e, d))`, multiplied (`product`) or
    added (`sum`)."""
    op = level_operation(combine)
    amap = None
    for e, d in zip(encoder, decoder, strict=True):
        level = upsample_to((1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), size)
        amap = level if amap is None else op(amap, level)
    assert amap is not None
    return amap

"""Reverse-distillation loss: 1 − cosine similarity of encoder and decoder features."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def rd_loss(encoder: list[torch.Tensor], decoder: list[torch.Tensor]) -> torch.Tensor:
    """Σ_levels mean over (B, h, w) of `1 − cos(e, d)` along channels."""
    total = encoder[0].new_zeros(())
    for e, d in zip(encoder, decoder, strict=True):
        total = total + (1 - F.cosine_similarity(e, d, dim=1)).mean()
    return total

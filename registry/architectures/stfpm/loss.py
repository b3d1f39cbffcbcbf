"""STFPM loss: squared distance of channel-L2-normalised features, summed over levels."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def stfpm_loss(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> torch.Tensor:
    """Σ_levels 0.5 / (h·w) · ‖t̂ − ŝ‖², averaged over the batch.

    Args:
        teacher: per level `(B, C, h, w)` teacher features.
        student: the matching student features.
    """
    total = teacher[0].new_zeros(())
    for t, s in zip(teacher, student, strict=True):
        h, w = t.shape[-2:]
        diff = F.normalize(t, dim=1) - F.normalize(s, dim=1)
        total = total + 0.5 / (h * w) * diff.pow(2).sum() / t.shape[0]
    return total

"""Losses of Uninformed Students: teacher distillation and student regression."""

from __future__ import annotations

import torch


def teacher_distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between decoded teacher descriptors and backbone features."""
    return (decoded - target).pow(2).sum(1).mean()


def student_loss(target: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """Mean over students and positions of ‖S_m − t̂‖² (channels summed).

    Args:
        target: standardised teacher descriptors `(B, dim, h, w)`.
        preds: student descriptors `(M, B, dim, h, w)`.
    """
    return (preds - target.unsqueeze(0)).pow(2).sum(2).mean()

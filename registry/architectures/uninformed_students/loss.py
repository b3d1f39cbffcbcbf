"""Losses of Uninformed Students: teacher distillation, descriptor compactness and student
regression."""

from __future__ import annotations

import torch


def teacher_distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between decoded teacher descriptors and backbone features."""
    return (decoded - target).pow(2).sum(1).mean()


def compactness_loss(desc: torch.Tensor) -> torch.Tensor:
    """Decorrelation of the descriptor dimensions (the paper's compactness loss L_c): the
    mean squared off-diagonal entry of their correlation matrix over every position of the
    batch, so that each dimension carries information the others do not.

    Args:
        desc: teacher descriptors `(B, dim, h, w)`.
    """
    x = desc.permute(1, 0, 2, 3).flatten(1)  # (dim, positions)
    x = x - x.mean(1, keepdim=True)
    x = x / x.std(1, keepdim=True).clamp_min(1e-6)
    corr = x @ x.T / x.shape[1]
    off = corr - torch.diag_embed(torch.diagonal(corr))
    n = corr.shape[0]
    return off.pow(2).sum() / (n * (n - 1))


def student_loss(target: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """Mean over students and positions of ‖S_m − t̂‖² (channels summed).

    Args:
        target: standardised teacher descriptors `(B, dim, h, w)`.
        preds: student descriptors `(M, B, dim, h, w)`.
    """
    return (preds - target.unsqueeze(0)).pow(2).sum(2).mean()

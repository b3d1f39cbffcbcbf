"""Regression error, angular error and predictive variance of the student ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def us_anomaly_map(target: torch.Tensor,
                   preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position `(B, 1, h, w)`: error ‖mean S − t̂‖², variance mean‖S_m‖² − ‖mean S‖², and
    angular error 1 − cos(mean S, t̂) (the error's direction alone, blind to its magnitude)."""
    mean = preds.mean(0)
    err = (mean - target).pow(2).sum(1, keepdim=True)
    var = (preds.pow(2).sum(2).mean(0) - mean.pow(2).sum(1)).unsqueeze(1)
    angle = 1 - F.cosine_similarity(mean, target, dim=1, eps=1e-6).unsqueeze(1)
    return err, var, angle

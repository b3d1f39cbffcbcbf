"""Regression error and predictive variance of the student ensemble."""

from __future__ import annotations

import torch


def us_anomaly_map(target: torch.Tensor, preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position `(B, 1, h, w)`: error ‖mean S − t̂‖² and variance mean‖S_m‖² − ‖mean S‖²."""
    mean = preds.mean(0)
    err = (mean - target).pow(2).sum(1, keepdim=True)
    var = (preds.pow(2).sum(2).mean(0) - mean.pow(2).sum(1)).unsqueeze(1)
    return err, var

"""Small building blocks shared by several architectures."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class GaussianBlur(nn.Module):
    """Fixed separable Gaussian smoothing of a `(B, 1, H, W)` map (part of the graph)."""

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        radius = int(math.ceil(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        k = k / k.sum()
        self.register_buffer("kx", k.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("ky", k.view(1, 1, -1, 1), persistent=False)
        self.radius = radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        r = self.radius
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), self.kx)
        return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), self.ky)


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of `(B, C, h, w)` to `size`."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

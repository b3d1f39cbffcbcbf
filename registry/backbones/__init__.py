"""Pretrained feature extractors, written here (no timm / torchvision)."""

from __future__ import annotations

from pathlib import Path

import torch

from registry.backbones.efficientnet_lite import EfficientNetLite0, efficientnet_lite0

BACKBONES = ("efficientnet_lite0",)


def build_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None,
                   stages: tuple[int, ...] | None = None) -> EfficientNetLite0:
    """A backbone with `.features(x, stages)` and `.default_stages`, truncated to them.

    Raises:
        ValueError: for an unknown backbone name.
    """
    if name == "efficientnet_lite0":
        model = efficientnet_lite0(pretrained=pretrained, weights=Path(weights) if weights else None)
        if not pretrained and weights is None:
            # Trained from scratch (a student): torch's default BN momentum, so the running
            # statistics keep up; 0.01 suits only the fine-tuning of ported TF weights.
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.momentum = 0.1
        return model.truncate(max(stages or model.default_stages))
    raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")


__all__ = ["BACKBONES", "EfficientNetLite0", "build_backbone", "efficientnet_lite0"]

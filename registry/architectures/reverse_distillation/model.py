"""Reverse Distillation (Deng & Li, CVPR 2022).

A frozen pretrained encoder (the teacher) gives features at three levels; a trainable
one-class bottleneck (OCBE: multi-scale feature fusion + a residual block) squeezes them
into a compact embedding; a student *decoder* reconstructs the encoder's features in
reverse order (deep → shallow). On normal images the reconstruction is good; where an
anomaly is, the bottleneck cannot carry it and the decoder's features disagree.
"""

from __future__ import annotations

import torch
from torch import nn

from registry.architectures.base import AnomalyModel, ModelConfig
from registry.architectures.common import GaussianBlur
from registry.architectures.reverse_distillation.anomaly_map import level_operation, rd_anomaly_map
from registry.architectures.reverse_distillation.loss import rd_loss


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Basic residual block with a projection skip (the OCE block of the bottleneck)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn_relu(cin, cout, stride),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.relu(self.body(x) + self.skip(x))


class Bottleneck(nn.Module):
    """OCBE: bring all levels to the deepest resolution, concatenate, one residual block
    with stride 2 → the one-class embedding `(B, emb, H/32, W/32)` (for strides 4/8/16)."""

    def __init__(self, channels: list[int], embedding: int) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c3, 2))
        self.fuse2 = _conv_bn_relu(c2, c3, 2)
        self.oce = ResidualBlock(3 * c3, embedding, 2)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:  # noqa: D102
        f1, f2, f3 = feats
        return self.oce(torch.cat([self.fuse1(f1), self.fuse2(f2), f3], dim=1))


class DecoderStage(nn.Module):
    """×2 transposed-conv upsampling, a 3×3 conv (both BN + ReLU), and a linear 1×1
    projection: encoder features may be negative (EfficientNet stage outputs are linear)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, 2, bias=False),
                                nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.conv = _conv_bn_relu(cout, cout)
        self.project = nn.Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.project(self.conv(self.up(x)))


class ReverseDistillation(AnomalyModel):
    """Unified Reverse Distillation; `config.extra`: `embedding` channels (default 4·c3),
    `blur_sigma` of the anomaly map (default 4), `level_combine` of its three levels
    (`product`, the default, or `sum` as published; docs/results.md, "Closing the family-2
    gap")."""

    name = "rd"
    options = ("stages", "embedding", "blur_sigma", "level_combine")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.encoder = self.pretrained_backbone()
        self.stages = tuple(config.extra.get("stages") or self.encoder.default_stages)
        if len(self.stages) != 3:
            raise ValueError("reverse distillation uses exactly three encoder levels")
        ch = [self.encoder.channels(s) for s in self.stages]
        emb = int(config.extra.get("embedding", 4 * ch[2]))
        self.bottleneck = Bottleneck(ch, emb)
        self.decoder = nn.ModuleList([DecoderStage(emb, ch[2]), DecoderStage(ch[2], ch[1]),
                                      DecoderStage(ch[1], ch[0])])
        self.blur = GaussianBlur(float(config.extra.get("blur_sigma", 4.0)))
        self.combine = str(config.extra.get("level_combine", "product"))
        level_operation(self.combine)  # an unknown value fails here, not at the first batch

    def _features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            enc = self.encoder.features(self.normalize(images), self.stages)
        x = self.bottleneck(enc)
        dec = []
        for stage in self.decoder:
            x = stage(x)
            dec.append(x)
        return enc, dec[::-1]  # shallowest first, like the encoder

    def loss(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return rd_loss(*self._features(images))

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        enc, dec = self._features(images)
        return self.blur(rd_anomaly_map(enc, dec, tuple(images.shape[-2:]), self.combine))

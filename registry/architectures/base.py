"""The one interface every anomaly-detection architecture implements.

A model takes `(B, 3, H, W)` RGB in [0, 1] (ImageNet normalisation happens inside, so it
is part of the exported graph). In training mode `loss(images)` returns the scalar to
minimise; in eval mode `forward(images)` returns the anomaly map `(B, 1, H, W)` and the
image score `(B,)` (max of the map, away from the edges). Every architecture therefore exports to the same
ONNX contract and the server needs no per-architecture code. Two optional hooks,
`fit_setup` and `fit_finalize`, run before and after the training loop for methods with
extra phases. A new architecture is one new sub-package that subclasses `AnomalyModel`
and is listed in `ARCHITECTURES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Options shared by all architectures (each may read extra keys from `extra`)."""

    input_size: tuple[int, int] = (256, 256)
    backbone: str = "efficientnet_lite0"
    backbone_weights: str | None = None  # a state-dict file; None = bundled weights
    # The image score ignores this fraction of the side at each image edge: zero padding
    # makes CNN features there unreliable, and the spurious maxima of normal images sit
    # there (measured on the sample data). The anomaly map itself covers the whole image.
    score_margin_fraction: float = 1 / 32
    extra: dict[str, object] = field(default_factory=dict)
    # False when every weight will come from a saved state dict (`registry.checkpoint`):
    # the backbone is then built without loading ImageNet weights.
    pretrained: bool = True


class Normalize(nn.Module):
    """`(x - mean) / std` per channel, baked into the graph."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return (x - self.mean) / self.std


class AnomalyModel(nn.Module, ABC):
    """Base class of all architectures. Subclasses implement `loss` and `anomaly_map`."""

    name: str = ""
    # The `config.extra` keys this architecture reads (`anomaly build --options` checks them).
    options: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.normalize = Normalize()

    @abstractmethod
    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Training loss for a batch `(B, 3, H, W)` in [0, 1]."""

    @abstractmethod
    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly map `(B, 1, H, W)` at input resolution (higher = more anomalous)."""

    @staticmethod
    def freeze(module: nn.Module) -> nn.Module:
        """Stop gradients into `module` and keep it in eval mode (frozen batch-norm), even
        when the model is switched to training."""
        for p in module.parameters():
            p.requires_grad_(False)
        module.frozen = True  # read by `train`
        return module.eval()

    def pretrained_backbone(self) -> nn.Module:
        """The configured ImageNet backbone, frozen, truncated to the levels in use."""
        from registry.backbones import build_backbone

        return self.freeze(build_backbone(self.config.backbone, pretrained=self.config.pretrained,
                                          weights=self.config.backbone_weights,
                                          stages=self.config.extra.get("stages")))

    def train(self, mode: bool = True) -> AnomalyModel:
        """Switch mode; frozen sub-modules stay in eval."""
        super().train(mode)
        for m in self.modules():
            if getattr(m, "frozen", False):
                m.eval()
        return self

    def fit_setup(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Hook before the main training loop (e.g. distil a teacher). Default: nothing.

        Args:
            images: all training images `(N, 3, H, W)` in [0, 1].
            batch_size: batch size of the run.
            lr: learning rate of the run.
        """

    def fit_finalize(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Hook after training, best weights loaded (e.g. normalisation statistics)."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimiser updates (default: all that require grad)."""
        return (p for p in self.parameters() if p.requires_grad)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The optimiser this architecture trains best with (override to change)."""
        return torch.optim.Adam(self.trainable_parameters(), lr=lr)

    @property
    def score_margin(self) -> int:
        """Pixels ignored at each edge when taking the image score."""
        return int(round(min(self.config.input_size) * self.config.score_margin_fraction))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval/export path: `(anomaly_map (B, 1, H, W), score (B,))`.

        The score is the maximum of the map inside the `score_margin` border.
        """
        amap = self.anomaly_map(images)
        m = self.score_margin
        inner = amap[..., m:amap.shape[-2] - m, m:amap.shape[-1] - m] if m else amap
        return amap, inner.flatten(1).amax(dim=1)

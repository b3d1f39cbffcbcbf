"""STFPM: student–teacher feature pyramid matching (Wang et al., 2021).

A frozen ImageNet-pretrained teacher and a randomly initialised student of the same
architecture see the same image; the student learns to reproduce the teacher's
channel-normalised features at three pyramid levels on normal images only. Where it
fails to (defects it never saw), the feature distance is large.
"""

from __future__ import annotations

import torch

from registry.architectures.base import AnomalyModel, ModelConfig
from registry.architectures.stfpm.anomaly_map import stfpm_anomaly_map
from registry.architectures.stfpm.loss import stfpm_loss
from registry.backbones import build_backbone


class STFPM(AnomalyModel):
    """Unified STFPM over all categories; see module docstring.

    `config.extra["stages"]` picks the pyramid levels (backbone stage indices);
    default: the stages at strides 4, 8 and 16.
    """

    name = "stfpm"
    options = ("stages",)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        stages = config.extra.get("stages")
        self.teacher = self.pretrained_backbone()
        self.student = build_backbone(config.backbone, pretrained=False, stages=stages)
        self.stages = tuple(stages or self.teacher.default_stages)

    def _features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = self.normalize(images)
        with torch.no_grad():
            t = self.teacher.features(x, self.stages)
        s = self.student.features(x, self.stages)
        return t, s

    def loss(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return stfpm_loss(*self._features(images))

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        t, s = self._features(images)
        return stfpm_anomaly_map(t, s, tuple(images.shape[-2:]))

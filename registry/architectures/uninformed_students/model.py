"""Uninformed Students (Bergmann et al., CVPR 2020), dense and CPU-sized.

1. A *patch-descriptor teacher* (a small fully convolutional network, receptive field
   37 px, descriptors at stride 4) is distilled from the pretrained backbone on the normal
   training images: a 1×1 linear decoder maps its descriptors onto the backbone's
   stride-4 and stride-8 features (`fit_setup`).
2. An ensemble of students (same architecture, random init) regresses the teacher's
   descriptors, standardised with the teacher's per-channel mean/std on the training data.
3. Anomaly score per position = regression error ‖mean(S) − t̂‖² + predictive variance
   (mean ‖S_m‖² − ‖mean S‖²), each standardised with its mean/std over the training
   images (`fit_finalize`), summed, upsampled to the input size.

Single patch size (37 px at 256²) to fit the CPU budget; the multi-scale variant of the
paper averages three such ensembles with 17/33/65 px receptive fields.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from registry.architectures.base import AnomalyModel, ModelConfig
from registry.architectures.common import upsample_to
from registry.architectures.uninformed_students.anomaly_map import us_anomaly_map
from registry.architectures.uninformed_students.loss import student_loss, teacher_distillation_loss
from registry.backbones import build_backbone

log = logging.getLogger(__name__)


class PatchNet(nn.Module):
    """Dense patch-descriptor network: `(B, 3, H, W)` → `(B, dim, H/4, W/4)`, RF 37 px."""

    def __init__(self, dim: int = 64, width: int = 32) -> None:
        super().__init__()
        act = nn.LeakyReLU(5e-3)
        self.net = nn.Sequential(
            nn.Conv2d(3, width // 2, 5, 2, 2), act,
            nn.Conv2d(width // 2, width, 3, 1, 1), act,
            nn.Conv2d(width, width, 3, 2, 1), act,
            nn.Conv2d(width, 2 * width, 3, 1, 1), act,
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1), act,
            nn.Conv2d(2 * width, 2 * width, 3, 1, 1), act,
            nn.Conv2d(2 * width, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class UninformedStudents(AnomalyModel):
    """`config.extra`: `students` (3), `dim` (64), `teacher_epochs` (default: 20)."""

    name = "us"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        dim = int(config.extra.get("dim", 64))
        self.teacher_epochs = int(config.extra.get("teacher_epochs", 20))
        self.backbone = self.freeze(build_backbone(config.backbone, pretrained=config.pretrained,
                                                   weights=config.backbone_weights))
        self.backbone_stages = tuple(self.backbone.default_stages[:2])
        target_ch = sum(self.backbone.channels(s) for s in self.backbone_stages)
        self.teacher = PatchNet(dim)
        self.decoder = nn.Conv2d(dim, target_ch, 1)  # teacher → backbone feature space
        self.students = nn.ModuleList(PatchNet(dim) for _ in range(int(config.extra.get("students", 3))))
        self.register_buffer("t_mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("t_std", torch.ones(1, dim, 1, 1))
        self.register_buffer("err_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("var_stats", torch.tensor([0.0, 1.0]))

    def trainable_parameters(self):  # noqa: D102
        return self.students.parameters()

    # -- phase 1: distil the patch-descriptor teacher from the backbone ---------------
    def _backbone_targets(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone.features(self.normalize(images), self.backbone_stages)
            size = tuple(feats[0].shape[-2:])
            return torch.cat([feats[0], upsample_to(feats[1], size)], dim=1)

    def fit_setup(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Distil the teacher on the training images, then fix its descriptor statistics."""
        params = list(self.teacher.parameters()) + list(self.decoder.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(0)
        for epoch in range(self.teacher_epochs):
            perm = torch.randperm(len(images), generator=gen)
            losses = []
            for i in range(0, len(images), batch_size):
                batch = images[perm[i:i + batch_size]]
                loss = teacher_distillation_loss(self.decoder(self.teacher(self.normalize(batch))),
                                                 self._backbone_targets(batch))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            log.info("teacher distillation epoch %d loss %.4f", epoch + 1, sum(losses) / len(losses))
        self.freeze(self.teacher)
        self.freeze(self.decoder)
        with torch.no_grad():
            desc = torch.cat([self.teacher(self.normalize(images[i:i + batch_size]))
                              for i in range(0, len(images), batch_size)])
            self.t_mean.copy_(desc.mean(dim=(0, 2, 3), keepdim=True))
            self.t_std.copy_(desc.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def _descriptors(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize(images)
        with torch.no_grad():
            target = (self.teacher(x) - self.t_mean) / self.t_std
        preds = torch.stack([s(x) for s in self.students])  # (M, B, dim, h, w)
        return target, preds

    # -- phase 2: students ------------------------------------------------------------
    def loss(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return student_loss(*self._descriptors(images))

    def fit_finalize(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Standardisation statistics of error and variance over the training images."""
        errs, variances = [], []
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                e, v = us_anomaly_map(*self._descriptors(images[i:i + batch_size]))
                errs.append(e.flatten())
                variances.append(v.flatten())
        e, v = torch.cat(errs), torch.cat(variances)
        self.err_stats.copy_(torch.stack([e.mean(), e.std().clamp_min(1e-6)]))
        self.var_stats.copy_(torch.stack([v.mean(), v.std().clamp_min(1e-6)]))

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        e, v = us_anomaly_map(*self._descriptors(images))
        score = (e - self.err_stats[0]) / self.err_stats[1] + (v - self.var_stats[0]) / self.var_stats[1]
        return upsample_to(score, tuple(images.shape[-2:]))

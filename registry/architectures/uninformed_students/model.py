"""Uninformed Students (Bergmann et al., CVPR 2020), dense and CPU-sized, multi-scale as
published.

For each patch size p (default 17, 33 and 65 px, as in the paper):

1. A *patch-descriptor teacher* (a small fully convolutional network whose receptive
   field is p px; descriptors every 4 px, every 8 px for 65) is distilled from the
   pretrained backbone on the normal training images: a 1×1 linear decoder maps its
   descriptors onto the backbone's stride-4 and stride-8 features (`teacher_stages` 2; 3 adds
   stride 16, which did not help on sample family 2), with the compactness
   loss decorrelating the descriptor dimensions (`fit_setup`).
2. An ensemble of students (same architecture, random init) regresses the teacher's
   descriptors, standardised with the teacher's per-channel mean/std on the training data.
3. Anomaly score per position = regression error ‖mean(S) − t̂‖², standardised with its
   mean/std over the training images (`fit_finalize`), upsampled to the input size. The
   paper adds the ensemble's predictive variance (mean ‖S_m‖² − ‖mean S‖², standardised
   the same way); `variance_weight` (default 0) weighs it in. Measured here (docs/results.md,
   "Uninformed Students as published"), the error alone scores the sample data's images
   better: 0.947 image AUROC against 0.914 with the variance on family 1, equal (0.744) on
   family 2, from the same trained model.

The scales' scores are averaged (the paper's multi-scale combination). The metric-learning
(triplet) term of the teacher's loss is left out: it needs image pairs the CPU budget has
no room for. The averaged map is smoothed with a Gaussian (as Reverse Distillation's and
anomalib's maps are) before the image score takes its maximum. `config.extra`:
`patch_sizes`, `students` (per scale, 3), `dim` (64), `width` (32), `teacher_epochs` (20),
`compactness` (weight of the decorrelation term, 1.0), `variance_weight` (0; the paper's
score is 1), `blur_sigma` (4; 0 turns it off).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from registry.architectures.base import AnomalyModel, ModelConfig
from registry.architectures.common import GaussianBlur, upsample_to
from registry.architectures.uninformed_students.anomaly_map import us_anomaly_map
from registry.architectures.uninformed_students.loss import (
    compactness_loss,
    student_loss,
    teacher_distillation_loss,
)
from registry.backbones import build_backbone

log = logging.getLogger(__name__)

# Layers per patch size: (kernel, stride, width multiplier), then a 1×1 to `dim`; the
# receptive field is exactly the patch size (17: 5s2 3s2 3; 33: two more 3×3; 65: 5s2 3s2
# 3 3 3s2 3 3).
LAYERS: dict[int, list[tuple[int, int, int]]] = {
    17: [(5, 2, 1), (3, 2, 2), (3, 1, 2)],
    33: [(5, 2, 1), (3, 2, 2), (3, 1, 2), (3, 1, 2), (3, 1, 2)],
    65: [(5, 2, 1), (3, 2, 2), (3, 1, 2), (3, 1, 2), (3, 2, 2), (3, 1, 2), (3, 1, 2)],
}
DEFAULT_PATCH_SIZES = (17, 33, 65)


class PatchNet(nn.Module):
    """Dense patch-descriptor network with a receptive field of `patch` px:
    `(B, 3, H, W)` → `(B, dim, H/s, W/s)` (s = 4, or 8 for 65 px)."""

    def __init__(self, patch: int, dim: int = 64, width: int = 32) -> None:
        super().__init__()
        if patch not in LAYERS:
            raise ValueError(f"patch size {patch} not available; choose from {sorted(LAYERS)}")
        act = nn.LeakyReLU(5e-3)
        layers: list[nn.Module] = []
        ch = 3
        for kernel, stride, mult in LAYERS[patch]:
            out = width * mult // 2 if ch == 3 else width * mult
            layers += [nn.Conv2d(ch, out, kernel, stride, kernel // 2), act]
            ch = out
        layers.append(nn.Conv2d(ch, dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class Scale(nn.Module):
    """One patch size: teacher, its decoder onto the backbone, students, statistics."""

    def __init__(self, patch: int, dim: int, width: int, students: int, target_ch: int,
                 variance_weight: float = 0.0) -> None:
        super().__init__()
        self.patch = patch
        self.variance_weight = variance_weight
        self.teacher = PatchNet(patch, dim, width)
        self.decoder = nn.Conv2d(dim, target_ch, 1)  # teacher → backbone feature space
        self.students = nn.ModuleList(PatchNet(patch, dim, width) for _ in range(students))
        self.register_buffer("t_mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("t_std", torch.ones(1, dim, 1, 1))
        self.register_buffer("err_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("var_stats", torch.tensor([0.0, 1.0]))

    def descriptors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised teacher descriptors and the students' `(M, B, dim, h, w)`."""
        with torch.no_grad():
            target = (self.teacher(x) - self.t_mean) / self.t_std
        return target, torch.stack([s(x) for s in self.students])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised error (+ `variance_weight` × standardised variance) `(B, 1, h, w)` on
        this scale's grid."""
        e, v = us_anomaly_map(*self.descriptors(x))
        score = (e - self.err_stats[0]) / self.err_stats[1]
        if self.variance_weight:
            score = score + self.variance_weight * (v - self.var_stats[0]) / self.var_stats[1]
        return score


class UninformedStudents(AnomalyModel):
    """Multi-scale Uninformed Students (see the module docstring for `config.extra`)."""

    name = "us"

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        extra = config.extra
        dim, width = int(extra.get("dim", 64)), int(extra.get("width", 32))
        self.teacher_epochs = int(extra.get("teacher_epochs", 20))
        self.compactness = float(extra.get("compactness", 1.0))
        sigma = float(extra.get("blur_sigma", 4.0))  # type: ignore[arg-type]
        self.blur: nn.Module = GaussianBlur(sigma) if sigma > 0 else nn.Identity()
        self.backbone = self.freeze(build_backbone(config.backbone, pretrained=config.pretrained,
                                                   weights=config.backbone_weights))
        self.backbone_stages = tuple(self.backbone.default_stages[:int(extra.get("teacher_stages", 2))])
        target_ch = sum(self.backbone.channels(s) for s in self.backbone_stages)
        patches = tuple(int(p) for p in extra.get("patch_sizes", DEFAULT_PATCH_SIZES))  # type: ignore[union-attr]
        variance = float(extra.get("variance_weight", 0.0))  # type: ignore[arg-type]
        self.scales = nn.ModuleList(Scale(p, dim, width, int(extra.get("students", 3)), target_ch, variance)
                                    for p in patches)

    def trainable_parameters(self):  # noqa: D102
        return (p for s in self.scales for p in s.students.parameters())

    # -- phase 1: distil the patch-descriptor teachers from the backbone -----------------
    def _backbone_targets(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.backbone.features(self.normalize(images), self.backbone_stages)
            size = tuple(feats[0].shape[-2:])
            return torch.cat([feats[0], *(upsample_to(f, size) for f in feats[1:])], dim=1)

    def _distil(self, scale: Scale, images: torch.Tensor, batch_size: int, lr: float) -> None:
        params = list(scale.teacher.parameters()) + list(scale.decoder.parameters())
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(0)
        for epoch in range(self.teacher_epochs):
            perm = torch.randperm(len(images), generator=gen)
            losses = []
            for i in range(0, len(images), batch_size):
                batch = images[perm[i:i + batch_size]]
                desc = scale.teacher(self.normalize(batch))
                decoded = scale.decoder(desc)
                target = self._backbone_targets(batch)
                if target.shape[-2:] != decoded.shape[-2:]:
                    target = upsample_to(target, tuple(decoded.shape[-2:]))
                loss = teacher_distillation_loss(decoded, target)
                if self.compactness:
                    loss = loss + self.compactness * compactness_loss(desc)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            log.info("teacher %d px distillation epoch %d loss %.4f", scale.patch, epoch + 1,
                     sum(losses) / len(losses))
        self.freeze(scale.teacher)
        self.freeze(scale.decoder)
        with torch.no_grad():
            desc = torch.cat([scale.teacher(self.normalize(images[i:i + batch_size]))
                              for i in range(0, len(images), batch_size)])
            scale.t_mean.copy_(desc.mean(dim=(0, 2, 3), keepdim=True))
            scale.t_std.copy_(desc.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def fit_setup(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Distil each scale's teacher on the training images, then fix its statistics."""
        for scale in self.scales:
            self._distil(scale, images, batch_size, lr)

    # -- phase 2: students ------------------------------------------------------------
    def loss(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.normalize(images)
        return sum(student_loss(*scale.descriptors(x)) for scale in self.scales) / len(self.scales)

    def fit_finalize(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Standardisation statistics of error and variance over the training images."""
        for scale in self.scales:
            errs, variances = [], []
            with torch.no_grad():
                for i in range(0, len(images), batch_size):
                    e, v = us_anomaly_map(*scale.descriptors(self.normalize(images[i:i + batch_size])))
                    errs.append(e.flatten())
                    variances.append(v.flatten())
            e, v = torch.cat(errs), torch.cat(variances)
            scale.err_stats.copy_(torch.stack([e.mean(), e.std().clamp_min(1e-6)]))
            scale.var_stats.copy_(torch.stack([v.mean(), v.std().clamp_min(1e-6)]))

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.normalize(images)
        size = tuple(images.shape[-2:])
        return self.blur(sum(upsample_to(scale.score(x), size) for scale in self.scales) / len(self.scales))

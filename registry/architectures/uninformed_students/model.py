"""Uninformed Students (Bergmann et al., CVPR 2020), dense and CPU-sized, multi-scale as
published.

For each patch size p (default 17, 33 and 65 px, as in the paper):

1. A *patch-descriptor teacher* (a small fully convolutional network whose receptive
   field is p px; descriptors every 4 px, every 8 px for 65) is distilled from the
   pretrained backbone: a 1×1 linear decoder maps its descriptors onto the backbone's
   stride-4 and stride-8 features (`teacher_stages` 2; 3 adds stride 16, which did not help
   on sample family 2), with the compactness loss decorrelating the descriptor dimensions
   (`fit_setup`). The paper distils on ImageNet patches, so that the descriptors tell any
   content apart; no machine here may download ImageNet. Here the teachers are distilled
   on the normal training images; `teacher_general` r adds, each epoch, r × N fresh views
   of the general photos bundled with scikit-image (`registry.data.general`, an offline
   stand-in for ImageNet). Off by default: it raised the image AUROC on one family and
   lowered it on the other, lowered the localisation on the demo's data, and doubles the
   teachers' training time.
2. An ensemble of students (same architecture, random init) regresses the teacher's
   descriptors, standardised with the teacher's per-channel mean/std on the training data.
3. Anomaly score per position = regression error ‖mean(S) − t̂‖² + `angle_weight` (1.0) ×
   angular error 1 − cos(mean S, t̂), each standardised with its mean/std over the training
   images (`fit_finalize`), upsampled to the input size. The angular term is this project's
   addition: the squared error is dominated by descriptors of large norm, the angle sees a
   student pointing the wrong way in any descriptor. The paper adds the ensemble's
   predictive variance (mean ‖S_m‖² − ‖mean S‖², standardised the same way);
   `variance_weight` (default 0) weighs it in. What each measured on the sample data is in
   docs/results.md ("Uninformed Students as published" and "Uninformed Students: the
   teacher is the bottleneck").

The scales' scores are averaged (the paper's multi-scale combination). The metric-learning
(triplet) term of the teacher's loss is left out: it needs image pairs the CPU budget has
no room for. The averaged map is smoothed with a Gaussian (as Reverse Distillation's and
anomalib's maps are) before the image score takes its maximum. `config.extra`:
`patch_sizes`, `students` (per scale, 3), `dim` (64), `width` (32), `teacher_epochs` (20),
`compactness` (weight of the decorrelation term, 1.0), `teacher_general` (general views
per training image and epoch, 0), `angle_weight` (1.0; 0 is the error alone),
`variance_weight` (0; the paper's score is `angle_weight` 0, `variance_weight` 1),
`blur_sigma` (4; 0 turns it off). A torch model saved before `angle_weight` existed has no
angular statistics and is refused by `registry.checkpoint.load_checkpoint` (retrain it).
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
from registry.data.general import general_views

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
                 variance_weight: float = 0.0, angle_weight: float = 1.0) -> None:
        super().__init__()
        self.patch = patch
        self.variance_weight = variance_weight
        self.angle_weight = angle_weight
        self.teacher = PatchNet(patch, dim, width)
        self.decoder = nn.Conv2d(dim, target_ch, 1)  # teacher → backbone feature space
        self.students = nn.ModuleList(PatchNet(patch, dim, width) for _ in range(students))
        self.register_buffer("t_mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("t_std", torch.ones(1, dim, 1, 1))
        self.register_buffer("err_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("var_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("angle_stats", torch.tensor([0.0, 1.0]))

    def descriptors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised teacher descriptors and the students' `(M, B, dim, h, w)`."""
        with torch.no_grad():
            target = (self.teacher(x) - self.t_mean) / self.t_std
        return target, torch.stack([s(x) for s in self.students])

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Standardised error + `angle_weight` × standardised angular error +
        `variance_weight` × standardised variance, `(B, 1, h, w)` on this scale's grid."""
        e, v, a = us_anomaly_map(*self.descriptors(x))
        score = (e - self.err_stats[0]) / self.err_stats[1]
        if self.angle_weight:
            score = score + self.angle_weight * (a - self.angle_stats[0]) / self.angle_stats[1]
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
        self.teacher_general = float(extra.get("teacher_general", 0.0))  # type: ignore[arg-type]
        sigma = float(extra.get("blur_sigma", 4.0))  # type: ignore[arg-type]
        self.blur: nn.Module = GaussianBlur(sigma) if sigma > 0 else nn.Identity()
        self.backbone = self.freeze(build_backbone(config.backbone, pretrained=config.pretrained,
                                                   weights=config.backbone_weights))
        self.backbone_stages = tuple(self.backbone.default_stages[:int(extra.get("teacher_stages", 2))])
        target_ch = sum(self.backbone.channels(s) for s in self.backbone_stages)
        patches = tuple(int(p) for p in extra.get("patch_sizes", DEFAULT_PATCH_SIZES))  # type: ignore[union-attr]
        variance = float(extra.get("variance_weight", 0.0))  # type: ignore[arg-type]
        angle = float(extra.get("angle_weight", 1.0))  # type: ignore[arg-type]
        students = int(extra.get("students", 3))
        self.scales = nn.ModuleList(Scale(p, dim, width, students, target_ch, variance, angle)
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
        n_general = round(self.teacher_general * len(images))
        for epoch in range(self.teacher_epochs):
            seen = images
            if n_general:  # a fresh draw of general views every epoch
                views = torch.from_numpy(general_views(n_general, tuple(images.shape[-2:]), seed=epoch))
                seen = torch.cat([images, views.to(memory_format=torch.channels_last)])
            perm = torch.randperm(len(seen), generator=gen)
            losses = []
            for i in range(0, len(seen), batch_size):
                batch = seen[perm[i:i + batch_size]]
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
        """Distil each scale's teacher on the training images (and `teacher_general` × N general
        views per epoch), then fix its descriptor statistics on the training images alone."""
        for scale in self.scales:
            self._distil(scale, images, batch_size, lr)

    # -- phase 2: students ------------------------------------------------------------
    def loss(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.normalize(images)
        return sum(student_loss(*scale.descriptors(x)) for scale in self.scales) / len(self.scales)

    def fit_finalize(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Standardisation statistics of error, variance and angular error over the training
        images."""
        for scale in self.scales:
            with torch.no_grad():
                terms = [us_anomaly_map(*scale.descriptors(self.normalize(images[i:i + batch_size])))
                         for i in range(0, len(images), batch_size)]
            for k, stats in enumerate((scale.err_stats, scale.var_stats, scale.angle_stats)):
                t = torch.cat([batch[k].flatten() for batch in terms])
                stats.copy_(torch.stack([t.mean(), t.std().clamp_min(1e-6)]))

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.normalize(images)
        size = tuple(images.shape[-2:])
        return self.blur(sum(upsample_to(scale.score(x), size) for scale in self.scales) / len(self.scales))

"""Uninformed Students (Bergmann et al., CVPR 2020), dense and CPU-sized, multi-scale as
published.

For each patch size p (default 17, 33 and 65 px, as in the paper):

1. A *teacher* gives a descriptor of every patch, pretrained on ImageNet, in one of two
   ways (`teacher`):
   - `backbone` (default): the frozen ImageNet backbone itself, its stride-4 and stride-8
     stages (`teacher_stages` 2: receptive fields of 19 and 67 px for EfficientNet-Lite0),
     concatenated on the scale's grid and PCA-whitened on the training images (`dim`
     leading components, each of unit variance; `fit_setup`): decorrelated dimensions, the
     aim of the paper's compactness loss, in closed form.
   - `distilled` (the paper's): a small fully convolutional patch network whose receptive
     field is exactly p px, distilled from the backbone (a 1×1 linear decoder onto the same
     features) with the compactness loss decorrelating its dimensions. The paper distils on
     ImageNet patches, so that the descriptors tell any content apart; no machine here may
     download ImageNet, so the teachers are distilled on the normal training images
     (`teacher_general` r adds r × N fresh views per epoch of the general photos bundled
     with scikit-image, `registry.data.general`). A teacher that has seen only normal
     parts does not tell a defect from them: on sample family 2 it was no better than an
     untrained one (docs/results.md, "Uninformed Students: an ImageNet teacher").
2. An ensemble of students (`PatchNet`s whose receptive field is exactly p px; descriptors
   every 4 px, every 8 px for 65; random init) regresses the teacher's standardised
   descriptors on the training images.
3. Anomaly score per position = regression error ‖mean(S) − t̂‖² + `angle_weight` (1.0) ×
   angular error 1 − cos(mean S, t̂), each standardised with its mean/std over the training
   images (`fit_finalize`), upsampled to the input size. The angular term is this project's
   addition: the squared error is dominated by descriptors of large norm, the angle sees a
   student pointing the wrong way in any descriptor. The paper adds the ensemble's
   predictive variance (mean ‖S_m‖² − ‖mean S‖², standardised the same way);
   `variance_weight` (default 0) weighs it in. What each measured on the sample data is in
   docs/results.md ("Uninformed Students as published" and the sections after it).

The scales' scores are averaged (the paper's multi-scale combination). The metric-learning
(triplet) term of the distilled teacher's loss is left out: it needs image pairs the CPU
budget has no room for. The averaged map is smoothed with a Gaussian (as Reverse
Distillation's and anomalib's maps are) before the image score takes its maximum.
`config.extra`: `teacher` (`backbone` | `distilled`), `teacher_stages` (2), `patch_sizes`,
`students` (per scale, 3), `dim` (64; at most the backbone stages' channels for the
backbone teacher), `width` (32), `angle_weight` (1.0; 0 is the error alone),
`variance_weight` (0; the paper's score is `angle_weight` 0, `variance_weight` 1),
`blur_sigma` (4; 0 turns it off); for the distilled teacher `teacher_epochs` (20),
`compactness` (weight of the decorrelation term, 1.0) and `teacher_general` (general views
per training image and epoch, 0). The weights of a torch model saved before the backbone
teacher became the default do not fit this model: `registry.checkpoint` refuses them
(retrain it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

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


class Moments:
    """Mean and covariance of the channel vectors at every position of `(B, C, h, w)`
    batches, accumulated in float64 without keeping the batches."""

    def __init__(self) -> None:
        self.n = 0
        self.total: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def add(self, batch: torch.Tensor) -> None:
        """Count every position of `batch`."""
        v = batch.permute(1, 0, 2, 3).flatten(1).double()  # (C, positions)
        self.n += v.shape[1]
        self.total = v.sum(1) if self.total is None else self.total + v.sum(1)
        self.outer = v @ v.T if self.outer is None else self.outer + v @ v.T

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(C,)` mean and `(C, C)` covariance of what was added.

        Raises:
            ValueError: if nothing was.
        """
        if self.total is None or self.outer is None:
            raise ValueError("no features to fit the whitening on")
        mean = self.total / self.n
        return mean, self.outer / self.n - torch.outer(mean, mean)


class Scale(nn.Module):
    """One patch size: its teacher, its students and their statistics.

    With `distilled` the teacher is a `PatchNet` with a linear decoder onto the backbone
    (the paper's); otherwise it is the backbone's features on this scale's grid, whitened
    onto their `dim` leading principal axes by `project` (a frozen 1×1 conv fitted by
    `fit_whitening`).
    """

    def __init__(self, patch: int, dim: int, width: int, students: int, target_ch: int,
                 variance_weight: float = 0.0, angle_weight: float = 1.0, distilled: bool = False) -> None:
        super().__init__()
        self.patch = patch
        self.variance_weight = variance_weight
        self.angle_weight = angle_weight
        self.distilled = distilled
        if distilled:
            self.teacher = PatchNet(patch, dim, width)
            self.decoder = nn.Conv2d(dim, target_ch, 1)  # teacher → backbone feature space
        else:
            dim = min(dim, target_ch)
            self.project = nn.Conv2d(target_ch, dim, 1)  # backbone features → principal axes
            AnomalyModel.freeze(self.project)
        self.students = nn.ModuleList(PatchNet(patch, dim, width) for _ in range(students))
        self.register_buffer("t_mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("t_std", torch.ones(1, dim, 1, 1))
        self.register_buffer("err_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("var_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("angle_stats", torch.tensor([0.0, 1.0]))

    def raw_teacher(self, x: torch.Tensor, features: torch.Tensor | None,
                    size: tuple[int, int]) -> torch.Tensor:
        """Unstandardised teacher descriptors on the `size` grid, from the normalised image
        `x` (distilled teacher) or the backbone's `features` (backbone teacher)."""
        if self.distilled:
            return self.teacher(x)
        if features is None:
            raise ValueError("the backbone teacher needs the backbone's features")
        if tuple(features.shape[-2:]) != size:
            features = upsample_to(features, size)
        return self.project(features)

    def descriptors(self, x: torch.Tensor,
                    features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised teacher descriptors and the students' `(M, B, dim, h, w)`."""
        preds = torch.stack([s(x) for s in self.students])
        with torch.no_grad():
            raw = self.raw_teacher(x, features, tuple(preds.shape[-2:]))
            target = (raw - self.t_mean) / self.t_std
        return target, preds

    def fit_whitening(self, mean: torch.Tensor, cov: torch.Tensor) -> None:
        """Set `project` to PCA whitening of the backbone features, given their per-channel
        `mean` and covariance `cov` over every position of the training images on this
        scale's grid: their `dim` leading principal components, each centred and scaled to
        unit variance. The decorrelated descriptor the paper's compactness loss trains its
        teacher towards, in closed form.

        Raises:
            ValueError: if the features do not vary at all.
        """
        variances, axes = torch.linalg.eigh(cov)  # ascending
        dim = self.project.out_channels
        std = variances.flip(0)[:dim].clamp_min(0).sqrt()
        if not float(std.max()) > 0:
            raise ValueError("the backbone features do not vary over the training images "
                             "(all alike?): the teacher's whitening cannot be fitted")
        std = std.clamp_min(1e-3 * float(std.max()))  # a near-empty component is not blown up
        # rows: the leading axes, largest variance first, each scaled to unit variance; the
        # conv itself outputs the whitened descriptor (balanced ranges when quantized)
        whiten = axes.flip(1)[:, :dim].T / std[:, None]
        with torch.no_grad():
            self.project.weight.copy_(whiten.float()[:, :, None, None])
            self.project.bias.copy_((-whiten @ mean).float())
            self.t_mean.zero_()
            self.t_std.fill_(1.0)

    def score(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised error + `angle_weight` × standardised angular error +
        `variance_weight` × standardised variance, `(B, 1, h, w)` on this scale's grid."""
        e, v, a = us_anomaly_map(*self.descriptors(x, features))
        score = (e - self.err_stats[0]) / self.err_stats[1]
        if self.angle_weight:
            score = score + self.angle_weight * (a - self.angle_stats[0]) / self.angle_stats[1]
        if self.variance_weight:
            score = score + self.variance_weight * (v - self.var_stats[0]) / self.var_stats[1]
        return score


TEACHERS = ("backbone", "distilled")


class UninformedStudents(AnomalyModel):
    """Multi-scale Uninformed Students (see the module docstring for `config.extra`)."""

    name = "us"
    options = ("teacher", "teacher_stages", "patch_sizes", "students", "dim", "width", "angle_weight",
               "variance_weight", "blur_sigma", "teacher_epochs", "compactness", "teacher_general")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        extra = config.extra
        dim, width = int(extra.get("dim", 64)), int(extra.get("width", 32))
        teacher = str(extra.get("teacher", "backbone"))
        if teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, not {teacher!r}")
        self.distilled = teacher == "distilled"
        self.teacher_epochs = int(extra.get("teacher_epochs", 20))
        self.compactness = float(extra.get("compactness", 1.0))
        self.teacher_general = float(extra.get("teacher_general", 0.0))  # type: ignore[arg-type]
        sigma = float(extra.get("blur_sigma", 4.0))  # type: ignore[arg-type]
        self.blur: nn.Module = GaussianBlur(sigma) if sigma > 0 else nn.Identity()
        backbone = build_backbone(config.backbone, pretrained=config.pretrained,
                                  weights=config.backbone_weights)
        self.backbone_stages = tuple(backbone.default_stages[:int(extra.get("teacher_stages", 2))])
        if not self.backbone_stages:
            raise ValueError("teacher_stages must be at least 1")
        self.backbone = self.freeze(backbone.truncate(max(self.backbone_stages)))
        target_ch = sum(self.backbone.channels(s) for s in self.backbone_stages)
        patches = tuple(int(p) for p in extra.get("patch_sizes", DEFAULT_PATCH_SIZES))  # type: ignore[union-attr]
        variance = float(extra.get("variance_weight", 0.0))  # type: ignore[arg-type]
        angle = float(extra.get("angle_weight", 1.0))  # type: ignore[arg-type]
        students = int(extra.get("students", 3))
        self.scales = nn.ModuleList(Scale(p, dim, width, students, target_ch, variance, angle, self.distilled)
                                    for p in patches)

    def trainable_parameters(self):  # noqa: D102
        return (p for s in self.scales for p in s.students.parameters())

    def _backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher stages of the frozen backbone on the normalised `x`, concatenated at
        the shallowest stage's resolution (stride 4 for the default stages)."""
        with torch.no_grad():
            feats = self.backbone.features(x, self.backbone_stages)
            size = tuple(feats[0].shape[-2:])
            return torch.cat([feats[0], *(upsample_to(f, size) for f in feats[1:])], dim=1)

    def _teacher_features(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the backbone teacher reads (computed once for every scale); None when the
        teachers are distilled patch networks, which read the image."""
        return None if self.distilled else self._backbone_features(x)

    def _batches(self, images: torch.Tensor,
                 batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """`(normalised batch, its teacher features)` over `images` in order."""
        for i in range(0, len(images), batch_size):
            x = self.normalize(images[i:i + batch_size])
            yield x, self._teacher_features(x)

    # -- phase 1: the teachers ------------------------------------------------------------
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
                x = self.normalize(seen[perm[i:i + batch_size]])
                desc = scale.teacher(x)
                decoded = scale.decoder(desc)
                target = self._backbone_features(x)
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
            desc = torch.cat([scale.teacher(x) for x, _ in self._batches(images, batch_size)])
            scale.t_mean.copy_(desc.mean(dim=(0, 2, 3), keepdim=True))
            scale.t_std.copy_(desc.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def fit_setup(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Backbone teacher: fit each scale's whitening on the training images. Distilled
        teachers: distil each on the training images (and `teacher_general` × N general
        views per epoch), then fix its descriptor statistics on the training images alone."""
        if self.distilled:
            for scale in self.scales:
                self._distil(scale, images, batch_size, lr)
            return
        with torch.no_grad():
            first = self.normalize(images[:1])
            grids = [tuple(scale.students[0](first).shape[-2:]) for scale in self.scales]
        moments = [Moments() for _ in self.scales]
        for _, features in self._batches(images, batch_size):  # one pass, nothing kept
            assert features is not None
            for m, grid in zip(moments, grids, strict=True):
                m.add(features if tuple(features.shape[-2:]) == grid else upsample_to(features, grid))
        for scale, m in zip(self.scales, moments, strict=True):
            scale.fit_whitening(*m.mean_cov())

    # -- phase 2: students ------------------------------------------------------------
    def descriptors(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per scale, the standardised teacher descriptors and the students' predictions for
        `images` in [0, 1]."""
        x = self.normalize(images)
        features = self._teacher_features(x)
        return [scale.descriptors(x, features) for scale in self.scales]

    def loss(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return sum(student_loss(*pair) for pair in self.descriptors(images)) / len(self.scales)

    def fit_finalize(self, images: torch.Tensor, batch_size: int, lr: float) -> None:
        """Standardisation statistics of error, variance and angular error over the training
        images."""
        terms: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in self.scales]
        with torch.no_grad():
            for x, features in self._batches(images, batch_size):
                for scale, kept in zip(self.scales, terms, strict=True):
                    kept.append(us_anomaly_map(*scale.descriptors(x, features)))
        for scale, kept in zip(self.scales, terms, strict=True):
            for k, stats in enumerate((scale.err_stats, scale.var_stats, scale.angle_stats)):
                t = torch.cat([batch[k].flatten() for batch in kept])
                stats.copy_(torch.stack([t.mean(), t.std().clamp_min(1e-6)]))

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.normalize(images)
        features = self._teacher_features(x)
        size = tuple(images.shape[-2:])
        return self.blur(sum(upsample_to(scale.score(x, features), size) for scale in self.scales)
                         / len(self.scales))

"""Every architecture: same interface, trains (loss falls), same ONNX contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from registry.architectures import ARCHITECTURES, ModelConfig, build_model
from registry.export import export_onnx

SIZE = (64, 64)


@pytest.mark.parametrize(("name", "extra"), [
    *((name, {}) for name in sorted(ARCHITECTURES)),
    ("us", {"teacher": "distilled", "teacher_epochs": 2}),
], ids=[*sorted(ARCHITECTURES), "us-distilled"])
def test_interface_training_and_export(name: str, extra: dict[str, object], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(name, ModelConfig(input_size=SIZE, extra=extra))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, *SIZE)
    model.fit_setup(x, 4, 3e-3)
    opt = model.make_optimizer(3e-3)
    model.train()
    frozen_module = getattr(model, {"stfpm": "teacher", "rd": "encoder", "us": "backbone"}[name])
    assert not frozen_module.training and model.training
    losses = []
    for _ in range(10):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    model.fit_finalize(x, 4, 3e-3)
    frozen_prefix = {"stfpm": "teacher.", "rd": "encoder.", "us": "backbone."}[name]
    for key, value in model.state_dict().items():
        if key.startswith(frozen_prefix):
            assert torch.equal(value, frozen[key]), f"frozen {key} changed"
    assert any(not torch.equal(v, frozen[k]) for k, v in model.state_dict().items()
               if not k.startswith(frozen_prefix))
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"]
    assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "score"]
    amap, score = sess.run(None, {"image": np.random.default_rng(0).random((3, 3, *SIZE), dtype=np.float32)})
    assert amap.shape == (3, 1, *SIZE) and score.shape == (3,)


class _Recording(dict):
    """A `config.extra` that records the keys read from it."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key, default=None):  # noqa: ANN001, ANN201, D102
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):  # noqa: ANN001, ANN204, D105
        self.read.add(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_each_architecture_declares_exactly_the_options_it_reads(name: str) -> None:
    """`options` is what `anomaly build --options` checks a key against: an option read but
    not declared could not be given, one declared but not read would be silently ignored."""
    extra = _Recording()
    build_model(name, ModelConfig(input_size=SIZE, extra=extra))
    assert extra.read == set(ARCHITECTURES[name].options)


def test_options_given_once_go_to_the_architectures_that_read_them() -> None:
    from registry.architectures import split_options

    given = {"teacher": "distilled", "level_combine": "sum", "blur_sigma": 2}
    assert split_options(["us", "rd", "stfpm"], given) == {
        "us": {"teacher": "distilled", "blur_sigma": 2}, "rd": {"level_combine": "sum", "blur_sigma": 2},
        "stfpm": {}}
    with pytest.raises(ValueError, match=r"option\(s\) level_combine .*known: stfpm: stages; us: "):
        split_options(["stfpm", "us"], {"level_combine": "sum"})
    with pytest.raises(ValueError, match="unknown architecture 'padim'"):
        split_options(["padim"], {})


@pytest.mark.parametrize("teacher", ["backbone", "distilled"])
def test_us_standardises_with_training_statistics(teacher: str) -> None:
    """Teacher descriptors are standardised on the training images; the backbone teacher's
    are also decorrelated (PCA whitening), what the distilled teacher's compactness loss
    only pushes towards."""
    torch.manual_seed(0)
    model = build_model("us", ModelConfig(input_size=SIZE, extra={"teacher": teacher, "teacher_epochs": 1}))
    x = torch.rand(6, 3, *SIZE)
    model.fit_setup(x, 6, 1e-3)
    model.eval()
    model.fit_finalize(x, 6, 1e-3)
    assert [scale.patch for scale in model.scales] == [17, 33, 65]
    with torch.no_grad():
        for target, preds in model.descriptors(x):
            # teacher descriptors standardised on the same data: mean ≈ 0, std ≈ 1 per channel
            assert target.mean(dim=(0, 2, 3)).abs().max() < 1e-3
            assert (target.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
            assert preds.shape[0] == 3
            if teacher == "backbone":
                corr = torch.corrcoef(target.permute(1, 0, 2, 3).flatten(1))
                off_diagonal = corr - torch.diag(torch.diagonal(corr))
                assert float(off_diagonal.abs().max()) < 1e-3
        amap = model.anomaly_map(x)
    # the error standardised on the same data: the averaged map averages ≈ 0
    assert abs(float(amap.mean())) < 0.2


def test_us_whitening_statistics_accumulate_over_batches() -> None:
    """The backbone teacher's whitening is fitted in one pass over the training batches,
    none kept: the accumulated moments are those of every position at once."""
    from registry.architectures.uninformed_students.model import Moments

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, 5, 3, 4, generator=g) * torch.arange(1, 6).view(1, 5, 1, 1) + 2
               for n in (2, 3, 1)]
    moments = Moments()
    for b in batches:
        moments.add(b)
    mean, cov = moments.mean_cov()
    every = torch.cat(batches).permute(1, 0, 2, 3).flatten(1).double()
    torch.testing.assert_close(mean, every.mean(1))
    torch.testing.assert_close(cov, torch.cov(every, correction=0))
    with pytest.raises(ValueError, match="no features"):
        Moments().mean_cov()


def test_us_backbone_teacher_refuses_features_that_do_not_vary() -> None:
    """No variance, no whitening: a clear error, not a teacher of infinite weights."""
    scale = build_model("us", ModelConfig(input_size=SIZE)).scales[0]
    channels = scale.project.in_channels
    with pytest.raises(ValueError, match="do not vary"):
        scale.fit_whitening(torch.zeros(channels, dtype=torch.float64),
                            torch.zeros(channels, channels, dtype=torch.float64))
    assert torch.isfinite(scale.project.weight).all()


def test_us_score_is_the_documented_sum_of_standardised_terms() -> None:
    """The default score is the standardised regression error + the standardised angular
    error; `angle_weight=0` is the error alone, `variance_weight=1` adds the paper's
    predictive variance. Each is exactly the documented sum, scale by scale."""
    from registry.architectures.common import upsample_to
    from registry.architectures.uninformed_students.anomaly_map import us_anomaly_map

    torch.manual_seed(0)
    model = build_model("us", ModelConfig(input_size=SIZE, extra={"teacher_epochs": 1, "blur_sigma": 0}))
    x = torch.rand(4, 3, *SIZE)
    model.fit_setup(x, 4, 1e-3)
    model.eval()
    model.fit_finalize(x, 4, 1e-3)
    assert all(scale.variance_weight == 0 and scale.angle_weight == 1 for scale in model.scales)
    with torch.no_grad():
        default = model.anomaly_map(x)
        terms: dict[str, list[torch.Tensor]] = {"error": [], "variance": [], "angle": []}
        for scale, pair in zip(model.scales, model.descriptors(x), strict=True):
            e, v, a = us_anomaly_map(*pair)
            for name, t, stats in (("error", e, scale.err_stats), ("variance", v, scale.var_stats),
                                   ("angle", a, scale.angle_stats)):
                terms[name].append(upsample_to((t - stats[0]) / stats[1], SIZE))
        for scale in model.scales:
            scale.angle_weight = 0.0
        error_only = model.anomaly_map(x)
        for scale in model.scales:
            scale.variance_weight = 1.0
        with_variance = model.anomaly_map(x)
    error, variance, angle = (sum(terms[k]) for k in ("error", "variance", "angle"))
    torch.testing.assert_close(default, (error + angle) / 3, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(error_only, error / 3, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_variance, (error + variance) / 3, rtol=1e-4, atol=1e-4)
    assert float((default - error_only).abs().max()) > 0.1  # the angular term is not nothing
    assert float((with_variance - error_only).abs().max()) > 0.1
    options = {"variance_weight": 1, "angle_weight": 0}
    paper = build_model("us", ModelConfig(input_size=SIZE, extra=options))
    assert all(scale.variance_weight == 1 and scale.angle_weight == 0 for scale in paper.scales)


def test_us_angular_error_is_blind_to_magnitude() -> None:
    """1 − cos(mean S, t̂): 0 where the students point where the teacher does, whatever
    their length, 2 where they point the opposite way; the squared error sees the length."""
    from registry.architectures.uninformed_students.anomaly_map import us_anomaly_map

    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 8, 4, 4, generator=g)
    err, _, angle = us_anomaly_map(target, torch.stack([2 * target, 4 * target]))
    torch.testing.assert_close(angle, torch.zeros_like(angle), atol=1e-5, rtol=0)
    assert float(err.min()) > 0
    _, _, opposite = us_anomaly_map(target, -target.unsqueeze(0))
    torch.testing.assert_close(opposite, torch.full_like(opposite, 2.0), atol=1e-5, rtol=0)


def test_us_teachers_see_fresh_general_views_every_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`teacher_general` r: each teacher epoch adds round(r · N) views of the bundled general
    photos, a new draw each epoch; 0, the default, distils on the training images alone."""
    from registry.architectures.uninformed_students import model as us_model

    calls: list[tuple[int, tuple[int, int], int]] = []
    real = us_model.general_views

    def recording(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
        calls.append((n, size, seed))
        return real(n, size, seed)

    monkeypatch.setattr(us_model, "general_views", recording)
    x = torch.rand(4, 3, *SIZE)
    extra = {"teacher": "distilled", "teacher_epochs": 2, "patch_sizes": [17, 33], "teacher_general": 1.5}
    build_model("us", ModelConfig(input_size=SIZE, extra=extra)).fit_setup(x, 4, 1e-3)
    assert calls == [(6, SIZE, 0), (6, SIZE, 1)] * 2
    calls.clear()
    alone = {k: v for k, v in extra.items() if k != "teacher_general"}
    build_model("us", ModelConfig(input_size=SIZE, extra=alone)).fit_setup(x, 4, 1e-3)
    assert calls == []


def test_rd_levels_are_multiplied_by_default_and_added_as_published() -> None:
    """`level_combine` product (the default) and sum (Deng & Li's) are exactly the product
    and the sum of the three levels' upsampled `1 − cos` maps, then smoothed."""
    from torch.nn import functional as F

    from registry.architectures.common import upsample_to

    torch.manual_seed(0)
    model = build_model("rd", ModelConfig(input_size=SIZE)).eval()
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        enc, dec = model._features(x)
        levels = [upsample_to((1 - F.cosine_similarity(e, d, dim=1)).unsqueeze(1), SIZE)
                  for e, d in zip(enc, dec, strict=True)]
        product = model.anomaly_map(x)
        model.combine = "sum"
        added = model.anomaly_map(x)
        torch.testing.assert_close(product, model.blur(levels[0] * levels[1] * levels[2]))
        torch.testing.assert_close(added, model.blur(levels[0] + levels[1] + levels[2]))
    assert build_model("rd", ModelConfig(input_size=SIZE, extra={"level_combine": "sum"})).combine == "sum"
    with pytest.raises(ValueError, match="level_combine must be one of"):
        build_model("rd", ModelConfig(input_size=SIZE, extra={"level_combine": "max"}))


@pytest.mark.parametrize("patch", [17, 33, 65])
def test_us_patch_networks_see_exactly_their_patch(patch: int) -> None:
    """The receptive field, measured: the input pixels one output descriptor depends on."""
    from registry.architectures.uninformed_students.model import PatchNet

    net = PatchNet(patch, dim=8, width=8)
    x = torch.rand(1, 3, 160, 160, requires_grad=True)
    out = net(x)
    out[0, :, out.shape[2] // 2, out.shape[3] // 2].sum().backward()
    rows = torch.nonzero(x.grad[0].abs().sum(0).sum(1)).flatten()
    cols = torch.nonzero(x.grad[0].abs().sum(0).sum(0)).flatten()
    assert int(rows[-1] - rows[0]) + 1 == patch and int(cols[-1] - cols[0]) + 1 == patch


def test_us_compactness_loss_penalises_correlated_dimensions() -> None:
    from registry.architectures.uninformed_students.loss import compactness_loss

    g = torch.Generator().manual_seed(0)
    independent = torch.randn(4, 16, 8, 8, generator=g)
    shared = torch.randn(4, 1, 8, 8, generator=g)
    correlated = shared + 0.1 * torch.randn(4, 16, 8, 8, generator=g)
    assert compactness_loss(independent) < 0.01 < 0.9 < compactness_loss(correlated)


def test_rd_needs_three_levels() -> None:
    with pytest.raises(ValueError, match="three"):
        build_model("rd", ModelConfig(input_size=SIZE, extra={"stages": (1, 2)}))

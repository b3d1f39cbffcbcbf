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


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_interface_training_and_export(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(name, ModelConfig(input_size=SIZE, extra={"teacher_epochs": 2}))
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


def test_us_standardises_with_training_statistics() -> None:
    torch.manual_seed(0)
    model = build_model("us", ModelConfig(input_size=SIZE, extra={"teacher_epochs": 1}))
    x = torch.rand(6, 3, *SIZE)
    model.fit_setup(x, 6, 1e-3)
    model.eval()
    model.fit_finalize(x, 6, 1e-3)
    assert [scale.patch for scale in model.scales] == [17, 33, 65]
    with torch.no_grad():
        for scale in model.scales:
            target, preds = scale.descriptors(model.normalize(x))
            # teacher descriptors standardised on the same data: mean ≈ 0, std ≈ 1 per channel
            assert target.mean(dim=(0, 2, 3)).abs().max() < 1e-3
            assert (target.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-2
            assert preds.shape[0] == 3
        amap = model.anomaly_map(x)
    # the error standardised on the same data: the averaged map averages ≈ 0
    assert abs(float(amap.mean())) < 0.2


def test_us_variance_weight_adds_the_standardised_ensemble_variance() -> None:
    """The paper's score (error + variance) is `variance_weight=1`; the default is the error
    alone. Both are exactly the documented sums, scale by scale."""
    from registry.architectures.common import upsample_to
    from registry.architectures.uninformed_students.anomaly_map import us_anomaly_map

    torch.manual_seed(0)
    model = build_model("us", ModelConfig(input_size=SIZE, extra={"teacher_epochs": 1, "blur_sigma": 0}))
    x = torch.rand(4, 3, *SIZE)
    model.fit_setup(x, 4, 1e-3)
    model.eval()
    model.fit_finalize(x, 4, 1e-3)
    assert all(scale.variance_weight == 0 for scale in model.scales)
    with torch.no_grad():
        error_only = model.anomaly_map(x)
        errs, variances = [], []
        for scale in model.scales:
            e, v = us_anomaly_map(*scale.descriptors(model.normalize(x)))
            errs.append(upsample_to((e - scale.err_stats[0]) / scale.err_stats[1], SIZE))
            variances.append(upsample_to((v - scale.var_stats[0]) / scale.var_stats[1], SIZE))
            scale.variance_weight = 1.0
        with_variance = model.anomaly_map(x)
    torch.testing.assert_close(error_only, sum(errs) / 3, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_variance, (sum(errs) + sum(variances)) / 3, rtol=1e-4, atol=1e-4)
    assert float((with_variance - error_only).abs().max()) > 0.1  # the variance term is not nothing
    paper = build_model("us", ModelConfig(input_size=SIZE, extra={"variance_weight": 1}))
    assert all(scale.variance_weight == 1 for scale in paper.scales)


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

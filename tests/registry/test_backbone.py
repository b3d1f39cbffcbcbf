"""EfficientNet-Lite0 written here loads the real ImageNet weights (offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from registry.backbones.efficientnet_lite import STAGE_ENDS, efficientnet_lite0

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _logits(model: torch.nn.Module, photo: np.ndarray) -> torch.Tensor:
    im = Image.fromarray(photo).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = ((np.asarray(im) / 255.0 - MEAN) / STD).transpose(2, 0, 1)[None]
    with torch.no_grad():
        return model(torch.tensor(x, dtype=torch.float32))[0]


@pytest.fixture(scope="module")
def imagenet_model() -> torch.nn.Module:
    return efficientnet_lite0(pretrained=True).eval()


def test_weights_are_real_imagenet(imagenet_model: torch.nn.Module) -> None:
    from skimage import data

    cat = _logits(imagenet_model, data.chelsea())
    assert int(cat.argmax()) in CAT_CLASSES
    assert float(cat.softmax(0)[list(CAT_CLASSES)].sum()) > 0.8
    assert int(_logits(imagenet_model, data.coffee()).argmax()) == 967  # espresso


def test_untrained_model_is_not_a_cat_detector() -> None:
    from skimage import data

    torch.manual_seed(0)
    model = efficientnet_lite0(pretrained=False).eval()
    probs = _logits(model, data.chelsea()).softmax(0)
    assert float(probs[list(CAT_CLASSES)].sum()) < 0.1


def test_feature_pyramid_strides(imagenet_model: torch.nn.Module) -> None:
    x = torch.rand(1, 3, 128, 96)
    feats = imagenet_model.features(x, (1, 2, 3))
    for f, level in zip(feats, (STAGE_ENDS[1], STAGE_ENDS[2], STAGE_ENDS[3]), strict=True):
        assert f.shape == (1, level.channels, 128 // level.stride, 96 // level.stride)
    assert [lvl.stride for lvl in STAGE_ENDS[1:4]] == [4, 8, 16]


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "params", "shapes"), [
    ("resnet18", 11_689_512, {"layer1.0.conv1.weight": (64, 64, 3, 3),
                              "layer2.0.downsample.0.weight": (128, 64, 1, 1),
                              "layer4.1.bn2.running_var": (512,), "fc.weight": (1000, 512)}),
    ("wide_resnet50_2", 68_883_240, {"layer1.0.conv2.weight": (128, 128, 3, 3),
                                     "layer1.0.conv3.weight": (256, 128, 1, 1),
                                     "layer3.5.bn3.weight": (1024,), "fc.weight": (1000, 2048)}),
])
def test_resnets_match_torchvision_layout(name: str, params: int, shapes: dict, tmp_path) -> None:
    from registry.backbones import build_backbone, resnet

    model = getattr(resnet, name)()
    assert _param_count(model) == params  # torchvision's published parameter counts
    state = model.state_dict()
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    # A randomly initialised torchvision-format file loads by key name, strictly.
    torch.manual_seed(1)
    random_state = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in state.items()}
    path = tmp_path / f"{name}.pth"
    torch.save(random_state, path)
    loaded = build_backbone(name, pretrained=True, weights=path)
    assert torch.equal(loaded.state_dict()["layer1.0.conv1.weight"], random_state["layer1.0.conv1.weight"])
    feats = loaded.eval().features(torch.rand(1, 3, 64, 64), loaded.default_stages)
    expansion = 1 if name == "resnet18" else 4
    assert [f.shape[1] for f in feats] == [64 * expansion, 128 * expansion, 256 * expansion]
    assert [f.shape[-1] for f in feats] == [16, 8, 4]


def test_resnet_needs_a_weights_file_and_matching_keys(tmp_path) -> None:
    from registry.backbones import build_backbone

    with pytest.raises(ValueError, match="backbone-weights"):
        build_backbone("resnet18", pretrained=True)
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, bad)
    with pytest.raises(ValueError, match="not a matching torchvision state dict"):
        build_backbone("resnet18", pretrained=True, weights=bad)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")

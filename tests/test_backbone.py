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

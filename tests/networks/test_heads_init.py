"""Every new classification head of the library starts small and the same way (``init_new_head``).

On real PneumoniaMNIST images, a fresh head must give a first-batch cross-entropy of ln(num_classes): the
EfficientNet-Lite0 ``_fc`` used to keep MONAI's fan-out init (std 0.40 on 1280 inputs, first loss 15-25).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.errors import ConfigError
from monai_peft.networks.factory import list_backbones, load_backbone
from monai_peft.networks.heads import ClassificationHead, init_new_head
from monai_peft.networks.heads.init import HEAD_INIT_STD
from tests.conftest import require_shared
from tests.networks.backbone_utils import randomize_

#: Registered backbones that make no classification head (segmentation networks): nothing to initialise.
NO_CLASSIFIER = {
    "swinunetr_ssl": "3D segmentation network (SwinUNETR decoder), no classifier",
    "litemedsam": "box-prompted segmentation (mask decoder), no classifier",
}


@pytest.fixture(scope="module")
def pneumonia() -> tuple[torch.Tensor, torch.Tensor]:
    """16 real training images (8 normal, 8 pneumonia) in [0, 1], (16, 1, 28, 28), and their labels."""
    data = np.load(require_shared("medmnist/pneumoniamnist_28.npz"))
    labels = data["train_labels"][:, 0]
    idx = np.concatenate([np.flatnonzero(labels == c)[:8] for c in (0, 1)])
    x = torch.from_numpy(data["train_images"][idx]).float().div(255.0)[:, None]
    return x, torch.from_numpy(labels[idx]).long()


def _images(x: torch.Tensor, size: int, channels: int, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - mean) / std).expand(-1, channels, -1, -1).contiguous()


@pytest.fixture(scope="module")
def vit_b16_state() -> dict[str, torch.Tensor]:
    """A randomly initialised timm ViT-B/16 state dict (what the four ViT-B/16 backbones load, offline)."""
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    return randomize_(model, seed=3).state_dict()


def _logits(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out  # type: ignore[return-value]


def _build(name: str, num_classes: int, vit_state: Callable[[], dict]) -> tuple[nn.Module, Callable]:
    """(model with a new ``num_classes`` head, input transform) for one registered backbone."""
    if name == "efficientnet_lite0":
        net = load_backbone(name, num_classes=num_classes, in_channels=1, image_size=64)
        return net, lambda x: _images(x, 64, 1)
    if name in ("vit_b16_in21k", "vit_b16_mae", "mrm", "cxr_mae"):
        # img_size=64 (position embedding resampled): 4x4 tokens keep the 12-block ViT-B/16 cheap on CPU
        net = load_backbone(name, state_dict=vit_state(), num_classes=num_classes, img_size=64)
        return net, lambda x: _images(x, 64, 3)
    if name == "mae_vit":
        net = load_backbone(name, mae_vit_folder(), num_classes=num_classes, img_size=32)
        return net, lambda x: _images(x, 32, 1, mean=0.0, std=1.0)  # pretrained on [0, 1] images
    raise AssertionError(f"no head-init case for backbone {name!r}: add one (or list it in NO_CLASSIFIER)")


_MAE_FOLDER: list = []


def mae_vit_folder():
    """A tiny `monai-peft pretrain` output (one epoch on real PneumoniaMNIST images), made once per session."""
    if not _MAE_FOLDER:
        import tempfile

        from tests.pretrain.helpers import tiny_pretrained

        _MAE_FOLDER.append(
            tiny_pretrained(Path(tempfile.mkdtemp(prefix="mae_vit_head_")), image_size=(16, 16), epochs=1)
        )
    return _MAE_FOLDER[0]


@pytest.fixture(scope="module")
def litemedsam_features(pneumonia) -> tuple[torch.Tensor, torch.Tensor]:
    """LiteMedSAM encoder maps (4, 256, 64, 64) of 2 normal + 2 pneumonia images (the encoder has no head:
    ClassificationHead is the head the library builds for it)."""
    x, y = pneumonia
    idx = torch.tensor([0, 1, 8, 9])
    enc = load_backbone("litemedsam_encoder")
    with torch.no_grad():
        return enc(_images(x[idx], 256, 3, mean=0.0, std=1.0)), y[idx]


def test_every_registered_backbone_has_a_case() -> None:
    known = {"efficientnet_lite0", "vit_b16_in21k", "vit_b16_mae", "mrm", "cxr_mae", "litemedsam_encoder", "mae_vit"}
    assert set(list_backbones()) <= known | set(NO_CLASSIFIER)


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("name", sorted(set(list_backbones()) - set(NO_CLASSIFIER)))
def test_fresh_head_gives_ln_c_first_loss_on_real_images(name, num_classes, pneumonia, request) -> None:
    if name == "litemedsam_encoder":
        feats, y = request.getfixturevalue("litemedsam_features")
        with torch.no_grad():
            logits = ClassificationHead(feats.shape[1], num_classes, pooling="avg")(feats)
    else:
        x, y = pneumonia
        net, transform = _build(name, num_classes, lambda: request.getfixturevalue("vit_b16_state"))
        with torch.no_grad():
            logits = _logits(net.eval()(transform(x)))
    assert logits.shape == (len(y), num_classes)
    loss = F.cross_entropy(logits, y).item()
    assert abs(loss - math.log(num_classes)) < 1e-2, (name, loss)
    assert logits.abs().max().item() < 0.05, name


def test_efficientnet_heads_start_small_on_every_path() -> None:
    from monai_peft.networks.efficientnet import EfficientNetLite0, create_timm_efficientnet_lite0

    built = EfficientNetLite0(num_classes=4, image_size=64)
    assert built._fc.weight.std().item() < 4 * HEAD_INIT_STD and torch.all(built._fc.bias == 0)
    built.reset_classifier(7)
    assert built._fc.out_features == 7 and built._fc.weight.std().item() < 4 * HEAD_INIT_STD
    timm_net, report = create_timm_efficientnet_lite0(num_classes=2)
    assert "classifier.weight" in report.fresh
    assert timm_net.classifier.weight.std().item() < 4 * HEAD_INIT_STD and torch.all(timm_net.classifier.bias == 0)
    pretrained = load_backbone("efficientnet_lite0")  # 1000 classes: the ImageNet classifier is loaded, not re-drawn
    assert pretrained._fc.weight.std().item() > 100 * HEAD_INIT_STD


def test_vit_heads_start_small_on_every_path(vit_b16_state) -> None:
    from monai_peft.networks.vit import create_timm_vit, load_monai_vit

    for net, head in (
        (load_monai_vit(state_dict=vit_b16_state, num_classes=3)[0], "classification_head"),
        (create_timm_vit(state_dict=vit_b16_state, num_classes=3)[0], "head"),
        (load_backbone("mrm", state_dict=vit_b16_state, num_classes=3), "head"),
    ):
        layer = getattr(net, head)
        assert 0.5 * HEAD_INIT_STD < layer.weight.std().item() < 2 * HEAD_INIT_STD
        assert torch.all(layer.bias == 0)
    net = load_backbone("vit_b16_in21k", state_dict=vit_b16_state, num_classes=3)
    net.reset_classifier(5)
    assert net.head.out_features == 5 and 0.5 * HEAD_INIT_STD < net.head.weight.std().item() < 2 * HEAD_INIT_STD


def test_init_new_head_rules() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(512, 10)
    assert init_new_head(lin) is lin
    assert 0.9 * HEAD_INIT_STD < lin.weight.std().item() < 1.1 * HEAD_INIT_STD and torch.all(lin.bias == 0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    hidden = mlp[0].weight.clone()
    init_new_head(mlp)
    assert torch.equal(mlp[0].weight, hidden), "hidden layers keep their init"
    assert mlp[2].weight.abs().max().item() < 10 * HEAD_INIT_STD
    init_new_head(lin, std=0.0)
    assert torch.all(lin.weight == 0)
    assert isinstance(init_new_head(nn.Identity()), nn.Identity)
    with pytest.raises(ConfigError, match="no Linear/Conv layer"):
        init_new_head(nn.LayerNorm(4))
    with pytest.raises(ConfigError, match=">= 0"):
        init_new_head(lin, std=-1.0)
    head = ClassificationHead(32, 4)
    assert head.fc.weight.abs().max().item() < 10 * HEAD_INIT_STD and torch.all(head.fc.bias == 0)

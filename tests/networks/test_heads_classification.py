"""Classification heads: pooling numerics, MLP-k, init, errors, composition with a MONAI ViT."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT
from torch import nn

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.heads import ClassificationHead, ClassificationModel, MonaiViTFeatures


def _randomise(head: ClassificationHead) -> None:
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn_like(p))


def test_cls_pooling_matches_hand_computation():
    head = ClassificationHead(8, 3, pooling="cls")
    _randomise(head)
    x = torch.randn(4, 1 + 9, 8)
    w, b = head.fc.weight, head.fc.bias
    expected = torch.stack([w @ x[i, 0] + b for i in range(4)])
    torch.testing.assert_close(head(x), expected)


def test_mean_pooling_excludes_prefix_and_applies_fc_norm():
    head = ClassificationHead(8, 3, pooling="mean", num_prefix_tokens=3, fc_norm="layer")  # CLS + 2 prompts
    _randomise(head)
    x = torch.randn(2, 3 + 16, 8)
    mean = x[:, 3:].sum(dim=1) / 16
    var = ((mean - mean.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True)
    normed = (mean - mean.mean(-1, keepdim=True)) / torch.sqrt(var + 1e-6)
    normed = normed * head.fc_norm.weight + head.fc_norm.bias
    expected = normed @ head.fc.weight.T + head.fc.bias
    torch.testing.assert_close(head(x), expected)
    # prefix tokens do not influence mean pooling, but they do influence cls pooling
    y = x.clone()
    y[:, :3] = torch.randn(2, 3, 8)
    torch.testing.assert_close(head(y), head(x))
    cls_head = ClassificationHead(8, 3, pooling="cls", init="xavier")
    assert not torch.allclose(cls_head(y), cls_head(x))


@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (2, 6, 3, 4, 5)])
def test_avg_and_max_pooling_on_maps(shape):
    x = torch.randn(*shape)
    dims = tuple(range(2, len(shape)))
    for pooling, pooled in (("avg", x.mean(dim=dims)), ("max", x.amax(dim=dims))):
        head = ClassificationHead(6, 2, pooling=pooling, init="xavier")
        torch.testing.assert_close(head(x), head.fc(pooled))


def test_batch_fc_norm_and_pre_pooled_input():
    head = ClassificationHead(8, 2, pooling=None, fc_norm="batch").train()
    x = torch.randn(16, 8)
    normed = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-6)
    torch.testing.assert_close(head(x), head.fc(normed))
    assert not any(p.requires_grad for p in head.fc_norm.parameters())  # affine=False, as in MAE linear probing


def test_mlp3_structure_dropout_and_init():
    head = ClassificationHead(16, 5, num_layers=3, hidden_channels=32, dropout=0.1, act="gelu")
    linears = [m for m in head.classifier if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 5)]
    assert sum(isinstance(m, nn.GELU) for m in head.classifier) == 2
    assert sum(isinstance(m, nn.Dropout) for m in head.classifier) == 3
    assert head(torch.randn(2, 10, 16)).shape == (2, 5)
    # trunc_normal std 2e-5 on the last layer only (MED-PEFT / MAE); hidden layers keep PyTorch's init
    big = ClassificationHead(768, 1000)
    assert big.fc.weight.std().item() == pytest.approx(2e-5, rel=0.05)
    assert torch.count_nonzero(big.fc.bias) == 0
    assert linears[0].weight.std().item() > 1e-2
    zeros = ClassificationHead(16, 5, num_layers=3, init="zeros")
    assert torch.count_nonzero(zeros(torch.randn(2, 10, 16))) == 0
    assert torch.count_nonzero(zeros.classifier[0].weight) > 0


def test_bad_inputs_and_arguments():
    with pytest.raises(InputDataError, match="expects tokens"):
        ClassificationHead(8, 2, pooling="cls")(torch.randn(2, 8, 4, 4))
    with pytest.raises(InputDataError, match="in_channels=8"):
        ClassificationHead(8, 2, pooling="mean")(torch.randn(2, 5, 6))
    with pytest.raises(InputDataError, match="channel-first map"):
        ClassificationHead(8, 2, pooling="avg")(torch.randn(2, 8))
    with pytest.raises(InputDataError, match="no patch tokens"):
        ClassificationHead(8, 2, pooling="mean", num_prefix_tokens=2)(torch.randn(2, 2, 8))
    with pytest.raises(InputDataError, match="MonaiViTFeatures"):
        ClassificationHead(8, 2)((torch.randn(2, 5, 8), [torch.randn(2, 5, 8)]))
    with pytest.raises(ConfigError, match="num_prefix_tokens"):
        ClassificationHead(8, 2, pooling="cls", num_prefix_tokens=0)
    with pytest.raises(ConfigError, match="pooling"):
        ClassificationHead(8, 2, pooling="gem")
    with pytest.raises(ConfigError, match="init"):
        ClassificationHead(8, 2, init="orthogonal")


def test_classification_model_on_monai_vit():
    vit = ViT(1, 32, 8, hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4, spatial_dims=2, classification=True)
    encoder = MonaiViTFeatures(vit, indices=(-1,), output="tokens")
    model = ClassificationModel(encoder, ClassificationHead(48, 3, pooling="cls", init="xavier"))
    x = torch.randn(2, 1, 32, 32)
    logits = model(x)
    _, hidden = vit(x)
    expected = model.head.fc(vit.norm(hidden[-1])[:, 0])
    torch.testing.assert_close(logits, expected)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"encoder", "head"}

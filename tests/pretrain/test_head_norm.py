"""``mae_vit`` with ``head_norm="batchnorm"``: MAE's linear-probing BatchNorm (no affine) in front of the fresh head,
and the study default that lets that BatchNorm learn its statistics (``batchnorm_stats="save"``)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import monai_peft as mp
from monai_peft.errors import ConfigError
from monai_peft.pretrain import MAEPretrainConfig, load_mae_vit, pretrain_mae
from monai_peft.study.models import build_classifier, build_peft_model, default_batchnorm_stats
from monai_peft.study.schema import BackboneSpec, MethodSpec
from monai_peft.targeting import canonical_named_tensors
from tests.conftest import require_shared
from tests.pretrain.helpers import TINY_MAE, tiny_pretrained
from tests.study.helpers import TINY_NET


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    return tiny_pretrained(tmp_path_factory.mktemp("mae_hn"), image_size=(12, 16), epochs=1)


def _manual_logits(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eq. of the module docstring at eval time: ``W (f - mu) / sqrt(var + eps) + b`` with running statistics."""
    bn, linear = net.head[0], net.head[1]
    f = net.forward_features(x)["pooled"]
    z = (f - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    return z @ linear.weight.T + linear.bias


def test_batchnorm_head_on_a_non_square_grid_keeps_the_encoder(mae_folder):
    plain = load_mae_vit(mae_folder, num_classes=3, img_size=(12, 20))
    net = load_mae_vit(mae_folder, num_classes=3, img_size=(12, 20), head_norm="batchnorm")
    assert isinstance(net.head, torch.nn.Sequential) and isinstance(net.head[0], torch.nn.BatchNorm1d)
    assert not net.head[0].affine and isinstance(net.head[1], torch.nn.Linear)
    encoder = {k: v for k, v in plain.state_dict().items() if k.startswith("vit.")}
    state = net.state_dict()
    assert encoder and all(torch.equal(state[k], v) for k, v in encoder.items())
    x = torch.rand(5, 1, 12, 20)
    net.train()(x)  # one batch moves the running statistics away from (0, 1)
    assert not torch.allclose(net.head[0].running_mean, torch.zeros_like(net.head[0].running_mean))
    net.eval()
    with torch.no_grad():
        assert net(x).shape == (5, 3)
        assert torch.allclose(net(x), _manual_logits(net, x), atol=1e-5)


def test_bad_head_norm_options(mae_folder):
    with pytest.raises(ConfigError, match="head_norm must be one of"):
        load_mae_vit(mae_folder, num_classes=2, head_norm="layernorm")
    with pytest.raises(ConfigError, match="head_norm needs a head"):
        load_mae_vit(mae_folder, num_classes=0, head_norm="batchnorm")


def test_study_default_lets_the_head_batchnorm_learn_and_saves_it(mae_folder, tmp_path):
    spec = BackboneSpec("mae_vit", source=str(mae_folder), kwargs={"head_norm": "batchnorm"})
    net, head = build_classifier(spec, 2, 1, 16)
    assert head == ["head"] and default_batchnorm_stats(net, head) == "save"
    dense, dense_head = build_classifier(BackboneSpec(**{**copy.deepcopy(TINY_NET), "label": "t"}), 2, 1, 16)
    assert default_batchnorm_stats(dense, dense_head) == "freeze"  # pretrained-style BatchNorms stay frozen
    encoder_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("vit.")}
    x = torch.rand(6, 1, 16, 16)
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    for method, trainable in (("linear_probe", 2 * net.spec.embed_dim + 2), ("lora", None)):
        model = build_peft_model(
            copy.deepcopy(net), head, MethodSpec(method, kwargs={"r": 2} if method == "lora" else {})
        )
        assert model.active_peft_config.batchnorm_stats == "save"
        if trainable is not None:
            assert model.trainable_parameters()[0] == trainable
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        bn = model.base_model.head[0]
        assert bn.training and int(bn.num_batches_tracked) == 2
        after = canonical_named_tensors(model.base_model)  # original names, adapter tensors excluded
        assert all(torch.equal(after[k], v) for k, v in encoder_before.items())
        model.save_pretrained(tmp_path / method)
        fresh, _ = build_classifier(spec, 2, 1, 16)
        loaded = mp.PeftModel.from_pretrained(fresh, tmp_path / method).eval()
        model.eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.base_model.head[0].running_var, bn.running_var)


def test_batchnorm_head_3d_anisotropic(tmp_path):
    brats = require_shared("brats")
    cfg = MAEPretrainConfig(
        data=str(brats),
        out=str(tmp_path / "mae3d"),
        pattern="*/Flair*.nii.gz",
        image_size=(16, 24, 20),
        epochs=1,
        **{**TINY_MAE, "batch_size": 4},
    )
    pretrain_mae(cfg)
    net = load_mae_vit(tmp_path / "mae3d", num_classes=2, head_norm="batchnorm")
    head = net.classification_head
    assert isinstance(head[0], torch.nn.BatchNorm1d) and isinstance(head[1], torch.nn.Linear)
    enc = load_file(str(tmp_path / "mae3d" / "encoder.safetensors"))
    assert all(torch.equal(net.state_dict()[k], v) for k, v in enc.items())
    x = torch.rand(3, 1, 16, 24, 20)
    net.train()(x)
    net.eval()
    with torch.no_grad():
        logits, hidden = net(x)
        cls = hidden[-1]  # before the final norm
        f = net.norm(cls)[:, 0]
        z = (f - head[0].running_mean) / torch.sqrt(head[0].running_var + head[0].eps)
        assert torch.allclose(logits, z @ head[1].weight.T + head[1].bias, atol=1e-5)

"""SSF (monai_peft.methods.ssf): identity at init_std=0, exact merge, gradients, placement, 2D and 3D, save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks import nets
from torch import nn

import monai_peft as mp
from monai_peft.methods.ssf import SSFLayer, feeding_norm
from monai_peft.targeting import innermost
from tests.helpers import (
    aniso_cnn_image,
    aniso_vit,
    aniso_vit_image,
    first,
    grad_report,
    randomize_adapter_params,
    tiny_densenet,
    tiny_resnet,
)


def vit(spatial_dims: int, qkv_bias: bool = False) -> nets.ViT:
    return aniso_vit(spatial_dims, qkv_bias=qkv_bias)


vit_image, cnn_image = aniso_vit_image, aniso_cnn_image


NETS = {
    "vit2d": (lambda: vit(2), lambda: vit_image(2)),
    "vit3d": (lambda: vit(3), lambda: vit_image(3)),
    "resnet2d": (lambda: tiny_resnet(2).eval(), lambda: cnn_image(2)),
    "resnet3d": (lambda: tiny_resnet(3).eval(), lambda: cnn_image(3)),
    "densenet2d": (lambda: tiny_densenet(2).eval(), lambda: cnn_image(2)),
}


@pytest.mark.parametrize("net", sorted(NETS))
def test_init_std_zero_is_an_exact_identity(net) -> None:
    build, data = NETS[net]
    base, x = build(), data()
    with torch.no_grad():
        ref = first(base(x))
        out = first(mp.get_peft_model(copy.deepcopy(base), mp.SSFConfig(init_std=0.0)).eval()(x))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("skip", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores_the_base(net, skip) -> None:
    build, data = NETS[net]
    base, x = build(), data()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        ref = first(base(x))
    peft = mp.get_peft_model(base, mp.SSFConfig(init_std=0.2, skip_before_norm=skip)).eval()
    with torch.no_grad():
        unmerged = first(peft(x))
    assert (unmerged - ref).abs().max() > 1e-3, "init_std=0.2 must change the output"
    with torch.no_grad():
        peft.merge_adapter()
        merged = first(peft(x))
        peft.unmerge_adapter()
        again = first(peft(x))
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5), (merged - unmerged).abs().max()
    assert torch.allclose(again, unmerged, atol=1e-6)
    plain = peft.unload()
    after = plain.state_dict()
    assert before.keys() == after.keys()  # biases created for the fold are removed again (qkv_bias=False)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_merge_and_unload_gives_the_same_outputs_with_transposed_and_grouped_convs() -> None:
    net = nn.Sequential(
        nn.Conv3d(2, 6, 3, padding=1, groups=2),
        nn.GroupNorm(3, 6),
        nn.ConvTranspose3d(6, 4, 2, stride=2, groups=2),
        nn.InstanceNorm3d(4, affine=False),
    ).eval()
    x = torch.randn(2, 2, 6, 5, 4)
    peft = mp.get_peft_model(
        net, mp.SSFConfig(init_std=0.3, target_types=["Conv3d", "ConvTranspose3d", "GroupNorm", "InstanceNorm3d"])
    )
    with torch.no_grad():
        ref = peft.eval()(x)
        plain = peft.merge_and_unload()
        assert not any(isinstance(m, SSFLayer) for m in plain.modules())
        assert torch.allclose(plain(x), ref, atol=1e-5)


@pytest.mark.parametrize("net", sorted(NETS))
def test_only_ssf_parameters_get_gradients(net) -> None:
    build, data = NETS[net]
    peft = mp.get_peft_model(build(), mp.SSFConfig())
    peft.train()
    first(peft(data())).square().mean().backward()
    trainable, with_grad, missing = grad_report(peft)
    assert not missing and with_grad == trainable
    assert trainable and all(n.endswith((".scale", ".shift")) and ".adapters." in n for n in trainable)


def test_default_placement_on_vit_is_every_op() -> None:
    peft = mp.get_peft_model(vit(2, qkv_bias=True), mp.SSFConfig())
    wrapped = sorted(n for n, layer in peft.adapter_layers())
    per_block = {"attn.qkv", "attn.out_proj", "mlp.linear1", "mlp.linear2", "norm1", "norm2"}
    assert set(wrapped) == {f"blocks.{i}.{s}" for i in range(2) for s in per_block} | {
        "patch_embedding.patch_embeddings",
        "norm",
    }
    c = 48
    assert peft.trainable_parameters()[0] == 2 * (2 * (3 * c + c + 2 * c + c + 2 * c) + c + c)
    skipped = mp.get_peft_model(vit(2, qkv_bias=True), mp.SSFConfig(skip_before_norm=True))
    assert sorted(n for n, _ in skipped.adapter_layers()) == wrapped, "no Linear feeds a LayerNorm in a ViT"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_skip_before_norm_places_one_ssf_per_conv_bn_pair(spatial_dims) -> None:
    net = tiny_resnet(spatial_dims)
    every = mp.get_peft_model(copy.deepcopy(net), mp.SSFConfig())
    paired = mp.get_peft_model(copy.deepcopy(net), mp.SSFConfig(skip_before_norm=True))
    every_names = {n for n, _ in every.adapter_layers()}
    paired_names = {n for n, _ in paired.adapter_layers()}
    convs = {n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)) and not n.startswith("fc")}
    norms = {n for n, m in net.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))}
    assert every_names == convs | norms
    assert paired_names == norms, "every conv of a MONAI ResNet feeds its BatchNorm"
    bn_channels = sum(m.num_features for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)))
    assert paired.trainable_parameters()[0] == 2 * bn_channels


def test_skip_before_norm_follows_the_order_of_pre_activation_blocks() -> None:
    net = tiny_densenet(2)
    paired = {n for n, _ in mp.get_peft_model(net, mp.SSFConfig(skip_before_norm=True)).adapter_layers()}
    layer = "features.denseblock1.denselayer1.layers"
    assert feeding_norm(net, f"{layer}.conv1") == f"{layer}.norm2"  # norm1 -> relu -> conv1 -> norm2 -> ...
    assert feeding_norm(net, f"{layer}.conv2") is None  # conv2's output is concatenated, no norm follows
    assert f"{layer}.conv1" not in paired and f"{layer}.conv2" in paired and f"{layer}.norm2" in paired


def test_ssf_before_batchnorm_is_cancelled_in_training_mode() -> None:
    """Why skip_before_norm loses nothing: with batch statistics, a per-channel affine before BN has no effect
    (up to BN's eps, made negligible here)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, eps=1e-12))
    peft = mp.get_peft_model(net, mp.SSFConfig(init_std=0.0, target_types=["Conv2d"]))
    x = torch.randn(4, 3, 9, 7)
    peft.train()
    ref = peft(x).detach()
    randomize_adapter_params(peft, std=0.2)
    layer = peft.base_model[0]
    assert (layer.adapters["default"].scale - 1).abs().max() > 0.05
    assert torch.allclose(peft(x), ref, atol=1e-4)


def test_feeding_norm_checks_the_width() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(4), nn.Linear(6, 4), nn.LayerNorm(4))
    assert feeding_norm(net, "0") is None  # the next module normalises 4 channels, the Linear gives 6
    assert feeding_norm(net, "2") == "3"
    assert feeding_norm(net, "3") is None


@pytest.mark.parametrize("net", ["vit3d", "resnet2d"])
def test_save_and_load_are_bit_exact(net, tmp_path) -> None:
    build, data = NETS[net]
    base, x = build(), data()
    fresh = copy.deepcopy(base)
    peft = mp.get_peft_model(base, mp.SSFConfig(skip_before_norm=True)).eval()
    randomize_adapter_params(peft, std=0.1)
    with torch.no_grad():
        out = first(peft(x))
    peft.save_adapter(tmp_path)
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    saved, again = peft.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(first(loaded(x)), out)
    assert {n for n, _ in loaded.adapter_layers()} == {n for n, _ in peft.adapter_layers()}
    assert isinstance(innermost(loaded.base_model), type(innermost(peft.base_model)))

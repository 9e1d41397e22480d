"""LoRA on Linear, fused qkv slices, convolutions (all kinds) and transposed convolutions."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ViT
from torch import nn

import monai_peft as mp
from monai_peft.methods.lora import LoraConv, LoraFusedQKV, LoraLinear
from tests.helpers import first, randomize_adapter_params, tiny_basicunet, tiny_vit

CONV_CASES = [
    pytest.param(nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 17), id="conv1d-stride"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=2, dilation=2), (2, 4, 12, 12), id="conv2d-dilated"),
    pytest.param(nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 10, 10), id="conv2d-groups"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (2, 4, 9, 9), id="conv2d-reflect"),
    pytest.param(
        nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", bias=False), (2, 4, 9, 9), id="conv2d-circular"
    ),
    pytest.param(nn.Conv3d(3, 5, (3, 1, 3), stride=(1, 2, 2), padding=(1, 0, 1)), (2, 3, 6, 8, 8), id="conv3d"),
    pytest.param(nn.Conv3d(4, 4, 3, padding=1, groups=4), (1, 4, 6, 6, 6), id="conv3d-depthwise"),
    pytest.param(nn.ConvTranspose2d(4, 6, 2, stride=2), (2, 4, 5, 5), id="convT2d"),
    pytest.param(
        nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 5), id="convT2d-groups"
    ),
    pytest.param(nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, dilation=1), (1, 3, 4, 4, 4), id="convT3d"),
    pytest.param(nn.ConvTranspose1d(3, 4, 4, stride=2, padding=1), (2, 3, 7), id="convT1d"),
]


def wrap(layer: nn.Module, **kw) -> mp.PeftModel:
    net = nn.Sequential(layer)
    return mp.get_peft_model(net, mp.LoraConfig(target_modules=["0"], **kw))


@pytest.mark.parametrize("layer,shape", CONV_CASES)
def test_conv_lora_identity_merge_and_reference(layer, shape):
    x = torch.randn(shape)
    ref = layer(x).detach()
    model = wrap(layer, r=3, alpha=6)
    assert isinstance(model.base_model[0], LoraConv)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # B = 0: exact identity
    randomize_adapter_params(model, std=0.1)
    out = model(x).detach()
    assert not torch.allclose(out, ref)
    # reference: the same convolution with W0 + scaling * (B A).view(W.shape)
    adapter = model.base_model[0].adapters["default"]
    w = layer.weight + 2.0 * (adapter.lora_B @ adapter.lora_A).view(layer.weight.shape)
    expected = torch.func.functional_call(layer, {"weight": w, "bias": layer.bias}, (x,))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)


def test_conv_transpose_output_size_argument():
    layer = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(1, 2, 5, 5)
    model = wrap(layer, r=2)
    randomize_adapter_params(model)
    y = model.base_model[0](x, output_size=[10, 10])
    assert y.shape == (1, 3, 10, 10)
    model.merge_adapter()
    torch.testing.assert_close(model.base_model[0](x, output_size=[10, 10]), y, rtol=1e-5, atol=1e-5)


def test_conv_dropout_path_is_base_plus_dropped_delta():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    model = wrap(layer, r=2, dropout=0.5)
    randomize_adapter_params(model)
    model.eval()
    eval_out = model(x)
    model.train()
    torch.manual_seed(0)
    train_out = model(x)
    assert not torch.allclose(train_out, eval_out)  # dropout acts on the adapter branch in training
    base = layer(x)
    # the base part is untouched by dropout: difference from base lies in the delta branch only
    assert (train_out - base).abs().sum() < (eval_out - base).abs().sum() * 3


def test_linear_lora_equation_and_rslora():
    layer = nn.Linear(10, 7)
    x = torch.randn(4, 10)
    for rs, scale in [(False, 16 / 4), (True, 16 / 2)]:
        model = wrap(nn.Linear(10, 7), r=4, alpha=16, use_rslora=rs)
        lin = model.base_model[0]
        lin.base_layer.load_state_dict(layer.state_dict())
        randomize_adapter_params(model)
        ad = lin.adapters["default"]
        expected = layer(x) + scale * x @ ad.lora_A.T @ ad.lora_B.T
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fused_qkv_slices_touch_only_chosen_slices():
    net = tiny_vit()
    x = torch.randn(2, 1, 32, 32)
    qkv = net.blocks[0].attn.qkv
    base = qkv(torch.randn(3, 5, 48)).detach()
    model = mp.get_peft_model(net, mp.LoraConfig(r=2, target_modules=["qkv"], qkv_slices="qv"))
    layer = model.base_model.blocks[0].attn.qkv
    assert isinstance(layer, LoraFusedQKV)
    randomize_adapter_params(model, std=0.3)
    torch.manual_seed(3)
    inp = torch.randn(3, 5, 48)
    out = layer(inp)
    ref = layer.base_layer(inp)
    c = 48
    assert not torch.allclose(out[..., :c], ref[..., :c])  # q changed
    torch.testing.assert_close(out[..., c : 2 * c], ref[..., c : 2 * c], rtol=0, atol=0)  # k untouched
    assert not torch.allclose(out[..., 2 * c :], ref[..., 2 * c :])  # v changed
    del base
    y = first(model(x))
    model.merge_adapter()
    torch.testing.assert_close(first(model(x)), y, rtol=1e-5, atol=1e-5)


def test_vit_b16_lora_qv_has_exactly_147456_parameters():
    net = ViT(in_channels=3, img_size=(224, 224), patch_size=16, spatial_dims=2, classification=True, num_classes=2)
    model = mp.get_peft_model(net, mp.LoraConfig(r=4, alpha=32))  # preset: q and v of every block
    trainable, total = model.trainable_parameters()
    assert trainable == 147_456
    backbone = sum(p.numel() for n, p in net.named_parameters() if "classification_head" not in n and "lora" not in n)
    assert round(100 * trainable / backbone, 2) == 0.17
    layers = [m for m in model.modules() if isinstance(m, LoraFusedQKV)]
    assert len(layers) == 12 and all(layer.adapters["default"].slices == "qv" for layer in layers)


def test_qkv_slices_without_fused_target_is_an_error():
    with pytest.raises(mp.ConfigError, match="no targeted module is a fused qkv"):
        mp.get_peft_model(nn.Sequential(nn.Linear(4, 4)), mp.LoraConfig(target_modules=["0"], qkv_slices="q"))


@pytest.mark.parametrize("bad", [{"r": 0}, {"alpha": -1}, {"dropout": 1.0}, {"qkv_slices": "qq"}, {"qkv_slices": "x"}])
def test_invalid_config(bad):
    with pytest.raises(mp.ConfigError):
        mp.LoraConfig(**bad)


def test_lora_on_unsupported_module_is_rejected():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(mp.MethodNotApplicableError, match="cannot adapt 1 \\(LayerNorm\\)"):
        mp.get_peft_model(net, mp.LoraConfig(target_modules=["0", "1"]))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_basicunet_lora_covers_conv_and_transposed_conv(spatial_dims):
    net = tiny_basicunet(spatial_dims)
    shape = (1, 1) + (32,) * spatial_dims
    x = torch.randn(shape)
    net.eval()
    ref = net(x)
    model = mp.get_peft_model(net, mp.LoraConfig(r=2))
    kinds = {type(m.base_layer).__name__ for m in model.modules() if isinstance(m, LoraConv)}
    assert f"Conv{spatial_dims}d" in kinds and f"ConvTranspose{spatial_dims}d" in kinds
    assert not any(isinstance(m, LoraConv) and "final_conv" in n for n, m in model.named_modules())
    model.eval()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    randomize_adapter_params(model, std=0.05)
    y = model(x)
    model.merge_adapter()
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_lora_linear_layer_type_for_plain_linear():
    model = wrap(nn.Linear(3, 3))
    assert type(model.base_model[0]) is LoraLinear

"""Houlsby adapters and AdaptFormer against hand-written references, 2D and 3D (monai_peft.methods.adapters)."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks import nets
from torch import nn

import monai_peft as mp
from monai_peft.errors import InputDataError, MethodNotApplicableError
from monai_peft.methods.adapters import BlockInputTap, ParallelAdapterLayer, SequentialAdapterLayer
from monai_peft.targeting import innermost
from tests.helpers import aniso_vit, aniso_vit_image, first, grad_report, randomize_adapter_params, tiny_resnet


def vit(spatial_dims: int) -> nets.ViT:
    """A tiny MONAI ViT on a non-square (2D) / anisotropic (3D) grid: 32x16 px -> 4x2, 16x16x8 -> 2x2x1 (patch 8)."""
    return aniso_vit(spatial_dims)


def with_random_norms(net: nn.Module) -> nn.Module:
    """LayerNorm weights 1 + N(0, 0.3), biases N(0, 0.1), so that LN2(x) and LN(LN2(x)) really differ."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return net


image = aniso_vit_image


def _bottleneck(ad, h: torch.Tensor) -> torch.Tensor:
    """``scale * W_up act(W_down norm(h))`` written out (dropout is off in eval)."""
    z = ad.norm(h)
    z = torch.nn.functional.linear(z, ad.down.weight, ad.down.bias)
    z = ad.act(z)
    return torch.nn.functional.linear(z, ad.up.weight, ad.up.bias) * ad.scale


def _vit_reference(peft: mp.PeftModel, x: torch.Tensor, *, adaptformer: str | None = None, houlsby: bool = False):
    """MONAI ViT forward written out block by block with the adapters of ``peft`` (active adapter 'default')."""
    net = innermost(peft.base_model)
    h = net.patch_embedding(x)
    h = torch.cat([net.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
    for blk in net.blocks:
        attn, mlp, norm1, norm2 = (innermost(getattr(blk, n)) for n in ("attn", "mlp", "norm1", "norm2"))
        a = attn(norm1(h))
        if houlsby:
            a = a + _bottleneck(blk.attn.adapters["default"], a)
        h = h + a
        m = mlp(norm2(h))
        if houlsby:
            m = m + _bottleneck(blk.mlp.adapters["default"], m)
        if adaptformer == "block":
            m = m + _bottleneck(blk.mlp.adapters["default"], h)  # reads the pre-norm stream
        elif adaptformer == "normed":
            m = m + _bottleneck(blk.mlp.adapters["default"], norm2(h))
        h = h + m
    h = net.norm(h)
    return net.classification_head(h[:, 0])


# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize(
    "config",
    [
        mp.AdapterConfig(bottleneck=6),
        mp.AdaptFormerConfig(bottleneck=6),
        mp.AdaptFormerConfig(bottleneck=6, input="normed"),
    ],
    ids=["houlsby", "adaptformer-block", "adaptformer-normed"],
)
def test_fresh_adapters_are_an_exact_identity(spatial_dims, config) -> None:
    base = vit(spatial_dims)
    x = image(spatial_dims)
    with torch.no_grad():
        ref = first(base(x))
        out = first(mp.get_peft_model(copy.deepcopy(base), config).eval()(x))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("mode", ["block", "normed"])
def test_adaptformer_matches_hand_written_reference(spatial_dims, mode) -> None:
    config = mp.AdaptFormerConfig(bottleneck=6, input=mode, layer_norm=mode == "block")
    peft = mp.get_peft_model(with_random_norms(vit(spatial_dims)), config)
    randomize_adapter_params(peft, std=0.2)
    peft.eval()
    x = image(spatial_dims)
    with torch.no_grad():
        out = first(peft(x))
        ref = _vit_reference(peft, x, adaptformer=mode)
        other = _vit_reference(peft, x, adaptformer="normed" if mode == "block" else "block")
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert (out - other).abs().max() > 1e-3, "the two inputs must give different models"
    wrapped = {type(layer).__name__ for _, layer in peft.adapter_layers()}
    assert wrapped == ({"ParallelAdapterLayer", "BlockInputTap"} if mode == "block" else {"ParallelAdapterLayer"})
    assert all(
        layer.block_input.value is None for _, layer in peft.adapter_layers() if isinstance(layer, BlockInputTap)
    )


def test_adaptformer_on_timm_blocks_reads_the_pre_norm_stream() -> None:
    from tests.networks.backbone_utils import tiny_timm_vit

    net = tiny_timm_vit(num_classes=3, depth=2)
    peft = mp.get_peft_model(net, mp.AdaptFormerConfig(bottleneck=4, target_modules=["re:blocks\\.\\d+\\.mlp"]))
    randomize_adapter_params(peft, std=0.2)
    peft.eval()
    x = torch.randn(1, 3, 224, 224)
    base = innermost(peft.base_model)
    with torch.no_grad():
        h = base.patch_embed(x)
        h = base._pos_embed(h)
        for blk in base.blocks:
            h = h + innermost(blk.attn)(innermost(blk.norm1)(h))
            h = h + innermost(blk.mlp)(innermost(blk.norm2)(h)) + _bottleneck(blk.mlp.adapters["default"], h)
        ref = base.forward_head(base.norm(h))
        out = peft(x)
    assert torch.allclose(out, ref, atol=1e-5)


class _SelfNormMLPBlock(nn.Module):
    """TinyViT-style block: ``x + attn(x)`` then ``x + mlp(x)`` with the LayerNorm inside the MLP."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.attn = nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.mlp(x)


class _NoNormBlock(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, c), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


def test_adaptformer_on_an_mlp_with_its_own_norm_reads_the_mlp_input() -> None:
    net = nn.Sequential(_SelfNormMLPBlock(), _SelfNormMLPBlock()).eval()
    peft = mp.get_peft_model(net, mp.AdaptFormerConfig(bottleneck=4, target_modules=["mlp"]))
    randomize_adapter_params(peft, std=0.2)
    assert not any(isinstance(layer, BlockInputTap) for _, layer in peft.adapter_layers())
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = x
        for blk in innermost(peft.base_model):
            h = h + blk.attn(h)
            h = h + innermost(blk.mlp)(h) + _bottleneck(blk.mlp.adapters["default"], h)
        assert torch.allclose(peft.eval()(x), h, atol=1e-6)


def test_adaptformer_block_input_needs_a_norm_and_says_what_to_do() -> None:
    net = nn.Sequential(_NoNormBlock()).eval()
    with pytest.raises(MethodNotApplicableError, match="norm_name=.*input='normed'"):
        mp.get_peft_model(net, mp.AdaptFormerConfig(bottleneck=4, target_modules=["mlp"]))
    assert isinstance(net[0].mlp, nn.Sequential), "a refused injection leaves the network unchanged"
    peft = mp.get_peft_model(net, mp.AdaptFormerConfig(bottleneck=4, target_modules=["mlp"], input="normed"))
    assert isinstance(innermost(peft.base_model)[0].mlp, ParallelAdapterLayer)
    with pytest.raises(mp.ConfigError, match="input must be one of"):
        mp.AdaptFormerConfig(input="pre")


def test_adaptformer_mlp_called_without_its_norm_raises() -> None:
    peft = mp.get_peft_model(vit(2), mp.AdaptFormerConfig(bottleneck=4))
    mlp = innermost(peft.base_model).blocks[0].mlp
    with pytest.raises(InputDataError, match="norm before this MLP"):
        mlp(torch.randn(2, 9, 48))


def test_adaptformer_disable_and_delete_restore_the_base() -> None:
    base = vit(2)
    x = image(2)
    ref = first(base(x)).detach()
    peft = mp.get_peft_model(copy.deepcopy(base), mp.AdaptFormerConfig(bottleneck=4))
    randomize_adapter_params(peft, std=0.2)
    peft.eval()
    with torch.no_grad():
        assert (first(peft(x)) - ref).abs().max() > 1e-3
        with peft.disable_adapter():
            assert torch.equal(first(peft(x)), ref)
    plain = peft.unload()
    assert not any(isinstance(m, (BlockInputTap, ParallelAdapterLayer)) for m in plain.modules())
    assert torch.equal(first(plain(x)), ref)


@pytest.mark.parametrize(
    "config",
    [
        mp.AdapterConfig(bottleneck=4),
        mp.AdapterConfig(bottleneck=4, tune_layernorm=True),
        mp.AdaptFormerConfig(bottleneck=4),
    ],
    ids=["houlsby", "houlsby+ln", "adaptformer"],
)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_only_the_intended_parameters_get_gradients(config, spatial_dims) -> None:
    peft = mp.get_peft_model(vit(spatial_dims), config, modules_to_save=["classification_head"])
    randomize_adapter_params(peft, std=0.1)  # W_up = 0 would block the gradient of W_down
    peft.train()
    first(peft(image(spatial_dims))).square().sum().backward()
    trainable, with_grad, missing = grad_report(peft)
    assert not missing, missing
    assert with_grad == trainable
    ln = {n for n in trainable if ".norm" in n and ".adapters." not in n}
    if getattr(config, "tune_layernorm", False):
        # norm1, norm2 of both blocks + the final norm (norm_cross_attn never runs and stays frozen)
        assert len(ln) == 2 * 5 and not any("norm_cross_attn" in n for n in trainable)
    else:
        assert not ln
    assert all(".adapters." in n or ".norm" in n or "classification_head" in n for n in trainable)


def test_houlsby_layernorm_budget_and_cnn_error() -> None:
    net = vit(2)
    plain = mp.get_peft_model(copy.deepcopy(net), mp.AdapterConfig(bottleneck=4)).trainable_parameters()[0]
    tuned = mp.get_peft_model(copy.deepcopy(net), mp.AdapterConfig(bottleneck=4, tune_layernorm=True))
    assert tuned.trainable_parameters()[0] - plain == 5 * 2 * 48
    assert plain == 2 * 2 * (48 * 4 + 4 + 4 * 48 + 48)  # two adapters per block, two blocks
    with pytest.raises(MethodNotApplicableError, match="no LayerNorm to tune"):
        mp.get_peft_model(tiny_resnet(2), mp.AdapterConfig(bottleneck=4, tune_layernorm=True))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_houlsby_on_cnn_blocks_is_sequential_1x1(spatial_dims) -> None:
    net = tiny_resnet(spatial_dims).eval()
    peft = mp.get_peft_model(net, mp.AdapterConfig(bottleneck=4))
    randomize_adapter_params(peft, std=0.2)
    layers = [(n, layer) for n, layer in peft.adapter_layers() if isinstance(layer, SequentialAdapterLayer)]
    assert [n for n, _ in layers] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    x = torch.randn(2, 1, *((32, 24) if spatial_dims == 2 else (16, 16, 12)))
    seen: dict[str, torch.Tensor] = {}
    _, layer = layers[0]
    hooks = [
        innermost(layer).register_forward_hook(lambda m, i, o: seen.__setitem__("block", o)),
        layer.register_forward_hook(lambda m, i, o: seen.__setitem__("layer", o)),
    ]
    with torch.no_grad():
        peft.eval()(x)
    for hook in hooks:
        hook.remove()
    y = seen["block"]
    assert y.dim() == spatial_dims + 2
    expect = y + _bottleneck(layer.adapters["default"], y.movedim(1, -1)).movedim(-1, 1)
    assert torch.allclose(seen["layer"], expect, atol=1e-6)


@pytest.mark.parametrize(
    "config",
    [mp.AdapterConfig(bottleneck=4, tune_layernorm=True), mp.AdaptFormerConfig(bottleneck=4)],
    ids=["houlsby+ln", "adaptformer"],
)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_save_and_load_are_bit_exact(config, spatial_dims, tmp_path) -> None:
    base = vit(spatial_dims)
    fresh = copy.deepcopy(base)
    peft = mp.get_peft_model(base, config)
    randomize_adapter_params(peft, std=0.2)
    peft.eval()
    x = image(spatial_dims)
    with torch.no_grad():
        out = first(peft(x))
    peft.save_adapter(tmp_path)
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    saved, again = peft.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(first(loaded(x)), out)

"""VPT (shallow / deep) and VP (additive token prompts, pixel padding) on MONAI ViT (with and without
CLS), UNETR, MaskedAutoEncoderViT and timm ViTs, in 2D and 3D."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

import monai_peft as mp
from monai_peft.methods.prompts import (
    AdditivePromptLayer,
    PixelPadPrompt,
    PixelPromptLayer,
    TokenPromptLayer,
    VPConfig,
    VPTConfig,
)
from tests.helpers import (
    first,
    grad_report,
    randomize_adapter_params,
    tiny_mae,
    tiny_resnet,
    tiny_swinunetr,
    tiny_unetr,
    tiny_vit,
)

timm = pytest.importorskip("timm")


def vit_nocls(spatial_dims: int = 2) -> ViT:
    return ViT(
        in_channels=1,
        img_size=(32,) * spatial_dims,
        patch_size=8,
        spatial_dims=spatial_dims,
        hidden_size=48,
        mlp_dim=96,
        num_layers=2,
        num_heads=4,
        classification=False,
        qkv_bias=True,
    )


def timm_vit(img: int = 32, patch: int = 8, **kw) -> nn.Module:
    return timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=img,
        patch_size=patch,
        embed_dim=48,
        depth=2,
        num_heads=4,
        mlp_ratio=2,
        num_classes=3,
        in_chans=1,
        **kw,
    )


NETS = {
    "vit2d": (lambda: tiny_vit(2), (2, 1, 32, 32)),
    "vit3d": (lambda: tiny_vit(3), (2, 1, 32, 32, 32)),
    "vit2d-nocls": (lambda: vit_nocls(2), (2, 1, 32, 32)),
    "unetr2d": (lambda: tiny_unetr(2), (2, 1, 32, 32)),
    "timm2d": (lambda: timm_vit(), (2, 1, 32, 32)),
    "timm2d-reg": (lambda: timm_vit(reg_tokens=2), (2, 1, 32, 32)),
}
METHODS = {
    "vpt-deep": ("vpt", {"prompt_length": 3}),
    "vpt-shallow": ("vpt", {"prompt_length": 3, "deep": False}),
    "vpt-layers": ("vpt", {"prompt_length": 2, "layers": [-1]}),
    "vp-token": ("vp", {"prompt_length": 2}),
    "vp-pixel": ("vp", {"mode": "pixel", "pad_size": 4}),
}
CASES = [pytest.param(m, n, id=f"{m}-{n}") for m in METHODS for n in NETS if m != "vpt-layers" or n == "vit3d"]


def build(method: str, net_name: str, seed: int = 0, **extra):
    torch.manual_seed(seed)
    factory, shape = NETS[net_name]
    net = factory()
    name, kwargs = METHODS[method]
    if kwargs.get("mode") == "pixel":  # MONAI's ViT stores its patch count, not its image size
        kwargs = {**kwargs, "image_size": list(shape[2:])}
    return net, mp.get_config(name, **{**kwargs, **extra}), shape


def as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def shapes(out):
    """Shapes of every tensor in a network output (MONAI ViT: logits and each block's hidden states)."""
    res = []
    for o in as_list(out):
        res += [tuple(t.shape) for t in o] if isinstance(o, list) else [tuple(o.shape)]
    return res


@pytest.mark.parametrize("method,net_name", CASES)
def test_shapes_gradients_disable_and_bit_exact_round_trip(method, net_name, tmp_path):
    net, cfg, shape = build(method, net_name)
    fresh = copy.deepcopy(net)
    x = torch.randn(shape)
    net.eval()
    with torch.no_grad():
        ref = net(x)
    model = mp.get_peft_model(net, cfg)
    # token counts preserved: logits, final tokens and every hidden state (UNETR's decoder reshapes them)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert shapes(out) == shapes(ref)
    # only prompt parameters train, all of them receive gradients
    model.train()
    first(model(x)).float().square().mean().backward()
    trainable, with_grad, missing = grad_report(model)
    assert trainable and with_grad == trainable and not missing
    assert all(("prompt" in n or "slabs" in n) and ".adapters.default." in n for n in trainable)
    # disable_adapter gives the base outputs exactly
    randomize_adapter_params(model, std=0.2)
    model.eval()
    with torch.no_grad():
        y = first(model(x))
        assert not torch.allclose(y, first(ref))
        with model.disable_adapter():
            torch.testing.assert_close(first(model(x)), first(ref), rtol=0, atol=0)
        torch.testing.assert_close(first(model(x)), y, rtol=0, atol=0)
    # save / load round trip, bit exact
    model.save_adapter(tmp_path / "ad")
    model.requires_grad_(False)
    with torch.no_grad():
        expected = model(x)
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path / "ad").eval()
    with torch.no_grad():
        got = loaded(x)
    for a, b in zip(as_list(got), as_list(expected)):
        for ta, tb in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            torch.testing.assert_close(ta, tb, rtol=0, atol=0)
    assert loaded.trainable_parameters()[0] == 0


@pytest.mark.parametrize("method", ["vpt-shallow", "vp-token"])
def test_unetr_3d_end_to_end(method):
    """UNETR's decoder reshapes hidden_states_out[3, 6, 9] to the patch grid: token counts must hold."""
    torch.manual_seed(0)
    net = tiny_unetr(3)
    name, kwargs = METHODS[method]
    model = mp.get_peft_model(net, mp.get_config(name, **kwargs))
    x = torch.randn(1, 1, 32, 32, 32)
    vit_out, hidden = model.base_model.vit(x)
    assert vit_out.shape == (1, 8, 48) and all(h.shape == (1, 8, 48) for h in hidden) and len(hidden) == 12
    y = model(x)
    assert y.shape == (1, 2, 32, 32, 32)
    y.square().mean().backward()
    trainable, with_grad, missing = grad_report(model)
    assert trainable and with_grad == trainable and not missing


def _reference_vpt(base: ViT, x: torch.Tensor, prompts: dict[int, torch.Tensor]):
    """VPT written out by hand on a MONAI ViT with CLS: [CLS, P, E]; fresh P_i at prompted layers."""
    h = base.patch_embedding(x)
    h = torch.cat([base.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
    n = next(iter(prompts.values())).shape[0]
    hidden = []
    for i, blk in enumerate(base.blocks):
        if i in prompts:
            rest = h[:, 1:] if i == min(prompts) else h[:, 1 + n :]
            h = torch.cat([h[:, :1], prompts[i].expand(x.shape[0], -1, -1), rest], dim=1)
        h = blk(h)
        hidden.append(torch.cat([h[:, :1], h[:, 1 + n :]], dim=1) if i >= min(prompts) else h)
    return base.classification_head(base.norm(h)[:, 0]), hidden


@pytest.mark.parametrize("kwargs", [{"deep": False}, {"deep": True}, {"layers": [0, 2]}, {"layers": [1]}], ids=str)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_vpt_equals_hand_written_reference(kwargs, spatial_dims):
    torch.manual_seed(0)
    base = tiny_vit(spatial_dims, layers=3).eval()
    model = mp.get_peft_model(copy.deepcopy(base), VPTConfig(prompt_length=3, **kwargs)).eval()
    blocks = model.base_model.blocks
    prompts = {
        i: blocks[i].adapters["default"].prompt
        for i in range(3)
        if isinstance(blocks[i], TokenPromptLayer) and blocks[i].adapters["default"].prompt is not None
    }
    expected = {0} if kwargs == {"deep": False} else set(kwargs.get("layers", [0, 1, 2]))
    assert set(prompts) == expected
    # blocks before the first prompted one are not wrapped; later ones carry (shallow) or overwrite (deep)
    assert [isinstance(b, TokenPromptLayer) for b in blocks] == [i >= min(expected) for i in range(3)]
    x = torch.randn((2, 1) + (32,) * spatial_dims)
    with torch.no_grad():
        y, hidden = model(x)
        ry, rhidden = _reference_vpt(base, x, prompts)
    torch.testing.assert_close(y, ry, rtol=0, atol=0)
    for a, b in zip(hidden, rhidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vpt_init_bound_and_prefix_tokens():
    # VPT: uniform(+-sqrt(6 / (fan_in + d))), fan_in = C_in * prod(patch) (3 p^2 for RGB 2D)
    net = ViT(
        in_channels=3,
        img_size=(32, 32),
        patch_size=8,
        spatial_dims=2,
        hidden_size=48,
        mlp_dim=96,
        num_layers=1,
        num_heads=4,
        classification=True,
    )
    model = mp.get_peft_model(net, VPTConfig(prompt_length=200))
    p = model.base_model.blocks[0].adapters["default"].prompt
    bound = math.sqrt(6.0 / (3 * 8 * 8 + 48))
    assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    model3d = mp.get_peft_model(tiny_vit(3), VPTConfig(prompt_length=200, init_fan_in=3 * 16 * 16))
    p3 = model3d.base_model.blocks[0].adapters["default"].prompt
    assert p3.abs().max() <= math.sqrt(6.0 / (3 * 256 + 48))
    # prefix tokens: 1 (MONAI CLS), 0 (no CLS), 1 + registers (timm)
    assert model.base_model.blocks[0].adapters["default"].num_prefix_tokens == 1
    nocls = mp.get_peft_model(vit_nocls(2), VPTConfig())
    assert nocls.base_model.blocks[0].adapters["default"].num_prefix_tokens == 0
    reg = mp.get_peft_model(timm_vit(reg_tokens=2), VPTConfig())
    assert reg.base_model.blocks[0].adapters["default"].num_prefix_tokens == 3


def test_vpt_on_timm_equals_hand_written_reference():
    torch.manual_seed(0)
    base = timm_vit(reg_tokens=1).eval()
    model = mp.get_peft_model(copy.deepcopy(base), VPTConfig(prompt_length=4, deep=True)).eval()
    prompts = [model.base_model.blocks[i].adapters["default"].prompt for i in range(2)]
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        h = base.norm_pre(base._pos_embed(base.patch_embed(x)))
        for i, blk in enumerate(base.blocks):
            rest = h[:, 2:] if i == 0 else h[:, 6:]
            h = blk(torch.cat([h[:, :2], prompts[i].expand(2, -1, -1), rest], dim=1))
        h = torch.cat([h[:, :2], h[:, 6:]], dim=1)
        ref = base.forward_head(base.norm(h))
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
        feats = model.forward_features(x)  # the wrapped model keeps timm's own API
        assert feats.shape == (2, 2 + 16, 48)


def test_vpt_and_vp_on_masked_autoencoder_encoder():
    for cfg in (VPTConfig(prompt_length=2), VPConfig(prompt_length=2)):
        torch.manual_seed(0)
        net = tiny_mae(2)
        model = mp.get_peft_model(net, cfg)
        torch.manual_seed(1)
        out, mask = model(torch.randn(2, 1, 32, 32))
        assert out.shape == (2, 16, 64) and mask.shape == (2, 16)
        assert sum(isinstance(m, (TokenPromptLayer, AdditivePromptLayer)) for m in model.modules()) == 2


def test_vpt_extends_a_key_mask_and_refuses_other_masks():
    from monai.networks.blocks import TransformerBlock

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([TransformerBlock(16, 32, 2, qkv_bias=True) for _ in range(2)])

        def forward(self, x, attn_mask=None):
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask)
            return x

    torch.manual_seed(0)
    net = Tokens().eval()
    model = mp.get_peft_model(net, VPTConfig(prompt_length=3, num_prefix_tokens=1)).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5)
    mask[:, -1] = 0
    with torch.no_grad():
        y = model(x, attn_mask=mask)
        y_noise = model(torch.cat([x[:, :4], torch.randn(2, 1, 16)], dim=1), attn_mask=mask)
    assert y.shape == x.shape
    torch.testing.assert_close(y[:, :4], y_noise[:, :4])  # the masked key is still ignored
    with pytest.raises(mp.errors.InputDataError, match="key mask"):
        model(x, attn_mask=torch.ones(2, 5, 5))


def test_vp_token_tiles_the_prompt_over_patch_tokens():
    torch.manual_seed(0)
    base = tiny_vit(2, layers=1).eval()  # 16 patch tokens + CLS
    for cover in (False, True):
        model = mp.get_peft_model(copy.deepcopy(base), VPConfig(prompt_length=5, cover_remainder=cover)).eval()
        ad = model.base_model.blocks[0].adapters["default"]
        off = ad.offsets(17)
        assert off.shape == (17, 48) and torch.equal(off[0], torch.zeros(48))  # CLS untouched
        for t in range(16):
            expect = ad.prompt[t % 5] if (cover or t < 15) else torch.zeros(48)
            assert torch.equal(off[1 + t], expect)
        x = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            h = torch.cat([base.cls_token.expand(2, -1, -1), base.patch_embedding(x)], dim=1)
            ref = base.classification_head(base.norm(base.blocks[0](h + off))[:, 0])
            torch.testing.assert_close(model(x)[0], ref, rtol=0, atol=0)
    with pytest.raises(mp.ConfigError, match="exceeds the 16 patch tokens"):
        mp.get_peft_model(copy.deepcopy(base), VPConfig(prompt_length=20))


@pytest.mark.parametrize("net_name", ["vit2d", "vit3d", "unetr2d", "timm2d"])
@pytest.mark.parametrize("mode", ["token", "pixel"])
def test_zero_vp_is_exactly_the_base_network(net_name, mode):
    torch.manual_seed(0)
    factory, shape = NETS[net_name]
    net = factory().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = first(net(x))
    size = {"image_size": list(shape[2:])} if mode == "pixel" else {}
    model = mp.get_peft_model(net, VPConfig(mode=mode, prompt_init="zeros", prompt_length=2, pad_size=3, **size)).eval()
    with torch.no_grad():
        torch.testing.assert_close(first(model(x)), ref, rtol=0, atol=0)


def test_pixel_prompt_frame_2d_3d_and_cnn():
    # the slabs tile the border exactly: Bahng's 2D count and a 3D frame of six faces
    p2 = PixelPadPrompt(3, (224, 224), 30, init="normal", std=1.0)
    assert sum(t.numel() for t in p2.parameters()) == 2 * 3 * 30 * 224 + 2 * 3 * (224 - 60) * 30 == 69840
    frame = p2.prompt()
    assert frame.shape == (3, 224, 224) and frame[:, 30:-30, 30:-30].abs().sum() == 0
    assert (frame[:, :30] != 0).all() and (frame[:, :, -30:] != 0).all()
    p3 = PixelPadPrompt(1, (12, 10, 8), 2, init="normal", std=1.0)
    f3 = p3.prompt()
    assert sum(t.numel() for t in p3.parameters()) == 12 * 10 * 8 - 8 * 6 * 4
    assert f3[:, 2:-2, 2:-2, 2:-2].abs().sum() == 0 and (f3[:, :2] != 0).all() and (f3[..., -2:] != 0).all()
    # any network whose input module is known: a MONAI ResNet (CNN) with an explicit image size
    net = tiny_resnet(3)
    with pytest.raises(mp.MethodNotApplicableError, match="image_size"):
        mp.get_peft_model(copy.deepcopy(net), VPConfig(mode="pixel", pad_size=2))
    model = mp.get_peft_model(net, VPConfig(mode="pixel", pad_size=2, image_size=[16, 16, 16]))
    assert isinstance(model.base_model.conv1, PixelPromptLayer)
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 3)
    with pytest.raises(mp.errors.InputDataError, match="built for inputs of shape"):
        model(torch.randn(2, 1, 20, 16, 16))
    # UNETR: both image branches (ViT and the conv encoder) see the same, shared prompt
    unetr = mp.get_peft_model(tiny_unetr(3), VPConfig(mode="pixel", pad_size=4))
    a, b = unetr.base_model.vit.adapters["default"], unetr.base_model.encoder1.adapters["default"]
    assert a is b and unetr.trainable_parameters()[0] == 32**3 - 24**3
    assert len(unetr.adapter_state_dict()) == 3


@pytest.mark.parametrize("cfg", [VPTConfig(), VPConfig()], ids=["vpt", "vp"])
def test_cnn_and_window_attention_are_rejected_with_reasons(cfg):
    with pytest.raises(mp.MethodNotApplicableError, match=r"no transformer block.*ResNet.*CNN.*Methods that apply"):
        mp.get_peft_model(tiny_resnet(2), cfg)
    with pytest.raises(mp.MethodNotApplicableError, match=r"SwinUNETR.*WindowAttention"):
        mp.get_peft_model(tiny_swinunetr(2), cfg)
    with pytest.raises(mp.MethodNotApplicableError, match=r"cannot prompt blocks\.0\.mlp"):
        mp.get_peft_model(tiny_vit(2), cfg.replace(target_modules=["blocks.0.mlp"]))

    class NoAttention(nn.Module):  # blocks without any attention module
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))

        def forward(self, x):
            return self.blocks(x)

    with pytest.raises(mp.MethodNotApplicableError, match="no transformer block"):
        mp.get_peft_model(NoAttention(), cfg)


def test_config_validation():
    with pytest.raises(mp.ConfigError, match="prompt_length"):
        VPTConfig(prompt_length=0)
    with pytest.raises(mp.ConfigError, match="exactly one layer"):
        VPTConfig(deep=False, layers=[0, 1])
    with pytest.raises(mp.ConfigError, match="mode"):
        VPConfig(mode="frame")
    with pytest.raises(mp.ConfigError, match="out of range"):
        mp.get_peft_model(tiny_vit(2), VPTConfig(layers=[5]))
    assert "vpt" in mp.list_methods() and "vp" in mp.list_methods()
    assert isinstance(mp.get_config("vpt", prompt_length=4), VPTConfig)


@pytest.mark.parametrize("method", ["vpt-deep", "vpt-shallow", "vp-token", "vp-pixel"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_few_steps_reduce_the_loss(method, spatial_dims):
    torch.manual_seed(0)
    net = tiny_vit(spatial_dims, img=32 if spatial_dims == 2 else 16)
    name, kwargs = METHODS[method]
    x = torch.randn((4, 1) + ((32,) * 2 if spatial_dims == 2 else (16,) * 3))
    pixel = {"pad_size": 3, "image_size": list(x.shape[2:])} if method == "vp-pixel" else {}
    model = mp.get_peft_model(net, mp.get_config(name, **{**kwargs, **pixel}))
    target = torch.arange(4) % 3
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(first(model(x)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.cross_entropy(first(model(x)), target).item()
    assert final < losses[0] - 1e-3, (losses, final)

"""Convpass: bypass equation, token grid (2D/3D, CLS), identity at init, gradients, save/load,
training, and refusals (CNNs, Swin, token counts that are not a grid)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets

import monai_peft as mp
from monai_peft.methods.convpass import ConvBypass, ConvpassConfig, ConvpassLayer
from monai_peft.methods.token_geometry import GridProbeLayer
from tests.helpers import (
    first,
    grad_report,
    randomize_adapter_params,
    tiny_resnet,
    tiny_swinunetr,
    tiny_unetr,
    tiny_vit,
    toy_loss,
    train_and_check_loss_drops,
)

CASES = [
    pytest.param(lambda: tiny_vit(2), (2, 1, 32, 32), {}, id="vit-2d"),
    pytest.param(lambda: tiny_vit(3), (2, 1, 32, 32, 32), {}, id="vit-3d"),
    pytest.param(
        lambda: tiny_vit(2), (2, 1, 32, 32), {"conv_init": "xavier", "positions": ["attn"]}, id="vit-2d-xavier-attn"
    ),
    pytest.param(lambda: tiny_unetr(3), (1, 1, 32, 32, 32), {}, id="unetr-3d"),
]


@pytest.mark.parametrize("make,shape,kw", CASES)
def test_identity_at_init_shapes_and_only_bypass_gets_gradients(make, shape, kw):
    net = make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = first(net(x))
    model = mp.get_peft_model(net, ConvpassConfig(**kw))
    layers = [layer for _, layer in model.adapter_layers()]
    assert sum(isinstance(layer, GridProbeLayer) for layer in layers) == 1  # the patch embedding's grid probe
    n_layers = sum(isinstance(layer, ConvpassLayer) for layer in layers)
    assert n_layers == len(kw.get("positions", ["attn", "mlp"])) * (2 if "vit" in type(net).__name__.lower() else 12)
    model.eval()
    with torch.no_grad():
        out = first(model(x))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # Up = 0: exact identity
    model.train()
    toy_loss(first(model(x)), x).backward()
    trainable, with_grad, missing = grad_report(model)
    assert trainable and all(".adapters.default." in n for n in trainable)
    assert with_grad == trainable and not missing


@pytest.mark.parametrize("make,shape,kw", CASES)
def test_save_load_round_trip_is_bit_exact(make, shape, kw, tmp_path):
    net = make()
    fresh = copy.deepcopy(net)
    x = torch.randn(shape)
    model = mp.get_peft_model(net, ConvpassConfig(**kw))
    randomize_adapter_params(model)
    model.save_adapter(tmp_path)
    model.eval().requires_grad_(False)
    with torch.no_grad():
        expected = first(model(x))
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(first(loaded(x)), expected, rtol=0, atol=0)
    assert loaded.peft_config["default"] == model.peft_config["default"]


@pytest.mark.parametrize("make,shape,kw", CASES[:2] + CASES[3:])
def test_a_few_steps_reduce_the_loss(make, shape, kw):
    train_and_check_loss_drops(mp.get_peft_model(make(), ConvpassConfig(**kw)), torch.randn(shape))


def _reference_bypass(bp: ConvBypass, z: torch.Tensor, grid: tuple[int, ...], prefix: int) -> torch.Tensor:
    """CB(z) written out with functional ops: the CLS token meets only the centre tap and the bias."""

    def qg(a):
        return a * torch.sigmoid(1.702 * a)

    h = qg(z @ bp.down.weight.T + bp.down.bias)
    b, n, m = h.shape
    dims = len(grid)
    conv_fn = {2: F.conv2d, 3: F.conv3d}[dims]
    patches = h[:, prefix:].reshape(b, *grid, m).movedim(-1, 1)
    patches = conv_fn(patches, bp.conv.weight, bp.conv.bias, padding=1).flatten(2).transpose(1, 2)
    centre = bp.conv.weight[(slice(None), slice(None)) + (1,) * dims]  # (m, m)
    cls = h[:, :prefix] @ centre.T + bp.conv.bias
    h = qg(torch.cat([cls, patches], dim=1))
    return (h @ bp.up.weight.T + bp.up.bias) * bp.scale


@pytest.mark.parametrize("dims", [2, 3])
def test_block_computes_the_convpass_equation(dims):
    net = tiny_vit(dims)
    model = mp.get_peft_model(net, ConvpassConfig(scale=0.7, dropout=0.0, grid_size=[4] * dims))
    randomize_adapter_params(model, std=0.3)
    model.eval()
    blk = net.blocks[0]
    assert isinstance(blk.attn, ConvpassLayer) and isinstance(blk.mlp, ConvpassLayer)
    bp_attn, bp_mlp = blk.attn.adapters["default"], blk.mlp.adapters["default"]
    assert bp_attn.grid == (4,) * dims
    x = torch.randn(2, 1 + 4**dims, 48)
    with torch.no_grad():
        z1 = blk.norm1(x)
        x1 = x + blk.attn.base_layer(z1) + _reference_bypass(bp_attn, z1, (4,) * dims, 1)
        z2 = blk.norm2(x1)
        expected = x1 + blk.mlp.base_layer(z2) + _reference_bypass(bp_mlp, z2, (4,) * dims, 1)
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)


def test_init_of_the_bypass():
    bp = ConvBypass(48, 8, 2)
    assert torch.equal(bp.up.weight, torch.zeros(48, 8)) and torch.equal(bp.up.bias, torch.zeros(48))
    assert torch.equal(bp.down.bias, torch.zeros(8)) and torch.equal(bp.conv.bias, torch.zeros(8))
    expected = torch.zeros(8, 8, 3, 3)
    expected[:, :, 1, 1] = torch.eye(8)
    assert torch.equal(bp.conv.weight, expected)
    bp3 = ConvBypass(48, 8, 3, conv_init="xavier")
    assert bp3.conv.weight.shape == (8, 8, 3, 3, 3) and bp3.conv.weight.abs().sum() > 0


def test_parameter_count_and_vit_b_numbers():
    model = mp.get_peft_model(tiny_vit(2), ConvpassConfig())
    per_bypass = (48 * 8 + 8) + (8 * 8 * 9 + 8) + (8 * 48 + 48)
    assert model.trainable_parameters()[0] == 2 * 2 * per_bypass


def test_token_count_that_is_not_a_grid_raises_clearly():
    model = mp.get_peft_model(tiny_vit(2), ConvpassConfig())
    attn = model.base_model.blocks[0].attn
    with pytest.raises(mp.MonaiPeftError, match="grid of this 17-token sequence is unknown"):
        attn(torch.randn(1, 17, 48))  # MONAI's ViT stores no grid and no forward pass has shown one yet
    model(torch.randn(1, 1, 32, 32))
    with pytest.raises(mp.MonaiPeftError, match="cannot hold the 4x4 patch grid plus 1 prefix"):
        attn(torch.randn(1, 10, 48))
    # a bypass on its own needs its grid: a square count is never taken as a square grid
    with pytest.raises(mp.MonaiPeftError, match="unknown.*grid_size"):
        ConvBypass(48, 8, 2)(torch.randn(1, 17, 48))
    bp = ConvBypass(48, 8, 2, grid=(4, 4))
    assert bp(torch.randn(1, 17, 48)).shape == (1, 17, 48)
    with pytest.raises(mp.MonaiPeftError, match=r"\(B, N, 48\)"):
        bp(torch.randn(1, 48, 4, 4))


def test_extra_prefix_tokens_go_through_the_centre_tap():
    """Prompt / register tokens inserted before the patches are prefix tokens like CLS."""
    model = mp.get_peft_model(tiny_vit(2), ConvpassConfig(dropout=0.0))
    randomize_adapter_params(model, std=0.3)
    bp = model.base_model.blocks[0].attn.adapters["default"]
    model(torch.randn(1, 1, 32, 32))  # the patch embedding's probe records the 4 x 4 grid
    z = torch.randn(2, 3 + 16, 48)  # CLS + 2 prompts + 4x4 patches
    with torch.no_grad():
        torch.testing.assert_close(bp(z), _reference_bypass(bp, z, (4, 4), 3), rtol=1e-5, atol=1e-6)


def test_non_cubic_grid_is_read_from_the_input_or_given():
    def make():
        return nets.ViT(
            in_channels=1,
            img_size=(32, 16, 24),
            patch_size=8,
            spatial_dims=3,
            hidden_size=48,
            mlp_dim=96,
            num_layers=1,
            num_heads=4,
            classification=True,
            num_classes=2,
        )

    x = torch.randn(2, 1, 32, 16, 24)
    probed = mp.get_peft_model(make(), ConvpassConfig())
    given = mp.get_peft_model(make(), ConvpassConfig(grid_size=[4, 2, 3]))
    randomize_adapter_params(probed)
    given.load_state_dict(probed.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(first(probed.eval()(x)), first(given.eval()(x)), rtol=0, atol=0)
    with pytest.raises(mp.ConfigError, match="does not fit"):
        mp.get_peft_model(make(), ConvpassConfig(grid_size=[4, 4, 4]))  # 64 patches, the network makes 24
    model = mp.get_peft_model(make(), ConvpassConfig(grid_size=[4, 2, 3]))
    randomize_adapter_params(model)
    assert first(model(x)).shape == (2, 2)
    # the bypass sees the patches in the patch embedding's row-major order
    bp = model.base_model.blocks[0].attn.adapters["default"]
    assert bp.grid == (4, 2, 3)


def test_cnn_and_swin_are_refused_with_the_reason():
    with pytest.raises(mp.MethodNotApplicableError, match=r"convpass found nothing.*pre-norm ViT blocks.*ResNetBlock"):
        mp.get_peft_model(tiny_resnet(2), ConvpassConfig())
    with pytest.raises(mp.MethodNotApplicableError, match="SwinTransformerBlock"):
        mp.get_peft_model(tiny_swinunetr(2), ConvpassConfig())
    with pytest.raises(mp.AdapterError, match="cannot be merged"):
        mp.get_peft_model(tiny_vit(2), ConvpassConfig()).merge_adapter()


def test_explicit_sublayer_targets_and_config_round_trip():
    model = mp.get_peft_model(tiny_vit(2), ConvpassConfig(target_modules=["blocks.1.mlp"]))
    assert [p for p, layer in model.adapter_layers() if isinstance(layer, ConvpassLayer)] == ["blocks.1.mlp"]
    cfg = ConvpassConfig(grid_size=(4, 4), positions=["mlp"])
    assert mp.PeftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(mp.ConfigError, match="kernel_size"):
        ConvpassConfig(kernel_size=4)
    with pytest.raises(mp.ConfigError, match="positions"):
        ConvpassConfig(positions=["ffn"])


def test_timm_vit_blocks():
    timm = pytest.importorskip("timm")
    net = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, embed_dim=48, depth=2, num_heads=4, num_classes=3
    ).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = net(x)
    model = mp.get_peft_model(net, ConvpassConfig(target_types=["Block"]))
    assert sum(isinstance(layer, ConvpassLayer) for _, layer in model.adapter_layers()) == 4
    bp = net.blocks[0].attn.adapters["default"]
    assert bp.grid == (4, 4) and bp.num_prefix_tokens == 1  # timm's grid_size and num_prefix_tokens
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    randomize_adapter_params(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), ref)


def test_vit_b16_count_matches_the_paper():
    """Convpass reports 0.33 M trainable parameters on ViT-B/16 (bottleneck 8, two bypasses, 12 blocks)."""
    from monai_peft.methods.base import AdapterLayer
    from monai_peft.methods.convpass import ConvpassTuner

    with torch.device("meta"):
        net = nets.ViT(
            in_channels=3,
            img_size=(224, 224),
            patch_size=16,
            spatial_dims=2,
            hidden_size=768,
            mlp_dim=3072,
            num_layers=12,
            num_heads=12,
            classification=True,
            num_classes=1000,
            qkv_bias=True,
        )
    ConvpassTuner(ConvpassConfig()).inject(net, "default")
    params = {id(p): p.numel() for m in net.modules() if isinstance(m, AdapterLayer) for p in m.adapters.parameters()}
    assert sum(params.values()) == 327_552
    assert net.blocks[0].attn.adapters["default"].grid is None  # MONAI's ViT stores 196 patches, not 14 x 14

"""FacT-TT / FacT-TK: shared factors, the update equation, exact merge, small adapter files, 2D/3D."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks import nets

import monai_peft as mp
from monai_peft.checkpoint import ADAPTER_WEIGHTS_NAME, load_safetensors
from monai_peft.methods.base import AdapterLayer
from monai_peft.methods.fact import FacTAdapter, FacTConfig, FacTLinear
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


def vit4(spatial_dims: int = 2, layers: int = 2) -> nets.ViT:
    """A tiny ViT with the standard MLP ratio 4 (12 slices per layer, as ViT-B)."""
    return nets.ViT(
        in_channels=1,
        img_size=(16,) * spatial_dims,
        patch_size=8,
        spatial_dims=spatial_dims,
        hidden_size=16,
        mlp_dim=64,
        num_layers=layers,
        num_heads=4,
        classification=True,
        num_classes=3,
        qkv_bias=True,
    )


CASES = [
    pytest.param(lambda: tiny_vit(2), (2, 1, 32, 32), "tt", id="tt-vit-2d"),
    pytest.param(lambda: tiny_vit(3), (2, 1, 32, 32, 32), "tt", id="tt-vit-3d"),
    pytest.param(lambda: tiny_vit(2), (2, 1, 32, 32), "tk", id="tk-vit-2d"),
    pytest.param(lambda: tiny_vit(3), (2, 1, 32, 32, 32), "tk", id="tk-vit-3d"),
]


@pytest.mark.parametrize("make,shape,variant", CASES)
def test_identity_at_init_and_only_factors_get_gradients(make, shape, variant):
    net = make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = first(net(x))
    model = mp.get_peft_model(net, FacTConfig(variant=variant))
    assert len(model.adapter_layers()) == 4 * 2  # qkv, proj, fc1, fc2 of both layers
    model.eval()
    with torch.no_grad():
        out = first(model(x))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # V = 0
    model.train()
    toy_loss(first(model(x)), x).backward()
    trainable, with_grad, missing = grad_report(model)
    assert with_grad == trainable and not missing
    assert all(".adapters.default." in n for n in trainable)


@pytest.mark.parametrize("make,shape,variant", CASES)
def test_merge_is_exact_and_unload_gives_the_original_keys(make, shape, variant):
    net = make()
    original = set(net.state_dict())
    x = torch.randn(shape)
    model = mp.get_peft_model(net, FacTConfig(variant=variant, scale=0.5))
    randomize_adapter_params(model, std=0.1)
    model.eval()
    with torch.no_grad():
        y = first(model(x))
        with model.disable_adapter():
            base = first(model(x))
        assert not torch.allclose(y, base)
        model.merge_adapter()
        torch.testing.assert_close(first(model(x)), y, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(first(model(x)), y, rtol=1e-5, atol=1e-5)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert set(plain.state_dict()) == original
        torch.testing.assert_close(first(plain(x)), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_save_load_bit_exact_and_shared_factors_stored_once(variant, tmp_path):
    net = tiny_vit(2)
    fresh = copy.deepcopy(net)
    x = torch.randn(2, 1, 32, 32)
    model = mp.get_peft_model(net, FacTConfig(variant=variant), modules_to_save=["classification_head"])
    randomize_adapter_params(model)
    model.save_adapter(tmp_path)
    tensors, _ = load_safetensors(tmp_path / ADAPTER_WEIGHTS_NAME)
    for factor in ("U", "V") + (("C", "P") if variant == "tk" else ()):
        assert sum(k.endswith(f".shared.{factor}") for k in tensors) == 1, factor
    n_cores = sum(k.endswith(".cores") for k in tensors)
    assert n_cores == (8 if variant == "tt" else 0)
    assert sum(v.numel() for v in tensors.values()) == model.trainable_parameters()[0]
    model.eval().requires_grad_(False)
    with torch.no_grad():
        expected = first(model(x))
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(first(loaded(x)), expected, rtol=0, atol=0)
    # the loaded factors are shared again (one Parameter referenced by every layer)
    ids = {id(layer.adapters["default"].shared.U) for _, layer in loaded.adapter_layers()}
    assert len(ids) == 1


@pytest.mark.parametrize(
    "make,shape,variant",
    [CASES[0], CASES[3], pytest.param(lambda: tiny_unetr(3), (1, 1, 32, 32, 32), "tt", id="tt-unetr-3d")],
)
def test_a_few_steps_reduce_the_loss(make, shape, variant):
    train_and_check_loss_drops(mp.get_peft_model(make(), FacTConfig(variant=variant)), torch.randn(shape))


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_update_equation_per_matrix(variant):
    net = vit4(2)
    model = mp.get_peft_model(net, FacTConfig(variant=variant, r=3, scale=0.3, dropout=0.0))
    randomize_adapter_params(model, std=0.2)
    model.eval()
    qkv, fc1, fc2 = net.blocks[1].attn.qkv, net.blocks[1].mlp.linear1, net.blocks[1].mlp.linear2
    assert isinstance(qkv, FacTLinear)
    ad = qkv.adapters["default"]
    sh = ad.shared
    U, V, s = sh.U, sh.V, 0.3
    if variant == "tt":

        def sigma(adapter, o, i):
            return adapter.cores[o, i]
    else:

        def sigma(adapter, o, i):
            j = adapter.offset + o * adapter.a + i
            return torch.einsum("xyk,k->xy", sh.C, sh.P[:, j])

    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        # fused qkv = three matrices q, k, v with their own cores
        expected = qkv.base_layer(x) + s * torch.cat([(x @ U @ sigma(ad, o, 0)) @ V for o in range(3)], dim=-1)
        torch.testing.assert_close(qkv(x), expected, rtol=1e-5, atol=1e-6)
        # fc1: d -> 4d, four output slices
        a1 = fc1.adapters["default"]
        expected = fc1.base_layer(x) + s * torch.cat([(x @ U @ sigma(a1, o, 0)) @ V for o in range(4)], dim=-1)
        torch.testing.assert_close(fc1(x), expected, rtol=1e-5, atol=1e-6)
        # fc2: 4d -> d, four input slices summed before V
        h = torch.randn(2, 5, 64)
        a2 = fc2.adapters["default"]
        inner = sum(h[..., 16 * i : 16 * (i + 1)] @ U @ sigma(a2, 0, i) for i in range(4))
        torch.testing.assert_close(fc2(h), fc2.base_layer(h) + s * inner @ V, rtol=1e-5, atol=1e-6)


def test_parameter_counts_and_sharing():
    r, d, layers = 4, 16, 3
    tt = mp.get_peft_model(vit4(2, layers), FacTConfig(variant="tt", r=r))
    assert tt.trainable_parameters()[0] == 2 * d * r + 12 * layers * r * r
    tk = mp.get_peft_model(vit4(2, layers), FacTConfig(variant="tk", r=r))
    assert tk.trainable_parameters()[0] == 2 * d * r + r**3 + r * 12 * layers
    shared = tk.base_model.blocks[0].attn.qkv.adapters["default"].shared
    assert shared.P.shape == (r, 12 * layers)
    adapters = [layer.adapters["default"] for _, layer in tk.adapter_layers()]
    assert all(a.shared is shared for a in adapters)
    offsets = sorted((a.offset, a.a * a.b) for a in adapters)
    assert [o for o, _ in offsets] == [sum(n for _, n in offsets[:i]) for i in range(len(offsets))]  # disjoint slices
    assert isinstance(adapters[0], FacTAdapter)


def test_initialisation():
    model = mp.get_peft_model(vit4(2), FacTConfig(variant="tk", r=4))
    sh = model.base_model.blocks[0].attn.qkv.adapters["default"].shared
    assert torch.equal(sh.V, torch.zeros(4, 16))
    assert sh.U.abs().max() <= 1 / 16**0.5 and sh.U.abs().sum() > 0
    tt = mp.get_peft_model(vit4(2), FacTConfig(variant="tt", r=4))
    fc2 = tt.base_model.blocks[0].mlp.linear2.adapters["default"]
    assert fc2.cores.shape == (1, 4, 4, 4) and fc2.cores.abs().max() <= 1 / (4 * 4) ** 0.5


def test_refusals():
    with pytest.raises(mp.MethodNotApplicableError, match="fact factorises.*no transformer linears"):
        mp.get_peft_model(tiny_resnet(2), FacTConfig())
    with pytest.raises(mp.MethodNotApplicableError, match="hidden size d=12"):
        mp.get_peft_model(tiny_swinunetr(2), FacTConfig())
    one_stage = mp.get_peft_model(
        tiny_swinunetr(2),
        FacTConfig(target_modules=r"swinViT\.layers1\.0\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear[12])"),
    )
    assert len(one_stage.adapter_layers()) == 4
    with pytest.raises(mp.ConfigError, match="variant"):
        FacTConfig(variant="cp")
    cfg = FacTConfig(variant="tk", r=16, scale=10.0)
    assert mp.PeftConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("variant,r,expected", [("tt", 8, 21_504), ("tk", 8, 13_952), ("tt", 16, 61_440)])
def test_vit_b16_counts(variant, r, expected):
    """ViT-B/16: 2 * 768 * r shared + 144 slices of r x r (TT) or r^3 + 144 r (TK)."""
    from monai_peft.methods.fact import FacTTuner

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
    FacTTuner(FacTConfig(variant=variant, r=r)).inject(net, "default")
    params = {id(p): p.numel() for m in net.modules() if isinstance(m, AdapterLayer) for p in m.adapters.parameters()}
    assert sum(params.values()) == expected
    if variant == "tk":
        assert net.blocks[0].attn.qkv.adapters["default"].shared.P.shape == (r, 144)

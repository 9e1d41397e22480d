"""Token geometry shared by DKA, Convpass, VPT/VP and EPT: the true grid of every forward pass, never a guess
(non-square 2D, anisotropic 3D, timm ``dynamic_img_size`` at another resolution), configs left untouched, and
the resolved plan saved in ``adapter_config.json``."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

import monai_peft as mp
from monai_peft.methods.convpass import ConvpassConfig
from monai_peft.methods.dka import DKAConfig
from monai_peft.methods.ept import EPTConfig
from tests import helpers as h


def _vit(img, patch, dims=2, layers=1, **kw) -> ViT:
    torch.manual_seed(0)
    return ViT(
        in_channels=1,
        img_size=img,
        patch_size=patch,
        spatial_dims=dims,
        hidden_size=48,
        mlp_dim=96,
        num_layers=layers,
        num_heads=4,
        classification=True,
        num_classes=2,
        post_activation=None,
        **kw,
    )


def _timm_vit(img: int = 224, patch: int = 16, **kw) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=patch, in_chans=1, embed_dim=48, depth=1, num_heads=4, num_classes=2, **kw
    )


def _capture(module: nn.Module) -> dict[str, torch.Tensor]:
    """Records the input and output of ``module`` on the next forward pass."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m, args, out):
        seen["x"], seen["y"] = args[0].detach(), out.detach()

    module.register_forward_hook(hook)
    return seen


def _dka_reference(a, x: torch.Tensor, grid: tuple[int, ...], prefix: int) -> torch.Tensor:
    """METHODS.md 1.2 written out on the given grid (eval mode: no dropout)."""
    z = F.gelu(x @ a.down.weight.t())
    b, _, m = z.shape
    zmap = z[:, prefix:].reshape(b, *grid, m).movedim(-1, 1)
    conv = F.conv2d if len(grid) == 2 else F.conv3d
    mixed = sum(
        conv(zmap, w, padding=tuple(k // 2 for k in w.shape[2:]), groups=m) for w in (a.large.weight, a.small.weight)
    )
    z = torch.cat([z[:, :prefix], mixed.flatten(2).transpose(1, 2)], dim=1)
    return F.gelu(z) @ a.up.weight.t()


def _convpass_reference(bp, z: torch.Tensor, grid: tuple[int, ...], prefix: int) -> torch.Tensor:
    """Convpass's bypass written out on the given grid (eval mode)."""

    def act(t):
        return t * torch.sigmoid(1.702 * t)

    hid = act(bp.down(z))
    b, _, m = hid.shape
    conv = {2: F.conv2d, 3: F.conv3d}[len(grid)]
    pad = bp.conv.weight.shape[-1] // 2
    patches = conv(hid[:, prefix:].transpose(1, 2).reshape(b, m, *grid), bp.conv.weight, bp.conv.bias, padding=pad)
    pre = conv(hid[:, :prefix].reshape(b * prefix, m, *(1,) * len(grid)), bp.conv.weight, bp.conv.bias, padding=pad)
    hid = torch.cat([pre.reshape(b, prefix, m), patches.flatten(2).transpose(1, 2)], dim=1)
    return bp.up(act(hid)) * float(bp.scale)


def _randomize(model: nn.Module) -> None:
    h.randomize_adapter_params(model, std=0.2)


# ---------------------------------------------------------------------------------------------
# item 1: never guess the grid from the token count (2D non-square, 3D anisotropic)
# ---------------------------------------------------------------------------------------------
def test_dka_on_a_256x64_vit_uses_the_true_16x4_grid():
    """64 patches are a perfect square, but the grid is 16 x 4 (not 8 x 8)."""
    net = _vit((256, 64), 16)
    cfg = DKAConfig(bottleneck=4, large_kernel=9, small_kernel=3, dropout=0.0, input_shape=[1, 256, 64])
    model = mp.get_peft_model(net, cfg).eval()
    a = model.base_model.blocks[0].adapters["default"]
    assert a.large.kernel_size == (9, 7)  # clamped to 2 n - 1 per axis of the true grid
    seen = _capture(a)
    with torch.no_grad():
        model(torch.randn(2, 1, 256, 64))
        torch.testing.assert_close(seen["y"], _dka_reference(a, seen["x"], (16, 4), 1), rtol=1e-5, atol=1e-6)


def test_dka_without_a_known_grid_says_what_to_pass_and_then_follows_the_runtime_grid():
    with pytest.raises(mp.MethodNotApplicableError, match=r"grid=.*input_shape"):
        mp.get_peft_model(_vit((256, 64), 16), DKAConfig())
    model = mp.get_peft_model(_vit((256, 64), 16), DKAConfig(bottleneck=4, dropout=0.0, clamp_kernels=False)).eval()
    a = model.base_model.blocks[0].adapters["default"]
    assert a.large.kernel_size == (51, 51) and a.grid is None
    seen = _capture(a)
    with torch.no_grad():
        model(torch.randn(1, 1, 256, 64))
        torch.testing.assert_close(seen["y"], _dka_reference(a, seen["x"], (16, 4), 1), rtol=1e-5, atol=1e-6)


def test_convpass_on_a_64x64x8_volume_uses_the_true_8x8x1_grid():
    """64 patches are a perfect cube, but the grid is 8 x 8 x 1 (not 4 x 4 x 4)."""
    net = _vit((64, 64, 8), 8, dims=3)
    model = mp.get_peft_model(net, ConvpassConfig(dropout=0.0))
    _randomize(model)
    model.eval()
    bp = model.base_model.blocks[0].attn.adapters["default"]
    seen = _capture(bp)
    with torch.no_grad():
        model(torch.randn(2, 1, 64, 64, 8))
        torch.testing.assert_close(seen["y"], _convpass_reference(bp, seen["x"], (8, 8, 1), 1), rtol=1e-5, atol=1e-6)


def test_dka_3d_anisotropic_grid_from_input_shape():
    net = _vit((64, 64, 8), 8, dims=3)
    model = mp.get_peft_model(
        net, DKAConfig(bottleneck=4, large_kernel=7, small_kernel=3, dropout=0.0, input_shape=[1, 64, 64, 8])
    )
    a = model.base_model.blocks[0].adapters["default"]
    assert a.grid == (8, 8, 1) and a.large.kernel_size == (7, 7, 1)
    seen = _capture(a)
    with torch.no_grad():
        model.eval()(torch.randn(1, 1, 64, 64, 8))
        torch.testing.assert_close(seen["y"], _dka_reference(a, seen["x"], (8, 8, 1), 1), rtol=1e-5, atol=1e-6)


def test_ept_rows_are_used_as_they_are_on_a_non_square_vit():
    """EPT keeps one prompt row per token position; on a 16 x 4 grid it must not resample them every pass."""
    model = mp.get_peft_model(_vit((256, 64), 16), EPTConfig(prompt_length=4)).eval()
    prompt = model.base_model.blocks[0].attn.adapters["default"]
    with torch.no_grad():
        prompt.prompt.normal_()
        model(torch.randn(1, 1, 256, 64))
        assert prompt.prompt.shape == (1 + 64, 4)
        assert torch.equal(prompt.logits(65), prompt.prompt)


# ---------------------------------------------------------------------------------------------
# item 2: timm dynamic_img_size at another resolution
# ---------------------------------------------------------------------------------------------
def test_timm_vit_built_at_224_run_at_384_dka_and_convpass_use_the_24x24_grid():
    x = torch.randn(1, 1, 384, 384)  # 577 tokens: CLS + 24 x 24
    dka_model = mp.get_peft_model(
        _timm_vit(dynamic_img_size=True),
        DKAConfig(target_modules=["blocks.0"], bottleneck=4, large_kernel=7, dropout=0.0),
    ).eval()
    a = dka_model.base_model.blocks[0].adapters["default"]
    seen = _capture(a)
    with torch.no_grad():
        dka_model(x)
        torch.testing.assert_close(seen["y"], _dka_reference(a, seen["x"], (24, 24), 1), rtol=1e-5, atol=1e-6)
    cp_model = mp.get_peft_model(
        _timm_vit(dynamic_img_size=True), ConvpassConfig(target_modules=["blocks.0"], dropout=0.0)
    )
    _randomize(cp_model)
    cp_model.eval()
    bp = cp_model.base_model.blocks[0].attn.adapters["default"]
    seen = _capture(bp)
    with torch.no_grad():
        cp_model(x)
        torch.testing.assert_close(seen["y"], _convpass_reference(bp, seen["x"], (24, 24), 1), rtol=1e-5, atol=1e-6)
        cp_model(torch.randn(1, 1, 224, 160))  # and 14 x 10 on the next pass
        torch.testing.assert_close(seen["y"], _convpass_reference(bp, seen["x"], (14, 10), 1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# item 3: configs are never mutated
# ---------------------------------------------------------------------------------------------
def test_ept_config_is_not_changed_and_can_be_reused_on_another_network():
    cfg = EPTConfig(prompt_length=4)
    before = cfg.to_dict()
    first = mp.get_peft_model(h.tiny_vit(2, img=32), cfg)
    assert cfg.to_dict() == before
    second = mp.get_peft_model(h.tiny_vit(2, img=48), cfg)
    assert second.base_model.blocks[0].attn.adapters["default"].prompt.shape == (1 + 36, 4)
    assert first.base_model.blocks[0].attn.adapters["default"].prompt.shape == (1 + 16, 4)
    assert cfg.to_dict() == before


@pytest.mark.parametrize(
    "cfg",
    [
        mp.LoraConfig(r=2),
        DKAConfig(bottleneck=4, grid=[4, 4]),
        ConvpassConfig(),
        mp.VPTConfig(prompt_length=2),
        mp.VPConfig(prompt_length=2),
        EPTConfig(prompt_length=2),
    ],
    ids=lambda c: c.method,
)
def test_no_token_method_changes_the_callers_config(cfg):
    before = copy.deepcopy(cfg.to_dict())
    mp.get_peft_model(h.tiny_vit(2), cfg)
    assert cfg.to_dict() == before


# ---------------------------------------------------------------------------------------------
# item 6: the resolved plan in adapter_config.json; old files still load
# ---------------------------------------------------------------------------------------------
def test_preset_adapter_saves_the_resolved_modules_slices_and_plan(tmp_path):
    torch.manual_seed(0)
    model = mp.get_peft_model(h.tiny_vit(2), mp.LoraConfig(r=2))
    model.save_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert saved["qkv_slices"] == "qv"
    assert saved["plan"]["modules"]["blocks.0.attn.qkv"] == {"layer": "LoraFusedQKV", "qkv_slices": "qv"}


def test_token_plan_records_grid_and_prefix(tmp_path):
    model = mp.get_peft_model(h.tiny_unetr(2), DKAConfig(bottleneck=4))
    model.save_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["grid"] == [2, 2] and saved["num_prefix_tokens"] == 0  # UNETR stores its feat_size
    tokens = saved["plan"]["modules"]["vit.blocks.0"]["tokens"]
    assert (
        tokens["grid"] == [2, 2] and tokens["num_prefix_tokens"] == 0 and tokens["patch_embed"] == "vit.patch_embedding"
    )
    ept = mp.get_peft_model(h.tiny_vit(2), EPTConfig(prompt_length=2))
    assert ept.peft_config["default"].num_prefix_tokens == 1 and ept.peft_config["default"].prompt_grid is None
    assert ept.resolved_plan()["modules"]["blocks.0.attn"]["tokens"]["num_patches"] == 16


def test_loading_rebuilds_from_the_saved_plan_even_when_the_preset_changes(tmp_path):
    from monai_peft.targeting import TargetSpec, get_preset, register_preset

    torch.manual_seed(0)
    net = h.tiny_vit(2)
    model = mp.get_peft_model(copy.deepcopy(net), mp.LoraConfig(r=2))
    h.randomize_adapter_params(model)
    model.save_adapter(tmp_path)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = h.first(model.eval()(x))
    original = get_preset(net)
    changed = copy.deepcopy(original)
    changed.roles["qkv"] = TargetSpec(modules=r"blocks\.0\.attn\.qkv")
    changed.qkv_slices = "k"
    register_preset(changed)
    try:
        loaded = mp.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path).eval()
    finally:
        register_preset(original)
    with torch.no_grad():
        torch.testing.assert_close(h.first(loaded(x)), ref, rtol=0, atol=0)


def test_an_adapter_file_written_before_the_plan_existed_still_loads(tmp_path):
    torch.manual_seed(0)
    net = h.tiny_vit(2)
    model = mp.get_peft_model(copy.deepcopy(net), mp.LoraConfig(r=2))
    h.randomize_adapter_params(model)
    model.save_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    old = json.loads(path.read_text())
    old.update(target_modules=None, qkv_slices=None)
    old.pop("plan")
    path.write_text(json.dumps(old))
    x = torch.randn(2, 1, 32, 32)
    loaded = mp.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(h.first(loaded(x)), h.first(model.eval()(x)), rtol=0, atol=0)
    assert loaded.peft_config["default"].target_modules == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]


# ---------------------------------------------------------------------------------------------
# the geometry module itself
# ---------------------------------------------------------------------------------------------
def test_token_geometry_reads_the_network_and_never_guesses():
    from monai_peft.methods.token_geometry import token_geometry

    g = token_geometry(_vit((256, 64), 16), "blocks.0")
    assert g.grid is None and g.num_patches == 64 and g.num_prefix_tokens == 1 and g.patch_size == (16, 16)
    assert g.patch_embed == "patch_embedding" and g.spatial_dims == 2 and g.fan_in == 256
    assert token_geometry(_vit((256, 64), 16), "blocks.0", input_shape=[1, 256, 64]).grid == (16, 4)
    with pytest.raises(mp.ConfigError, match="makes 64 patches"):
        token_geometry(_vit((256, 64), 16), "blocks.0", grid=[8, 4])
    assert token_geometry(h.tiny_unetr(3), "vit.blocks.0").grid == (2, 2, 2)
    assert token_geometry(h.tiny_mae(2), "blocks.0").grid == (4, 4)
    t = token_geometry(_timm_vit(img=32, patch=8, reg_tokens=2, class_token=True), "blocks.0")
    assert t.grid == (4, 4) and t.num_prefix_tokens == 3 and not t.dynamic
    d = token_geometry(_timm_vit(img=32, patch=8, dynamic_img_size=True), "blocks.0")
    assert d.grid is None and d.dynamic and d.patch_size == (8, 8)
    plain = token_geometry(nn.Sequential(nn.Linear(4, 4)), "0")
    assert plain.grid is None and plain.patch_embed is None


def test_one_rule_for_prefix_tokens():
    from monai_peft.methods.token_geometry import GridContext, TokenGrid

    ctx = GridContext()
    tokens = TokenGrid(2, (4, 4), 1, ctx)
    assert tokens.split(17) == (1, (4, 4))
    assert tokens.split(1 + 5 + 16) == (6, (4, 4))  # e.g. VPT prompts after CLS: prefix tokens too
    with pytest.raises(mp.errors.InputDataError, match="cannot hold the 4x4 patch grid plus 1 prefix"):
        tokens.split(16)
    ctx.grid = (3, 5)  # the probe saw another input: its grid wins
    assert tokens.split(16) == (1, (3, 5))
    with pytest.raises(mp.errors.InputDataError, match="unknown"):
        TokenGrid(3, None, 0, GridContext(), hint="pass grid").split(64)


def test_probe_wrappers_leave_the_network_usable_and_are_removed_on_unload():
    net = _timm_vit(img=32, patch=8, dynamic_img_size=True)
    model = mp.get_peft_model(net, ConvpassConfig(target_modules=["blocks.0"]))
    assert model.base_model.patch_embed.grid_size == (4, 4)  # attributes read through the wrapper
    plain = model.unload()
    assert type(plain.patch_embed).__name__ == "PatchEmbed"

"""Dual-Kernel Adapter: shapes (ViT / SwinUNETR / CNN, 2D and 3D), CLS bypass, kernel clamping, parameter
counts, zero-init identity, gradients, save/load, placement options and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import monai_peft as mp
import monai_peft.methods.dka as dka
from monai_peft.errors import InputDataError, MethodNotApplicableError
from monai_peft.methods.dka import DepthwiseConv, DKAConfig, DualKernelAdapter, SeparableDepthwiseConv
from monai_peft.networks.heads.tokens import map_to_tokens, split_prefix_tokens
from tests import helpers as h
from tests import test_model as engine
from tests.method_cases import Case, params


def _n(factory, *args, name):
    def make():
        return factory(*args)

    make.__name__ = name
    return make


VIT2 = _n(h.tiny_vit, 2, name="vit")
VIT3 = _n(h.tiny_vit, 3, name="vit")
SWIN2 = _n(h.tiny_swinunetr, 2, name="swinunetr")
SWIN3 = _n(h.tiny_swinunetr, 3, name="swinunetr")
RES2 = _n(h.tiny_resnet, 2, name="resnet")
RES3 = _n(h.tiny_resnet, 3, name="resnet")

# (network, input shape): 3D inputs stay small so that the whole file runs in well under a minute on CPU
NETS = [
    (VIT2, (2, 1, 32, 32)),
    (VIT3, (2, 1, 32, 32, 32)),
    (SWIN2, (1, 1, 64, 64)),
    (RES2, (2, 1, 32, 32)),
    (RES3, (2, 1, 16, 16, 16)),
]
NET_IDS = [f"{f.__name__}-{len(s) - 2}d" for f, s in NETS]

ENGINE_CASES = [
    # MONAI's ViT stores its patch count, not its grid: DKA is told the grid (or the input shape)
    Case("dka", {"zero_init": True, "grid": [4, 4]}, VIT2, (2, 1, 32, 32)),
    Case("dka", {"zero_init": True, "input_shape": [1, 32, 32, 32]}, VIT3, (2, 1, 32, 32, 32)),
    Case("dka", {"zero_init": True, "large_kernel": 15}, SWIN2, (1, 1, 64, 64)),
    Case("dka", {"zero_init": True}, RES3, (2, 1, 16, 16, 16)),
    Case("dka", {"bottleneck": 4, "large_kernel_mode": "full", "large_kernel": 7}, RES3, (2, 1, 16, 16, 16)),
]


def _adapters(model: nn.Module) -> list[DualKernelAdapter]:
    return [m for m in model.modules() if isinstance(m, DualKernelAdapter)]


# -- generic engine behaviour (the checks of tests/test_model.py, on DKA cases) --------------------------
@pytest.mark.parametrize("case", params([c for c in ENGINE_CASES if c.kwargs.get("zero_init")]))
def test_engine_zero_init_is_identity_and_only_dka_params_get_gradients(case):
    engine.test_fresh_adapter_is_identity_and_only_adapter_params_get_gradients(case)


@pytest.mark.parametrize("case", params(ENGINE_CASES))
def test_engine_save_load_round_trip_is_bit_exact(case, tmp_path):
    engine.test_save_load_round_trip_is_bit_exact(case, tmp_path)


# -- shapes, token counts, gradients -----------------------------------------------------------------
@pytest.mark.parametrize(("make", "shape"), NETS, ids=NET_IDS)
def test_shapes_token_counts_and_gradients_default_init(make, shape):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
    head = ["classification_head"] if isinstance(net, type(h.tiny_vit())) else None
    model = mp.get_peft_model(net, DKAConfig(input_shape=list(shape[1:])), modules_to_save=head)
    model.eval()
    with torch.no_grad():
        out = model(x)
    if isinstance(ref, tuple):  # ViT: (logits, hidden states (B, 1 + N, C) per block)
        assert out[0].shape == ref[0].shape
        assert [t.shape for t in out[1]] == [t.shape for t in ref[1]]
    else:
        assert out.shape == ref.shape
    # default init (reference code): W_up is not zero, the model is not the base model
    assert not torch.allclose(h.first(out), h.first(ref))
    blocks = mp.find_targets(model.base_model, mp.get_preset(model.base_model).role("block"))
    adapted = [n for n, layer in model.adapter_layers() if isinstance(layer, dka.DKALayer)]
    assert adapted == blocks and len(_adapters(model)) == len(blocks)
    model.train()
    out = model(x)
    # ViT: the loss also uses the hidden states: with CLS pooling the convolutions of the *last* block's DKA cannot
    # reach the logits (the CLS token bypasses them; see test_last_block_convs_do_not_reach_cls_logits)
    tensors = [out[0], *out[1]] if isinstance(out, tuple) else [out]
    sum(t.float().square().mean() for t in tensors).backward()
    trainable, with_grad, missing = h.grad_report(model)
    assert not missing and with_grad == trainable
    allowed = {n for n, p in model.named_parameters() if ".adapters." in n or "classification_head" in n}
    assert trainable == allowed
    for n, p in model.named_parameters():
        if p.requires_grad and ".adapters." in n:
            assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"


def test_swinunetr_3d_encoder_shapes_and_gradients():
    """3D SwinUNETR: the adapted Swin-ViT encoder on a 32^3 volume (the whole tiny network needs 64^3, whose decoder
    alone takes seconds on CPU; the decoder is untouched by DKA)."""
    torch.manual_seed(0)
    net = SWIN3().eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref = net.swinViT(x, True)
    model = mp.get_peft_model(net, DKAConfig())
    assert len(_adapters(model)) == 4 and all(a.large_kernel_mode == "separable" for a in _adapters(model))
    assert _adapters(model)[0].channel_dim == -1 and _adapters(model)[0].spatial_dims == 3
    out = model.base_model.swinViT(x, True)
    assert [t.shape for t in out] == [t.shape for t in ref]
    assert not torch.allclose(out[1], ref[1])
    sum(t.square().mean() for t in out).backward()
    trainable, with_grad, missing = h.grad_report(model)
    assert trainable and not missing and with_grad == trainable


def test_one_adapter_per_block_by_default_and_two_with_sublayers():
    net = h.tiny_vit(2, layers=3)
    model = mp.get_peft_model(net, DKAConfig(grid=[4, 4]))
    names = [n for n, layer in model.adapter_layers() if isinstance(layer, dka.DKALayer)]
    assert names == ["blocks.0", "blocks.1", "blocks.2"]
    model2 = mp.get_peft_model(h.tiny_vit(2, layers=3), DKAConfig(adapters_per_block=2, grid=[4, 4]))
    names2 = [n for n, layer in model2.adapter_layers() if isinstance(layer, dka.DKALayer)]
    assert sorted(names2) == sorted(f"blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp"))
    x = torch.randn(2, 1, 32, 32)
    assert h.first(model2(x)).shape == (2, 3)
    with pytest.raises(MethodNotApplicableError, match="no such sub-layers"):
        mp.get_peft_model(h.tiny_resnet(2), DKAConfig(adapters_per_block=2))
    with pytest.raises(MethodNotApplicableError, match="window"):
        mp.get_peft_model(h.tiny_swinunetr(2), DKAConfig(adapters_per_block=2))


def test_zero_init_variant_is_identity_and_default_is_not():
    torch.manual_seed(0)
    net = h.tiny_vit(2).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = h.first(net(x))
        zero = mp.get_peft_model(copy.deepcopy(net), DKAConfig(zero_init=True, grid=[4, 4])).eval()
        torch.testing.assert_close(h.first(zero(x)), ref, rtol=0, atol=0)
        assert all(a.up.weight.abs().sum() == 0 for a in _adapters(zero))
        default = mp.get_peft_model(copy.deepcopy(net), DKAConfig(grid=[4, 4])).eval()
        assert all(a.up.weight.abs().sum() > 0 for a in _adapters(default))
        assert not torch.allclose(h.first(default(x)), ref)


# -- the module itself -------------------------------------------------------------------------------
def _reference_branch(a: DualKernelAdapter, x: torch.Tensor, grid, n_prefix: int) -> torch.Tensor:
    """The equation of METHODS.md 1.2 written out with the token helpers and F.conv2d (eval mode)."""
    z = F.gelu(x @ a.down.weight.t())
    prefix, zmap = split_prefix_tokens(z, grid, n_prefix)
    wl, ws = a.large.weight, a.small.weight
    pad_l, pad_s = tuple(k // 2 for k in wl.shape[2:]), tuple(k // 2 for k in ws.shape[2:])
    conv = F.conv2d(zmap, wl, padding=pad_l, groups=zmap.shape[1])
    conv = conv + F.conv2d(zmap, ws, padding=pad_s, groups=zmap.shape[1])
    z = map_to_tokens(conv, prefix if n_prefix else None)
    return F.gelu(z) @ a.up.weight.t()


def test_token_branch_matches_the_equation_and_cls_bypasses_the_convolutions():
    torch.manual_seed(0)
    c, m, grid = 24, 6, (5, 7)
    a = DualKernelAdapter(
        c,
        m,
        spatial_dims=2,
        large_kernel=(9, 13),
        small_kernel=(5, 5),
        grid=grid,
        num_prefix_tokens=1,
        backend="direct",
    ).eval()
    x = torch.randn(3, 1 + 35, c)
    y = a(x)
    torch.testing.assert_close(y, _reference_branch(a, x, grid, 1), rtol=1e-5, atol=1e-6)
    # CLS path: GELU(GELU(x_cls W_down)) W_up, no convolution
    cls = F.gelu(F.gelu(x[:, :1] @ a.down.weight.t())) @ a.up.weight.t()
    torch.testing.assert_close(y[:, :1], cls, rtol=1e-6, atol=1e-7)
    x2 = x.clone()
    x2[:, 1:] = torch.randn_like(x2[:, 1:])
    y2 = a(x2)
    assert torch.equal(y2[:, 0], y[:, 0])  # changing patch tokens never reaches the CLS output
    assert not torch.allclose(y2[:, 1:], y[:, 1:])
    # and a patch token does see its neighbours (the convolutions mix the grid)
    x3 = x.clone()
    x3[:, 1 + 3 * 7 + 4] += 1.0  # token (3, 4)
    changed = (a(x3) - y).abs().amax(dim=(0, 2)) > 0
    assert changed[0].item() is False and changed[1:].sum() > 1


def test_last_block_convs_do_not_reach_cls_logits():
    """A documented consequence of the reference design: the CLS token bypasses the convolutions, so in a
    CLS-pooled ViT the last block's depthwise kernels get no gradient from a classification loss."""
    torch.manual_seed(0)
    model = mp.get_peft_model(h.tiny_vit(2), DKAConfig(grid=[4, 4]), modules_to_save=["classification_head"]).train()
    h.first(model(torch.randn(2, 1, 32, 32))).square().mean().backward()
    last, first = _adapters(model)[-1], _adapters(model)[0]
    assert last.large.weight.grad.abs().sum() == 0 and last.small.weight.grad.abs().sum() == 0
    assert last.down.weight.grad.abs().sum() > 0 and first.large.weight.grad.abs().sum() > 0


def test_cls_bypass_inside_a_vit_block():
    torch.manual_seed(0)
    model = mp.get_peft_model(h.tiny_vit(2), DKAConfig(grid=[4, 4])).eval()
    layer = model.base_model.blocks[0]
    a = layer.adapters["default"]
    tokens = torch.randn(2, 17, 48)
    out = a(tokens)
    tokens2 = tokens.clone()
    tokens2[:, 1:] *= -3.0
    assert torch.equal(a(tokens2)[:, 0], out[:, 0])


def test_channel_first_and_channel_last_maps_are_the_same_computation():
    torch.manual_seed(0)
    for d, shape in ((2, (2, 8, 9, 11)), (3, (2, 8, 5, 6, 7))):
        kw = {"spatial_dims": d, "large_kernel": (7,) * d, "small_kernel": (3,) * d, "backend": "direct"}
        torch.manual_seed(1)
        first = DualKernelAdapter(8, 4, channel_dim=1, **kw).eval()
        torch.manual_seed(1)
        last = DualKernelAdapter(8, 4, channel_dim=-1, **kw).eval()
        x = torch.randn(shape)
        torch.testing.assert_close(first(x), last(x.movedim(1, -1)).movedim(-1, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("d", [2, 3])
def test_runtime_crop_and_fft_backend_are_exact(d):
    torch.manual_seed(0)
    n = 6
    x = torch.randn(2, 4, *(n,) * d)
    big = DepthwiseConv(4, (2 * n + 7,) * d, backend="direct")
    k = 2 * n - 1
    small = DepthwiseConv(4, (k,) * d, backend="direct")
    off = (big.kernel_size[0] - k) // 2
    with torch.no_grad():
        small.weight.copy_(big.weight[(..., *(slice(off, off + k),) * d)])
    full = F.conv2d if d == 2 else F.conv3d
    expected = full(x, big.weight, padding=big.kernel_size[0] // 2, groups=4)  # literal, uncropped
    torch.testing.assert_close(big(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(small(x), expected, rtol=1e-5, atol=1e-5)
    fft = DepthwiseConv(4, big.kernel_size, backend="fft")
    with torch.no_grad():
        fft.weight.copy_(big.weight)
    torch.testing.assert_close(fft(x), expected, rtol=1e-4, atol=1e-4)
    # separable = literal conv with the outer-product kernel, whose taps have the literal kernel's init variance
    sep = SeparableDepthwiseConv(4, (5,) * d, backend="direct")
    b = 3.0 ** (0.5 - 0.5 / d) * 5 ** (-0.5)
    assert all(conv.weight.abs().max() <= b for conv in sep.axes)
    ws = [conv.weight.reshape(4, -1) for conv in sep.axes]
    kernel = ws[0][:, :, None] * ws[1][:, None, :]
    if d == 3:
        kernel = kernel[..., None] * ws[2][:, None, None, :]
    torch.testing.assert_close(sep(x), full(x, kernel[:, None], padding=2, groups=4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [2, 3])
def test_dilated_kernel_matches_the_zero_stuffed_literal_kernel(d):
    torch.manual_seed(0)
    assert dka.dilated_kernel((15, 15, 15)) == ((5, 5, 5), (4, 4, 4))
    assert dka.dilated_kernel((3, 1)) == ((3, 1), (1, 1))
    x = torch.randn(2, 3, *(7,) * d)
    direct = DepthwiseConv(3, (5,) * d, dilation=(3,) * d, backend="direct")
    fft = DepthwiseConv(3, (5,) * d, dilation=(3,) * d, backend="fft")
    with torch.no_grad():
        fft.weight.copy_(direct.weight)
    spread = torch.zeros(3, 1, *(13,) * d)
    spread[(..., *(slice(None, None, 3),) * d)] = direct.weight
    conv = F.conv2d if d == 2 else F.conv3d
    expected = conv(x, spread, padding=6, groups=3)  # literal, uncropped (taps at +-6 / +-3, 0)
    torch.testing.assert_close(direct(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fft(x), expected, rtol=1e-4, atol=1e-4)
    model = mp.get_peft_model(h.tiny_vit(3, img=64), DKAConfig(large_kernel_mode="dilated", grid=[8, 8, 8]))  # span 15
    a = _adapters(model)[0]
    assert a.large.kernel_size == (5, 5, 5) and a.large.dilation == (4, 4, 4)
    assert sum(p.numel() for p in a.parameters()) == dka.dka_parameter_count(48, 16, (15,) * 3, (5,) * 3, "dilated")
    assert h.first(model(torch.randn(1, 1, 64, 64, 64))).shape == (1, 3)


# -- kernel clamping and parameter counts --------------------------------------------------------------
def test_separable_kernel_taps_have_the_literal_kernels_init_variance():
    torch.manual_seed(0)
    sep = SeparableDepthwiseConv(64, (15, 15, 15), init_kernel_size=(51, 51, 51))
    w = [conv.weight.reshape(64, -1) for conv in sep.axes]
    composed = w[0][:, :, None, None] * w[1][:, None, :, None] * w[2][:, None, None, :]
    literal_var = 1.0 / (3 * 51**3)  # uniform(-1/sqrt(51^3), 1/sqrt(51^3)): PyTorch's init of the literal kernel
    assert abs(composed.var().item() / literal_var - 1) < 0.1


def test_kernels_are_clamped_to_the_token_grid_and_initialised_as_the_crop():
    assert dka.clamp_kernel((51, 51), (14, 14)) == (27, 27)
    assert dka.clamp_kernel((51, 51, 51), (6, 6, 6)) == (11, 11, 11)
    assert dka.clamp_kernel((5, 5), (2, 9)) == (3, 5)
    assert dka.clamp_kernel((51,), None) == (51,)
    torch.manual_seed(0)
    model = mp.get_peft_model(h.tiny_vit(2, img=64, patch=8), DKAConfig(input_shape=[1, 64, 64]))  # 8 x 8 grid
    a = _adapters(model)[0]
    assert a.large.kernel_size == (15, 15) and a.small.kernel_size == (5, 5)
    assert a.grid == (8, 8) and a.num_prefix_tokens == 1
    assert a.large.weight.abs().max() <= 1 / 51 + 1e-7  # fan-in of the configured 51 x 51 kernel
    unclamped = mp.get_peft_model(h.tiny_vit(2, img=64, patch=8), DKAConfig(clamp_kernels=False))
    assert _adapters(unclamped)[0].large.kernel_size == (51, 51)
    # CNN maps: kernels sized from one probe forward when input_shape is given
    res = mp.get_peft_model(h.tiny_resnet(2), DKAConfig(input_shape=[1, 32, 32]))
    sizes = [a.large.kernel_size for a in _adapters(res)]
    assert sizes == [(31, 31), (15, 15), (7, 7), (3, 3)]  # maps 16, 8, 4, 2 after the stem and strides
    assert [a.small.kernel_size for a in _adapters(res)] == [(5, 5)] * 3 + [(3, 3)]


def test_parameter_count_formula_2d_is_exact():
    torch.manual_seed(0)
    c, m = 48, 16
    model = mp.get_peft_model(h.tiny_vit(2, img=64, patch=8, layers=2), DKAConfig(bottleneck=m, grid=[8, 8]))
    per_block = m * (2 * c + 15**2 + 5**2)  # m (2C + k_l^2 + k_s^2), clamped k_l = 2 * 8 - 1
    for a in _adapters(model):
        assert sum(p.numel() for p in a.parameters()) == per_block
    assert model.trainable_parameters()[0] == 2 * per_block
    assert not any(n.endswith("bias") for n, p in model.named_parameters() if p.requires_grad)
    # ViT-B/16 figures of METHODS.md: 4162 m per block with the literal 51 x 51 kernel; 27 x 27 once clamped to 14 x 14
    a = DualKernelAdapter(768, 10, spatial_dims=2, large_kernel=(51, 51), small_kernel=(5, 5))
    assert sum(p.numel() for p in a.parameters()) == 41_620 == dka.dka_parameter_count(768, 10, (51, 51), (5, 5))
    assert dka.dka_parameter_count(768, 10, dka.clamp_kernel((51, 51), (14, 14)), (5, 5)) == 10 * (1536 + 729 + 25)


def test_parameter_count_3d_separable_and_full():
    torch.manual_seed(0)
    c, m = 48, 16
    sep = mp.get_peft_model(
        h.tiny_vit(3), DKAConfig(bottleneck=m, large_kernel_mode="separable", grid=[4, 4, 4])
    )  # k_l = 7
    for a in _adapters(sep):
        assert a.large_kernel_mode == "separable"
        assert sum(p.numel() for p in a.parameters()) == m * (2 * c + 3 * 7 + 5**3)
    # auto: the clamped 7^3 cube (343 taps) fits the 2D budget 51^2, so the literal cube is used
    auto = mp.get_peft_model(h.tiny_vit(3), DKAConfig(bottleneck=m, grid=[4, 4, 4]))
    for a in _adapters(auto):
        assert a.large_kernel_mode == "full"
        assert sum(p.numel() for p in a.parameters()) == m * (2 * c + 7**3 + 5**3)
    literal = dka.dka_parameter_count(768, 16, (51,) * 3, (5,) * 3, "full")
    separable = dka.dka_parameter_count(768, 16, (51,) * 3, (5,) * 3, "separable")
    assert literal - separable == 16 * (51**3 - 3 * 51)


def test_describe_targets_reports_kernels_and_counts():
    net = h.tiny_resnet(2)
    rows = dka.DKATuner(DKAConfig(input_shape=[1, 32, 32])).describe_targets(net)
    model = mp.get_peft_model(net, DKAConfig(input_shape=[1, 32, 32]))
    assert [r["name"] for r in rows] == [n for n, _ in model.adapter_layers()]
    assert sum(r["parameters"] for r in rows) == model.trainable_parameters()[0]


# -- grids, prefixes and errors ----------------------------------------------------------------------
def test_non_square_vit_needs_an_explicit_grid():
    def vit():
        torch.manual_seed(0)
        return _rect_vit()

    with pytest.raises(MethodNotApplicableError, match=r"grid") as info:
        mp.get_peft_model(vit(), DKAConfig())
    assert "24 patches" in str(info.value) and "Methods that apply" in str(info.value)
    with pytest.raises(MethodNotApplicableError, match="does not fit"):
        mp.get_peft_model(vit(), DKAConfig(grid=[4, 4]))  # 16 patches: not this network's 24
    model = mp.get_peft_model(vit(), DKAConfig(grid=[4, 6]))
    assert _adapters(model)[0].grid == (4, 6)
    assert _adapters(mp.get_peft_model(vit(), DKAConfig(input_shape=[1, 32, 48])))[0].grid == (4, 6)
    out = model(torch.randn(2, 1, 32, 48))
    assert out[0].shape == (2, 3)


def test_grid_from_the_network_spec_non_square_monai_vit_backbone():
    from monai_peft.networks.vit import MonaiViTBackbone, ViTSpec

    torch.manual_seed(0)
    spec = ViTSpec(
        img_size=(32, 48), patch_size=8, in_channels=1, embed_dim=48, depth=1, num_heads=4, mlp_dim=96, num_classes=2
    )
    model = mp.get_peft_model(MonaiViTBackbone(spec), DKAConfig(target_modules=r"vit\.blocks\.\d+"))
    a = _adapters(model)[0]
    assert a.grid == (4, 6) and a.num_prefix_tokens == 1 and a.large.kernel_size == (7, 11)
    assert model(torch.randn(2, 1, 32, 48)).shape == (2, 2)


class _TinyViTLikeBlock(nn.Module):
    """Tokens (B, H*W, C) in and out with a stored grid; its last registered layer is a convolution (TinyViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.input_resolution = (4, 6)
        self.attn = nn.Linear(8, 8)
        self.local_conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(x)
        b, n, c = x.shape
        y = self.local_conv(x.transpose(1, 2).reshape(b, c, 4, 6))
        return y.flatten(2).transpose(1, 2)


def test_token_blocks_with_a_stored_resolution_are_token_adapters():
    net = nn.Sequential(_TinyViTLikeBlock())
    model = mp.get_peft_model(net, DKAConfig(target_modules=["0"], bottleneck=4))
    a = _adapters(model)[0]
    assert a.channel_dim == -1 and a.grid == (4, 6) and a.num_prefix_tokens == 0 and a.large.kernel_size == (7, 11)
    assert model(torch.randn(2, 24, 8)).shape == (2, 24, 8)


def _rect_vit():
    from monai.networks.nets import ViT

    return ViT(
        in_channels=1,
        img_size=(32, 48),
        patch_size=8,
        spatial_dims=2,
        hidden_size=48,
        mlp_dim=96,
        num_layers=1,
        num_heads=4,
        classification=True,
        num_classes=3,
        post_activation=None,
    )


class _TokenNet(nn.Module):
    """A plain transformer-like module: no patch embedding, so nothing tells the grid."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_a_square_token_count_is_never_taken_as_a_square_grid():
    """Without a patch embedding or a grid, DKA says what to pass instead of guessing from the count."""
    with pytest.raises(MethodNotApplicableError, match="spatial_dims and grid"):
        mp.get_peft_model(_TokenNet(), DKAConfig(target_modules=["blocks.1"], bottleneck=4))
    with pytest.raises(MethodNotApplicableError, match=r"grid=\[image size // patch size"):
        mp.get_peft_model(_TokenNet(), DKAConfig(target_modules=["blocks.1"], bottleneck=4, spatial_dims=2))
    torch.manual_seed(0)
    model = mp.get_peft_model(_TokenNet(), DKAConfig(target_modules=["blocks.1"], bottleneck=4, grid=[7, 7]))
    assert model(torch.randn(2, 50, 16)).shape == (2, 50, 16)  # 1 prefix + 7 x 7
    assert model(torch.randn(2, 49, 16)).shape == (2, 49, 16)  # no prefix
    with pytest.raises(InputDataError, match="cannot hold the 7x7 patch grid"):
        model(torch.randn(2, 36, 16))
    loose = mp.get_peft_model(
        _TokenNet(), DKAConfig(target_modules=["blocks.1"], bottleneck=4, spatial_dims=2, clamp_kernels=False)
    )
    with pytest.raises(InputDataError, match="unknown"):
        loose(torch.randn(2, 36, 16))
    # extra tokens beyond a known grid (e.g. prompts) are treated as prefix tokens
    a = DualKernelAdapter(
        16, 4, spatial_dims=2, large_kernel=(7, 7), small_kernel=(3, 3), grid=(4, 4), num_prefix_tokens=1
    )
    assert a.token_grid(1 + 5 + 16) == (6, (4, 4))
    with pytest.raises(InputDataError, match="cannot hold"):
        a.token_grid(16)


def test_modules_dka_cannot_handle_fail_at_get_peft_model():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with pytest.raises(MethodNotApplicableError, match="ReLU"):
        mp.get_peft_model(net, DKAConfig(target_modules=["1"]))
    with pytest.raises(mp.ConfigError, match="odd"):
        DKAConfig(large_kernel=50)
    with pytest.raises(mp.ConfigError, match="adapters_per_block"):
        DKAConfig(adapters_per_block=3)
    # a token adapter on a module whose output is not a sequence fails at the first forward, clearly
    model = mp.get_peft_model(_TokenNet(), DKAConfig(target_modules=["blocks.1"], bottleneck=4, grid=[4, 4]))
    with pytest.raises(InputDataError, match="DKA expects"):
        model(torch.randn(2, 16))


def test_config_round_trip_and_registry():
    cfg = mp.get_config("dka", bottleneck=10, grid=(4, 6), input_shape=(1, 32, 48))
    assert isinstance(cfg, DKAConfig) and cfg.grid == [4, 6] and cfg.input_shape == [1, 32, 48]
    again = mp.PeftConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert "dka" in mp.list_methods()
    assert DKAConfig().bottleneck == 16 and DKAConfig().large_kernel == 51 and DKAConfig().small_kernel == 5
    assert DKAConfig().mode_for(2) == "full" and DKAConfig().mode_for(3) == "separable"
    assert DKAConfig().mode_for(3, (11, 11, 11)) == "full" and DKAConfig().mode_for(3, (15, 15, 15)) == "separable"
    assert DKAConfig(large_kernel_mode="full").mode_for(3) == "full"
    assert math.isclose(DKAConfig().dropout, 0.1)


def test_timm_swin_blocks_get_channel_last_adapters_that_convolve_across_windows():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=2,
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        img_size=64,
        window_size=4,
        in_chans=1,
    ).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = net(x)
    cfg = DKAConfig(target_modules=[r"re:layers\.\d+\.blocks\.\d+"], zero_init=True, input_shape=[1, 64, 64])
    model = mp.get_peft_model(net, cfg).eval()
    layers = dict(model.adapter_layers())
    assert sorted(layers) == [f"layers.{i}.blocks.0" for i in range(4)]
    first_adapter = layers["layers.0.blocks.0"].adapters["default"]
    assert first_adapter.channel_dim == -1 and first_adapter.large.kernel_size == (31, 31)  # 16 x 16 map: 2n - 1
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        h.randomize_adapter_params(model)
        assert not torch.allclose(model(x), ref)


# -- BatchNorm after the kernels (the reference DKA for ConvNeXt) and the paper presets' kernels -----------
def test_batch_norm_variant_counts_is_identity_when_zero_init_and_trains_its_statistics(tmp_path):
    torch.manual_seed(0)
    net = h.tiny_resnet(2).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = net(x)
    cfg = DKAConfig(
        large_kernel=11, small_kernel=5, batch_norm=True, zero_init=True, input_shape=[1, 32, 32], bottleneck=4
    )
    model = mp.get_peft_model(copy.deepcopy(net), cfg, modules_to_save=["fc"])
    adapters = _adapters(model)
    assert all(isinstance(a.bn, nn.BatchNorm2d) and a.bn.num_features == 4 for a in adapters)
    for a, row in zip(adapters, dka.DKATuner(cfg).describe_targets(copy.deepcopy(net))):
        large, small = a.large.kernel_size, a.small.kernel_size
        expected = dka.dka_parameter_count(a.in_channels, 4, large, small, "full", batch_norm=True)
        assert sum(p.numel() for p in a.parameters()) == expected == row["parameters"]
        assert expected == 4 * (2 * a.in_channels + math.prod(large) + math.prod(small) + 2)
    assert [a.large.kernel_size for a in adapters] == [(11, 11), (11, 11), (7, 7), (3, 3)]  # maps 16, 8, 4, 2
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref, rtol=0, atol=0)  # W_up = 0: exact identity
    # the adapter's own BatchNorm keeps learning its statistics, also when the base's are frozen
    frozen = mp.get_peft_model(copy.deepcopy(net), cfg.replace(batchnorm_stats="freeze"))
    frozen.train()
    frozen(x)
    base_bn = frozen.base_model.bn1
    assert not base_bn.training and torch.equal(base_bn.running_mean, net.bn1.running_mean)
    assert all(a.bn.training and int(a.bn.num_batches_tracked) == 1 for a in _adapters(frozen))
    h.randomize_adapter_params(model)
    model.save_adapter(tmp_path)
    loaded = mp.PeftModel.from_pretrained(copy.deepcopy(net), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=1e-6, atol=1e-6)  # float rounding of the head


def test_batch_norm_on_a_token_grid_normalises_the_patch_map_only():
    torch.manual_seed(0)
    a = DualKernelAdapter(
        16,
        4,
        spatial_dims=2,
        large_kernel=(7, 7),
        small_kernel=(3, 3),
        grid=(4, 4),
        num_prefix_tokens=1,
        batch_norm=True,
        dropout=0.0,
        backend="direct",
    ).train()
    x = torch.randn(3, 17, 16)
    y = a(x)
    z = F.gelu(x @ a.down.weight.t())
    zmap = z[:, 1:].reshape(3, 4, 4, 4).movedim(-1, 1)
    mixed = sum(F.conv2d(zmap, w, padding=w.shape[-1] // 2, groups=4) for w in (a.large.weight, a.small.weight))
    mixed = F.batch_norm(mixed, None, None, a.bn.weight, a.bn.bias, training=True, eps=a.bn.eps)
    expected = F.gelu(torch.cat([z[:, :1], mixed.flatten(2).transpose(1, 2)], 1)) @ a.up.weight.t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_dka_swin_kernel_31_on_swinunetr_is_clamped_per_stage():
    torch.manual_seed(0)
    cfg = DKAConfig(large_kernel=31, small_kernel=5, input_shape=[1, 64, 64], bottleneck=4, zero_init=True)
    model = mp.get_peft_model(h.tiny_swinunetr(2), cfg)
    adapters = _adapters(model)
    assert [a.large.kernel_size for a in adapters] == [(31, 31), (31, 31), (15, 15), (7, 7)]  # maps 32, 16, 8, 4
    assert model.trainable_parameters()[0] == sum(
        dka.dka_parameter_count(a.in_channels, 4, a.large.kernel_size, a.small.kernel_size) for a in adapters
    )

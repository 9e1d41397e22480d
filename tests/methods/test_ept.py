"""EPT: the embedded softmax against hand computations (Pure_Cat, Multi_Cat, patch-wise scaling
c_i in (0, 1)), MONAI SABlock variants (fused / separate qkv, flash, dropout, save_attn) and timm
Attention, prompt rows following the runtime token count (224 <-> 384 px, saved adapters loaded
onto another input size), engine behaviour, errors and training."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ViT
from torch import nn

import monai_peft as mp
from monai_peft.methods.ept import (
    EPTAttentionLayer,
    EPTConfig,
    EPTPrompt,
    GridProbeLayer,
    ept_attention,
    resample_prompt_rows,
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


def vit(spatial_dims: int = 2, img: int = 32, **kw) -> ViT:
    return tiny_vit(spatial_dims, img=img, **kw)


def timm_vit(img: int = 32, patch: int = 8, **kw) -> nn.Module:
    args = dict(
        img_size=img, patch_size=patch, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2, num_classes=3, in_chans=1
    )
    return timm.create_model("vit_base_patch16_224", pretrained=False, **{**args, **kw})


def prompts_of(model: nn.Module) -> list[EPTPrompt]:
    return [m for m in model.modules() if isinstance(m, EPTPrompt)]


def set_prompts(model: nn.Module, std: float = 1.0, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prompts_of(model):
            p.prompt.copy_(torch.randn(p.prompt.shape, generator=g) * std)


def logits_of_first_block(net: ViT, x: torch.Tensor) -> torch.Tensor:
    """S = Q K^T / sqrt(d_h) of block 0, by hand from the block's weights."""
    blk = net.blocks[0]
    h = net.patch_embedding(x)
    if hasattr(net, "cls_token"):
        h = torch.cat([net.cls_token.expand(x.shape[0], -1, -1), h], dim=1)
    b, n, c = h.shape
    qkv = (
        blk.attn.qkv(blk.norm1(h)).reshape(b, n, 3, blk.attn.num_heads, c // blk.attn.num_heads).permute(2, 0, 3, 1, 4)
    )
    return qkv[0] @ qkv[1].transpose(-1, -2) * blk.attn.scale


# ---------------------------------------------------------------------------------------------
# the equation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("embedding", ["pure_cat", "multi_cat"])
@pytest.mark.parametrize("std", [0.02, 1.0, 5.0])
def test_attention_rows_are_scaled_by_c_i_exactly_as_the_hand_computation(embedding, std):
    torch.manual_seed(0)
    base = vit(save_attn=True).eval()
    model = mp.get_peft_model(copy.deepcopy(base), EPTConfig(prompt_length=6, deep=False, embedding=embedding)).eval()
    set_prompts(model, std=std)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        base(x)
        model(x)
        a0 = base.blocks[0].attn.att_mat  # base attention (captured by MONAI's save_attn)
        a = model.base_model.blocks[0].attn.att_mat  # EPT attention, prompt columns dropped
        s = logits_of_first_block(base, x)
        p = model.base_model.blocks[0].attn.adapters["default"].prompt  # (N', L)
        pe = (
            (s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)) * p
            if embedding == "multi_cat"
            else p.expand(2, 4, -1, -1)
        )
        literal = torch.cat([pe, s], dim=-1).softmax(-1)[..., 6:]  # S' = [P_E | S]; A = softmax(S')[..., L:]
        c = s.exp().sum(-1) / (s.exp().sum(-1) + pe.exp().sum(-1))  # paper Eq. 9-10
    assert a.shape == a0.shape == (2, 4, 17, 17)
    torch.testing.assert_close(a0, s.softmax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, literal, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, a0 * c[..., None], rtol=1e-5, atol=1e-6)
    ratio = a / a0
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-6)  # one factor per row
    assert (c > 0).all() and (c < 1).all()
    torch.testing.assert_close(a.sum(-1), c, rtol=1e-5, atol=1e-6)
    # block 1 is untouched (shallow): the change only comes through its input
    assert isinstance(model.base_model.blocks[0].attn, EPTAttentionLayer)
    assert not isinstance(model.base_model.blocks[1].attn, EPTAttentionLayer)


def test_ept_attention_function_and_minus_infinity_prompt_is_the_identity():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 5, 5)
    p = torch.randn(5, 4)
    torch.testing.assert_close(ept_attention(s, p), torch.cat([p.expand(2, 3, 5, 4), s], -1).softmax(-1)[..., 4:])
    torch.testing.assert_close(ept_attention(s, torch.full((5, 4), float("-inf"))), s.softmax(-1), rtol=0, atol=0)
    # masked keys (-inf) are ignored by the Multi_Cat range and stay masked
    s[..., -1] = float("-inf")
    out = ept_attention(s, p, "multi_cat")
    assert (out[..., -1] == 0).all()
    fin = s[..., :-1]
    alpha = fin.amax(-1, keepdim=True) - fin.amin(-1, keepdim=True)
    torch.testing.assert_close(out[..., :-1], torch.cat([alpha * p, fin], -1).softmax(-1)[..., 4:])
    # the whole network: prompt logits at -inf give exactly the base model
    base = vit().eval()
    model = mp.get_peft_model(copy.deepcopy(base), EPTConfig(prompt_length=3)).eval()
    with torch.no_grad():
        for pr in prompts_of(model):
            pr.prompt.fill_(float("-inf"))
        x = torch.randn(2, 1, 32, 32)
        torch.testing.assert_close(model(x)[0], base(x)[0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# attention implementations
# ---------------------------------------------------------------------------------------------
class Tokens(nn.Module):
    """A token network built from MONAI TransformerBlocks with chosen SABlock options."""

    def __init__(self, **block_kw):
        super().__init__()
        self.blocks = nn.ModuleList([TransformerBlock(16, 32, 2, qkv_bias=True, **block_kw) for _ in range(2)])

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


def copy_combined_into_separate(src: Tokens, dst: Tokens) -> None:
    with torch.no_grad():
        for a, b in zip(src.blocks, dst.blocks):
            for name, p in a.named_parameters():
                if ".qkv." not in name and name in dict(b.named_parameters()):
                    dict(b.named_parameters())[name].copy_(p)
            w, bias = a.attn.qkv.weight.chunk(3), a.attn.qkv.bias.chunk(3)
            for lin, wi, bi in zip((b.attn.to_q, b.attn.to_k, b.attn.to_v), w, bias):
                lin.weight.copy_(wi)
                lin.bias.copy_(bi)


def test_monai_sablock_fused_separate_flash_and_explicit_paths_agree():
    torch.manual_seed(0)
    ref_net = Tokens().eval()
    nets = {"fused": ref_net}
    for name, kw in {
        "separate": {"use_combined_linear": False},
        "flash": {"use_flash_attention": True},
        "separate-flash": {"use_combined_linear": False, "use_flash_attention": True},
    }.items():
        net = Tokens(**kw).eval()
        if kw.get("use_combined_linear") is False:
            copy_combined_into_separate(ref_net, net)
        else:
            net.load_state_dict(ref_net.state_dict())
        nets[name] = net
    x = torch.randn(2, 10, 16)
    outs = {}
    for name, net in nets.items():
        for impl in ("auto", "explicit", "sdpa"):
            cfg = EPTConfig(prompt_length=4, num_prefix_tokens=1, prompt_grid=[3, 3], attention_impl=impl)
            model = mp.get_peft_model(copy.deepcopy(net), cfg).eval()
            set_prompts(model)
            with torch.no_grad():
                outs[(name, impl)] = model(x)
                with model.disable_adapter():
                    base = model(x)
            assert not torch.allclose(outs[(name, impl)], base)
    ref = outs[("fused", "explicit")]
    for key, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=str(key))
    with pytest.raises(mp.ConfigError, match="multi_cat"):
        EPTConfig(embedding="multi_cat", attention_impl="sdpa")


def test_monai_attention_dropout_and_key_mask_and_save_attn():
    torch.manual_seed(0)
    net = Tokens(dropout_rate=0.3)
    model = mp.get_peft_model(net, EPTConfig(prompt_length=4, num_prefix_tokens=1, prompt_grid=[3, 3]))
    x = torch.randn(2, 10, 16)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # dropout active in training
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    # a MONAI key mask (B, N): masked keys get zero attention, also with the prompt
    torch.manual_seed(0)
    net = TransformerBlock(16, 32, 2, qkv_bias=True, save_attn=True)

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([net])

        def forward(self, x, attn_mask=None):
            return self.blocks[0](x, attn_mask=attn_mask)

    model = mp.get_peft_model(One(), EPTConfig(prompt_length=4, num_prefix_tokens=1, prompt_grid=[9])).eval()
    set_prompts(model)
    mask = torch.ones(2, 10)
    mask[:, 3] = 0
    with torch.no_grad():
        model(x, attn_mask=mask)
    att = model.base_model.blocks[0].attn.att_mat
    assert att.shape == (2, 2, 10, 10) and (att[..., 3] == 0).all() and (att.sum(-1) < 1).all()


@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_matches_hand_computation(fused):
    torch.manual_seed(0)
    base = timm_vit().eval()
    for blk in base.blocks:
        blk.attn.fused_attn = fused
    model = mp.get_peft_model(copy.deepcopy(base), EPTConfig(prompt_length=5, deep=False)).eval()
    set_prompts(model)
    x = torch.randn(2, 1, 32, 32)
    p = model.base_model.blocks[0].attn.adapters["default"].prompt
    with torch.no_grad():
        h = base.norm_pre(base._pos_embed(base.patch_embed(x)))
        blk = base.blocks[0]
        attn = blk.attn
        b, n, c = h.shape
        qkv = attn.qkv(blk.norm1(h)).reshape(b, n, 3, 4, 12).permute(2, 0, 3, 1, 4)
        s = (qkv[0] * attn.scale) @ qkv[1].transpose(-1, -2)
        a = torch.cat([p.expand(b, 4, -1, -1), s], -1).softmax(-1)[..., 5:]
        y = attn.proj((a @ qkv[2]).transpose(1, 2).reshape(b, n, c))
        h = h + blk.ls1(y)
        h = h + blk.ls2(blk.mlp(blk.norm2(h)))
        h = base.blocks[1](h)
        ref = base.forward_head(base.norm(h))
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# prompt rows follow the runtime token count
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,run", [(224, 384), (384, 224)])
def test_timm_dynamic_img_size_prompt_built_at_one_size_runs_at_another(build, run):
    torch.manual_seed(0)
    base = timm_vit(img=build, patch=16, embed_dim=32, num_heads=2, in_chans=3, dynamic_img_size=True).eval()
    model = mp.get_peft_model(copy.deepcopy(base), EPTConfig(prompt_length=7)).eval()
    assert isinstance(model.base_model.patch_embed, GridProbeLayer)
    set_prompts(model)
    g, r = build // 16, run // 16
    assert all(p.prompt.shape == (1 + g * g, 7) for p in prompts_of(model))
    # reference: the same network with prompts built at the runtime size, rows resampled by hand
    ref = mp.get_peft_model(copy.deepcopy(base), EPTConfig(prompt_length=7, prompt_grid=[r, r])).eval()
    with torch.no_grad():
        for src, dst in zip(prompts_of(model), prompts_of(ref)):
            rows = F.interpolate(
                src.prompt[1:].t().reshape(1, 7, g, g), size=(r, r), mode="bilinear", align_corners=False
            )
            dst.prompt.copy_(torch.cat([src.prompt[:1], rows.reshape(7, -1).t()]))
        x = torch.randn(1, 3, run, run)
        y = model(x)
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)
        with model.disable_adapter():
            assert not torch.allclose(model(x), y)
        assert model(torch.randn(1, 3, build, build)).shape == (1, 3)  # and still at the build size
        # non-square input: the probe reads the grid from the input (an isotropic guess would be wrong)
        assert model(torch.randn(1, 3, run, build)).shape == (1, 3)


def test_monai_adapter_saved_at_one_size_loads_onto_another(tmp_path):
    torch.manual_seed(0)
    small = vit(img=32)  # 4 x 4 patches
    model = mp.get_peft_model(small, EPTConfig(prompt_length=5, prompt_grid=[4, 4]))  # MONAI's ViT stores no grid
    set_prompts(model)
    model.save_adapter(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["prompt_grid"] == [4, 4] and cfg["num_prefix_tokens"] == 1  # recorded at creation
    big = vit(img=48)  # 6 x 6 patches: other position embeddings, so the base check must be relaxed
    with pytest.raises(mp.BaseModelMismatchError):
        mp.PeftModel.from_pretrained(copy.deepcopy(big), tmp_path)
    loaded = mp.PeftModel.from_pretrained(copy.deepcopy(big), tmp_path, verify_base="off").eval()
    assert all(p.prompt.shape == (17, 5) for p in prompts_of(loaded))
    ref = mp.get_peft_model(copy.deepcopy(big), EPTConfig(prompt_length=5)).eval()
    with torch.no_grad():
        for src, dst in zip(prompts_of(loaded), prompts_of(ref)):
            dst.prompt.copy_(torch.cat([src.prompt[:1], resample_prompt_rows(src.prompt[1:], (4, 4), (6, 6))]))
        x = torch.randn(2, 1, 48, 48)
        torch.testing.assert_close(loaded(x)[0], ref(x)[0], rtol=0, atol=0)


def test_resample_prompt_rows_2d_3d():
    rows = torch.arange(16.0).reshape(16, 1).repeat(1, 3)
    out = resample_prompt_rows(rows, (4, 4), (8, 8))
    assert out.shape == (64, 3)
    torch.testing.assert_close(resample_prompt_rows(torch.ones(27, 2), (3, 3, 3), (4, 5, 6)), torch.ones(120, 2))
    torch.testing.assert_close(resample_prompt_rows(rows, (4, 4), (4, 4)), rows)
    torch.testing.assert_close(resample_prompt_rows(rows, (4, 4), (2, 2), "nearest"), rows[[0, 2, 8, 10]])
    with pytest.raises(mp.errors.InputDataError, match="2-D grid"):
        resample_prompt_rows(rows, (4, 4), (2, 2, 4))


def test_3d_prompt_rows_resampled_on_load(tmp_path):
    torch.manual_seed(0)
    model = mp.get_peft_model(vit(3, img=16), EPTConfig(prompt_length=3, prompt_grid=[2, 2, 2]))
    model.save_adapter(tmp_path)
    loaded = mp.PeftModel.from_pretrained(vit(3, img=24), tmp_path, verify_base="off")  # 3 x 3 x 3 patches
    assert loaded(torch.randn(1, 1, 24, 24, 24))[0].shape == (1, 3)


# ---------------------------------------------------------------------------------------------
# engine behaviour on every supported network
# ---------------------------------------------------------------------------------------------
NETS = {
    "vit2d": (lambda: tiny_vit(2), (2, 1, 32, 32)),
    "vit3d": (lambda: tiny_vit(3), (2, 1, 32, 32, 32)),
    "vit2d-nocls": (lambda: vit(2, classification=False), (2, 1, 32, 32)),
    "unetr2d": (lambda: tiny_unetr(2), (2, 1, 32, 32)),
    "timm2d": (lambda: timm_vit(), (2, 1, 32, 32)),
    "timm2d-reg": (lambda: timm_vit(reg_tokens=2, dynamic_img_size=True), (2, 1, 32, 32)),
}
CFGS = {
    "deep": {"prompt_length": 4},
    "shallow": {"prompt_length": 4, "deep": False},
    "multi-layers": {"prompt_length": 4, "embedding": "multi_cat", "layers": [-1]},
}


def _all(out):
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in (o if isinstance(o, list) else [o])]
    return [out]


@pytest.mark.parametrize("cfg_name", list(CFGS))
@pytest.mark.parametrize("net_name", list(NETS))
def test_shapes_gradients_disable_and_bit_exact_round_trip(net_name, cfg_name, tmp_path):
    torch.manual_seed(0)
    factory, shape = NETS[net_name]
    net = factory().eval()
    fresh = copy.deepcopy(net)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = net(x)
    model = mp.get_peft_model(net, EPTConfig(**CFGS[cfg_name]), modules_to_save=None)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert [t.shape for t in _all(out)] == [t.shape for t in _all(ref)]
    model.train()
    first(model(x)).float().square().mean().backward()
    trainable, with_grad, missing = grad_report(model)
    assert trainable and with_grad == trainable and not missing
    assert all(n.endswith(".adapters.default.prompt") for n in trainable)
    randomize_adapter_params(model, std=1.0)
    model.eval()
    with torch.no_grad():
        y = first(model(x))
        assert not torch.allclose(y, first(ref))
        with model.disable_adapter():
            torch.testing.assert_close(first(model(x)), first(ref), rtol=0, atol=0)
    model.save_adapter(tmp_path)
    model.requires_grad_(False)
    with torch.no_grad():
        expected = _all(model(x))
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        for a, b in zip(_all(loaded(x)), expected):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_head_via_modules_to_save_and_parameter_count():
    net = tiny_vit(2, layers=3)
    model = mp.get_peft_model(net, EPTConfig(prompt_length=10, layers=[0, 2]), modules_to_save=["classification_head"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {
        "base_model.blocks.0.attn.adapters.default.prompt",
        "base_model.blocks.2.attn.adapters.default.prompt",
        "base_model.classification_head.weight",
        "base_model.classification_head.bias",
    }
    assert model.trainable_parameters()[0] == 2 * 17 * 10 + 48 * 3 + 3
    assert not isinstance(model.base_model.blocks[1].attn, EPTAttentionLayer)  # non-contiguous layers
    with pytest.raises(mp.AdapterError, match="cannot be merged"):
        model.merge_adapter()


def test_unetr_3d_end_to_end():
    torch.manual_seed(0)
    model = mp.get_peft_model(tiny_unetr(3), EPTConfig(prompt_length=4))
    y = model(torch.randn(1, 1, 32, 32, 32))
    assert y.shape == (1, 2, 32, 32, 32)
    assert all(p.prompt.shape == (8, 4) for p in prompts_of(model))  # 2 x 2 x 2 patches, no CLS
    y.square().mean().backward()
    assert all(p.prompt.grad is not None for p in prompts_of(model))


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_networks_without_global_attention_are_rejected_with_reasons():
    with pytest.raises(mp.MethodNotApplicableError, match=r"no attention layer.*ResNet.*CNN.*Methods that apply"):
        mp.get_peft_model(tiny_resnet(2), EPTConfig())
    with pytest.raises(mp.MethodNotApplicableError, match=r"SwinUNETR.*WindowAttention"):
        mp.get_peft_model(tiny_swinunetr(2), EPTConfig())
    with pytest.raises(mp.MethodNotApplicableError, match=r"cannot adapt blocks\.0\.mlp"):
        mp.get_peft_model(tiny_vit(2), EPTConfig(target_modules=["blocks.0.mlp"]))

    class Custom(nn.Module):  # attention under another name, no preset: found nowhere
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.MultiheadAttention(8, 2, batch_first=True)])

        def forward(self, x):
            return self.layers[0](x, x, x)[0]

    with pytest.raises(
        mp.MethodNotApplicableError, match=r"no attention layer.*Custom.*MultiheadAttention.*supported are"
    ):
        mp.get_peft_model(Custom(), EPTConfig())

    class Renamed(nn.Module):  # a supported attention, but not under blocks.<i>.attn and no preset
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([TransformerBlock(16, 32, 2)])

        def forward(self, x):
            return self.layers[0](x)

    with pytest.raises(mp.MethodNotApplicableError, match=r"layers\.0\.attn.*pass target_modules"):
        mp.get_peft_model(Renamed(), EPTConfig())
    model = mp.get_peft_model(
        Renamed(), EPTConfig(target_modules=["layers.0.attn"], prompt_grid=[5], num_prefix_tokens=0)
    )
    assert model(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    # attention found but the patch grid cannot be read: say what to pass
    with pytest.raises(mp.ConfigError, match="prompt_grid"):
        mp.get_peft_model(Tokens(), EPTConfig())


def test_token_count_that_is_not_a_patch_grid_fails_clearly():
    torch.manual_seed(0)
    model = mp.get_peft_model(tiny_mae(2), EPTConfig(prompt_length=4))
    with pytest.raises(mp.errors.InputDataError, match="tokens dropped"):  # MAE's random masking
        model(torch.randn(2, 1, 32, 32))
    tokens = mp.get_peft_model(Tokens(), EPTConfig(prompt_length=4, num_prefix_tokens=1, prompt_grid=[3, 3]))
    with pytest.raises(mp.errors.InputDataError, match="cannot hold the 3x3 patch grid"):
        tokens(torch.randn(1, 8, 16))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("embedding", ["pure_cat", "multi_cat"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_few_steps_reduce_the_loss(embedding, spatial_dims):
    torch.manual_seed(0)
    img = 32 if spatial_dims == 2 else 16
    model = mp.get_peft_model(tiny_vit(spatial_dims, img=img), EPTConfig(prompt_length=8, embedding=embedding))
    x = torch.randn((4, 1) + (img,) * spatial_dims)
    target = torch.arange(4) % 3
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.3)
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

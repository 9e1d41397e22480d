"""Diffusion arm of Dutt et al. (MIDL 2024) on MONAI's DiffusionModelUNet, 2D and 3D: preset
rules (bias / norm / attention / B+N+A / LoRA / SV-Diff / DiffFit), identities at init, gradients,
save/load, merging, a short DDPM training run, and errors."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn

import monai_peft as mp
from monai_peft.checkpoint import ADAPTER_WEIGHTS_NAME, load_safetensors
from monai_peft.methods.base import AdapterLayer
from monai_peft.methods.diffusion import (
    DiffFitGamma,
    DiffFitScaleLayer,
    DiffusionUNetType,
    SVDiffConfig,
    SVDiffLayer,
    svd_factors,
)
from tests import helpers as h
from tests.method_cases import Case
from tests.test_model import test_fresh_adapter_is_identity_and_only_adapter_params_get_gradients as generic_identity
from tests.test_model import test_merged_equals_unmerged_and_merge_and_unload_gives_plain_module as generic_merge
from tests.test_model import test_save_load_round_trip_is_bit_exact as generic_round_trip
from tests.test_training_all_methods import test_a_few_steps_reduce_the_loss as generic_training

CTX = 4  # cross-attention context size of the conditioned U-Nets
METHODS = ["bitfit", "norm_tuning", "attention_tuning", "diffusion_bias_norm_attention", "lora", "svdiff", "difffit"]
NETS = {  # name: (spatial_dims, conditioned: cross-attention transformer blocks + class embedding)
    "2d": (2, False),
    "2d-cond": (2, True),
    "3d": (3, False),
    "3d-cond": (3, True),
}


def _as_pretrained(net: nn.Module, seed: int) -> nn.Module:
    """MONAI zero-initialises the last conv of every residual branch and the output conv
    (``zero_module``), so a fresh U-Net passes no gradient upstream of them. Give those tensors
    random values, as a pretrained U-Net would have."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(net.named_parameters()):
            if bool((p == 0).all()):
                if p.dim() > 1:
                    bound = 1.0 / math.sqrt(p[0].numel())
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def tiny_unet(spatial_dims: int = 2, conditioned: bool = False, seed: int = 0, **kw) -> DiffusionModelUNet:
    torch.manual_seed(seed)
    args = {
        "channels": (8, 16),
        "attention_levels": (False, True),
        "num_res_blocks": 1,
        "num_head_channels": 8,
        "norm_num_groups": 8,
    }
    if conditioned:
        args.update(with_conditioning=True, cross_attention_dim=CTX, num_class_embeds=3)
    net = DiffusionModelUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=1, **{**args, **kw})
    return _as_pretrained(net, seed)


def inputs(net_name: str, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """(x (B, 1, *spatial), forward kwargs: timesteps (B,), context (B, 3, CTX), class_labels (B,)).

    The context has several tokens: with a single one the cross-attention softmax is constant
    and its query/key projections get no gradient."""
    spatial_dims, conditioned = NETS[net_name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 1) + (16 if spatial_dims == 2 else 8,) * spatial_dims, generator=g)
    kw = {"timesteps": torch.tensor([10, 600])}
    if conditioned:
        kw["context"] = torch.randn(2, 3, CTX, generator=g)
        kw["class_labels"] = torch.tensor([0, 2])
    return x, kw


def build(net_name: str, seed: int = 0) -> DiffusionModelUNet:
    spatial_dims, conditioned = NETS[net_name]
    return tiny_unet(spatial_dims, conditioned, seed)


def owned(method: str, net: nn.Module, **kw) -> set[str]:
    spec = mp.get_method(method)
    return set(spec.tuner_cls(spec.config_cls(**kw)).owned_tensors(net))


def wrapped(model: mp.PeftModel, cls: type | None = None) -> list[str]:
    return [p for p, layer in model.adapter_layers() if cls is None or isinstance(layer, cls)]


def module_names(net: nn.Module, types: tuple[type, ...]) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, types)]


# ---------------------------------------------------------------------------------------------
# presets: the paper's rules on MONAI names
# ---------------------------------------------------------------------------------------------
def test_preset_recognises_diffusion_unets_only():
    net = tiny_unet()
    assert isinstance(net, DiffusionUNetType) and not isinstance(h.tiny_vit(2), DiffusionUNetType)

    class MyUNet(DiffusionModelUNet):
        pass

    sub = MyUNet(2, 1, 1, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8)
    assert isinstance(sub, DiffusionUNetType) and mp.get_preset(sub).name == "monai.DiffusionModelUNet"
    assert mp.get_preset(net).name == "monai.DiffusionModelUNet"
    applicable = set(mp.applicable_methods(tiny_unet(conditioned=True)))
    assert set(METHODS) <= applicable


@pytest.mark.parametrize("net_name", ["2d", "2d-cond", "3d-cond"])
def test_selective_presets_follow_the_stable_diffusion_rules(net_name):
    net = build(net_name)
    params = dict(net.named_parameters())
    # Bias: every parameter called "bias"
    assert owned("bitfit", net) == {n for n in params if n.endswith(".bias")}
    # Norm: SD rule = "norm" in the name; MONAI calls the output GroupNorm "out.0" (SD: conv_norm_out)
    norm_modules = module_names(net, (nn.GroupNorm, nn.LayerNorm))
    by_type = {f"{m}.{p}" for m in norm_modules for p in ("weight", "bias")}
    assert owned("norm_tuning", net) == by_type
    assert by_type - {n for n in params if "norm" in n} == {"out.0.weight", "out.0.bias"}
    # Attention: SD rule = "attentions" in the name; MONAI's mid block says "attention"
    attn = {n for n in params if ".attentions." in n or n.startswith("middle_block.attention.")}
    assert attn and owned("attention_tuning", net) == attn
    assert any(n.startswith("middle_block.attention.") for n in attn)
    # B+N+A: the union
    assert owned("diffusion_bias_norm_attention", net) == owned("bitfit", net) | by_type | attn
    assert owned("diffusion_bias_norm_attention", net, attention=False) == owned("bitfit", net) | by_type


@pytest.mark.parametrize("net_name", ["2d", "3d-cond"])
def test_wrapping_presets_target_the_documented_layers(net_name):
    net = build(net_name)
    conditioned = NETS[net_name][1]
    # LoRA: q, k, v and output projection of every attention (SD/diffusers: to_q, to_k, to_v, to_out.0)
    n_attn = sum(1 for m in net.modules() if type(m).__name__ in ("SABlock", "CrossAttentionBlock"))
    lora = mp.get_peft_model(copy.deepcopy(net), mp.LoraConfig(r=2))
    names = wrapped(lora)
    assert len(names) == 4 * n_attn and {n.rsplit(".", 1)[1] for n in names} == {"to_q", "to_k", "to_v", "out_proj"}
    # SV-Diff: every Linear and convolution
    sv = mp.get_peft_model(copy.deepcopy(net), mp.get_config("svdiff"))
    assert wrapped(sv, SVDiffLayer) == module_names(net, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    # DiffFit: last layer of every residual branch
    df = mp.get_peft_model(copy.deepcopy(net), mp.get_config("difffit"))
    targets = wrapped(df, DiffFitScaleLayer)
    n_res = sum(1 for m in net.modules() if type(m).__name__ == "DiffusionUNetResnetBlock")
    assert sum(n.endswith("conv2.conv") for n in targets) == n_res
    if conditioned:
        n_tb = sum(1 for m in net.modules() if type(m).__name__ == "DiffusionUNetTransformerBlock")
        assert len(targets) == n_res + 3 * n_tb
        assert {".".join(n.split(".")[-2:]) for n in targets} >= {"attn1.out_proj", "attn2.out_proj", "ff.linear2"}
        assert "class_embedding.weight" in owned("difffit", net)
    else:
        n_sa = sum(1 for m in net.modules() if type(m).__name__ == "SpatialAttentionBlock")
        assert len(targets) == n_res + n_sa and sum(n.endswith("attn.out_proj") for n in targets) == n_sa


VARIANTS = [
    pytest.param({"resblock_updown": True}, id="resblock-updown"),
    pytest.param({"include_fc": False}, id="no-attn-out-proj"),
    pytest.param({"use_combined_linear": True}, id="fused-qkv"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("method", ["lora", "svdiff", "difffit", "diffusion_bias_norm_attention"])
def test_unet_variants(method, variant):
    net = tiny_unet(2, conditioned=True, **variant)
    x, kw = inputs("2d-cond")
    net.eval()
    with torch.no_grad():
        ref = net(x, **kw)
    model = mp.get_peft_model(copy.deepcopy(net), mp.get_config(method)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, **kw), ref, rtol=0, atol=0)
    names = wrapped(model)
    if method == "difffit":  # every resnet (also the up/down-sampling ones) has its gamma
        n_res = sum(1 for m in net.modules() if type(m).__name__ == "DiffusionUNetResnetBlock")
        assert sum(n.endswith("conv2.conv") for n in names) == n_res
        if "include_fc" in variant:  # self-attention without output projection: no gamma there (documented)
            assert not any("attn1.out_proj" in n for n in names) and any("attn2.out_proj" in n for n in names)
    if method == "lora" and "use_combined_linear" in variant:
        assert any(n.endswith(".qkv") for n in names) and not any(n.endswith("to_q") for n in names if ".attn1." in n)
        fused = [m for m in model.modules() if type(m).__name__ == "LoraFusedQKV"]
        assert fused and all(m.adapters["default"].slices == "qkv" for m in fused)  # preset: q, k and v
    h.randomize_adapter_params(model, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(model(x, **kw), ref)


# ---------------------------------------------------------------------------------------------
# engine properties on 2D and 3D U-Nets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("net_name", list(NETS))
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_shapes_and_gradients(method, net_name):
    net = build(net_name)
    x, kw = inputs(net_name)
    net.eval()
    with torch.no_grad():
        ref = net(x, **kw)
    model = mp.get_peft_model(net, mp.get_config(method))
    model.eval()
    with torch.no_grad():
        out = model(x, **kw)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # delta = 0, gamma = 1, B = 0: exact
    model.train()
    F.mse_loss(model(x, **kw), torch.zeros_like(x)).backward()
    trainable, with_grad, missing = h.grad_report(model)
    assert trainable and with_grad == trainable and not missing
    # every trained tensor really learns (LoRA's A gets no gradient while B = 0, by design)
    dead = [n for n, p in model.named_parameters() if p.requires_grad and not p.grad.any() and "lora_A" not in n]
    assert not dead, dead[:5]
    if method == "svdiff":
        assert all(n.endswith(".delta") for n in trainable)
    if method == "difffit":
        assert {n.rsplit(".", 1)[1] for n in trainable} <= {"gamma", "bias", "weight"}
        assert all("norm" in n or "out.0" in n or "class_embedding" in n for n in trainable if n.endswith(".weight"))


@pytest.mark.parametrize("net_name", ["2d", "3d-cond"])
@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_is_bit_exact(method, net_name, tmp_path):
    net = build(net_name, seed=1)
    fresh = copy.deepcopy(net)
    x, kw = inputs(net_name)
    model = mp.get_peft_model(net, mp.get_config(method))
    h.randomize_adapter_params(model)
    model.eval()
    model.save_adapter(tmp_path)
    model.requires_grad_(False)
    with torch.no_grad():
        expected = model(x, **kw)
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, **kw), expected, rtol=0, atol=0)
    tensors, _ = load_safetensors(tmp_path / ADAPTER_WEIGHTS_NAME)
    sd_a, sd_b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert tensors.keys() == sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    if method == "svdiff":  # only the spectral shifts: U, sigma, V are recomputed from the base at load
        assert tensors and all(k.endswith(".delta") for k in tensors)


@pytest.mark.parametrize("net_name", ["2d-cond", "3d"])
@pytest.mark.parametrize("method", ["svdiff", "difffit", "lora", "diffusion_bias_norm_attention"])
def test_merged_equals_unmerged_and_unloads_to_plain_unet(method, net_name):
    net = build(net_name, seed=2)
    keys = set(net.state_dict())
    x, kw = inputs(net_name)
    model = mp.get_peft_model(net, mp.get_config(method))
    h.randomize_adapter_params(model, std=0.1)
    model.eval()
    with torch.no_grad():
        y = model(x, **kw)
        model.merge_adapter()
        torch.testing.assert_close(model(x, **kw), y, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(x, **kw), y, rtol=1e-5, atol=1e-5)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        assert set(plain.state_dict()) == keys
        torch.testing.assert_close(plain(x, **kw), y, rtol=1e-5, atol=1e-5)


def test_named_adapters_switch_disable_and_delete():
    net = build("2d-cond", seed=3)
    x, kw = inputs("2d-cond")
    net.eval()
    with torch.no_grad():
        ref = net(x, **kw)
    model = mp.get_peft_model(net, mp.get_config("svdiff"), adapter_name="sv")
    model.add_adapter("sv2", mp.get_config("svdiff"))
    model.add_adapter("df", mp.get_config("difffit"))
    model.eval()
    outs = {}
    for name in ("sv", "sv2", "df"):
        model.set_adapter(name)
        h.randomize_adapter_params(model, std=0.1)
        with torch.no_grad():
            outs[name] = model(x, **kw)
        assert not torch.allclose(outs[name], ref)
    layer = model.base_model.time_embed[0]
    assert isinstance(layer, SVDiffLayer) and set(layer.adapters) == {"sv", "sv2"}  # one SVD per layer
    with torch.no_grad():
        for name in ("sv", "df", "sv2"):
            model.set_adapter(name)
            torch.testing.assert_close(model(x, **kw), outs[name], rtol=0, atol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(x, **kw), ref, rtol=0, atol=0)
        model.delete_adapter("sv")
        model.delete_adapter("sv2")
        assert not wrapped(model, SVDiffLayer)
        model.set_adapter("df")
        torch.testing.assert_close(model(x, **kw), outs["df"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# SV-Diff
# ---------------------------------------------------------------------------------------------
SVD_LAYERS = [
    pytest.param(nn.Linear(6, 4), (3, 6), id="linear-wide"),
    pytest.param(nn.Linear(3, 7), (2, 5, 3), id="linear-tall"),
    pytest.param(nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 7, 7), id="conv2d-groups"),
    pytest.param(nn.Conv3d(3, 5, (3, 1, 3), stride=(1, 2, 2), padding=(1, 0, 1)), (2, 3, 5, 6, 6), id="conv3d"),
    pytest.param(nn.Conv1d(8, 2, 1, bias=False), (2, 8, 9), id="conv1d-1x1"),
    pytest.param(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1), (2, 4, 5, 5), id="convT2d"),
]


@pytest.mark.parametrize("layer,shape", SVD_LAYERS)
def test_svdiff_layer_follows_the_equation_and_merges(layer, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        ref = layer(x)
    w0 = layer.weight.detach().clone()
    model = mp.get_peft_model(nn.Sequential(layer), SVDiffConfig(target_modules=["0"]))
    svl = model.base_model[0]
    m, n = w0.shape[0], w0[0].numel()
    assert isinstance(svl, SVDiffLayer) and svl.rank == min(m, n)
    assert svl.svd_u.shape == (m, min(m, n)) and svl.svd_vh.shape == (min(m, n), n)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # delta = 0: the base, bit for bit
        delta = svl.adapters["default"].delta
        delta.copy_(torch.linspace(-0.3, 0.2, delta.numel()))
        delta[-1] = -1e3  # ReLU clamps this singular value to 0
        # reference: an independent SVD, W_delta = U diag(ReLU(sigma + delta)) V^T
        u, s, vh = torch.linalg.svd(w0.reshape(m, n).double(), full_matrices=False)
        w_ref = (u * F.relu(s + delta.double())) @ vh
        assert torch.linalg.matrix_rank(w_ref) <= min(m, n) - 1
        expected = torch.func.functional_call(layer, {"weight": w_ref.float().view(w0.shape), "bias": layer.bias}, (x,))
        out = model(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        model.merge_adapter()
        torch.testing.assert_close(layer.weight, w_ref.float().view(w0.shape), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    assert set(model.adapter_state_dict()) == {"adapter.0.delta"}  # U, sigma, V are not saved


def test_svd_factors_reconstruct_the_weight():
    w = torch.randn(6, 4, 3, 3)
    u, s, vh = svd_factors(w)
    assert u.shape == (6, 6) and s.shape == (6,) and vh.shape == (6, 36) and bool((s[:-1] >= s[1:]).all())
    torch.testing.assert_close(((u * s) @ vh).view(w.shape), w, rtol=1e-5, atol=1e-5)
    assert svd_factors(w.half())[1].dtype == torch.float32  # factors kept in at least float32


def test_svd_precision_only_affects_the_change_term():
    net = tiny_unet(2)
    x, kw = inputs("2d")
    outs = []
    for svd_dtype in ("float32", "float64"):
        model = mp.get_peft_model(copy.deepcopy(net), mp.get_config("svdiff", svd_dtype=svd_dtype)).eval()
        h.randomize_adapter_params(model, std=0.1)
        with torch.no_grad():
            outs.append(model(x, **kw))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# DiffFit
# ---------------------------------------------------------------------------------------------
def test_difffit_gamma_shapes_flags_and_exact_merge():
    net = build("2d-cond")
    x, kw = inputs("2d-cond")
    model = mp.get_peft_model(copy.deepcopy(net), mp.get_config("difffit", scalar_gamma=True))
    gammas = [layer.adapters["default"] for _, layer in model.adapter_layers()]
    assert gammas and all(isinstance(g, DiffFitGamma) and g.gamma.numel() == 1 for g in gammas)
    per_channel = mp.get_peft_model(copy.deepcopy(net), mp.get_config("difffit"))
    conv2 = per_channel.base_model.down_blocks[0].resnets[0].conv2.conv
    assert isinstance(conv2, DiffFitScaleLayer) and conv2.adapters["default"].gamma.shape == (8,)
    assert bool((conv2.adapters["default"].gamma == 1).all())
    # only gamma (+ no selective part)
    only_gamma = owned("difffit", net, train_bias=False, train_norm=False, train_class_embedding=False)
    assert only_gamma == set()
    assert owned("difffit", net, train_bias=False, train_norm=False) == {"class_embedding.weight"}
    assert "class_embedding.weight" not in owned("difffit", build("2d"))  # no class embedding, nothing to train
    # merging folds gamma into weight and bias
    h.randomize_adapter_params(model, std=0.2)
    model.eval()
    with torch.no_grad():
        y = model(x, **kw)
        model.merge_adapter()
        torch.testing.assert_close(model(x, **kw), y, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        for g in gammas:
            g.gamma.zero_()
        with pytest.raises(mp.AdapterError, match="gamma equal to 0"):
            model.merge_adapter()


def test_difffit_with_explicit_targets_on_another_network():
    vit = h.tiny_vit(2)
    model = mp.get_peft_model(vit, mp.get_config("difffit", target_modules=["attn.out_proj", "mlp.linear2"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".gamma") for n in names) and any(n.endswith(".bias") for n in names)
    assert len(wrapped(model, DiffFitScaleLayer)) == 2 * 2  # 2 blocks x (attention, MLP)


# ---------------------------------------------------------------------------------------------
# a short DDPM fine-tuning run: noise-prediction MSE decreases
# ---------------------------------------------------------------------------------------------
LR = {"lora": 2e-2}


@pytest.mark.parametrize("net_name", ["2d-cond", "3d"])
@pytest.mark.parametrize("method", METHODS)
def test_ddpm_noise_prediction_loss_decreases(method, net_name):
    net = build(net_name, seed=4)
    x, kw = inputs(net_name, seed=4)
    g = torch.Generator().manual_seed(5)
    images = torch.tanh(2 * x)  # a fixed batch of "images" in [-1, 1]
    noise = torch.randn(images.shape, generator=g)
    timesteps = kw.pop("timesteps")
    context = kw.pop("context", None)
    inferer = DiffusionInferer(DDPMScheduler(num_train_timesteps=1000))
    model = mp.get_peft_model(net, mp.get_config(method))
    unet = functools.partial(model, **kw)  # class labels (the inferer passes x, timesteps, context)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR.get(method, 1e-2))
    model.train()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        pred = inferer(inputs=images, diffusion_model=unet, noise=noise, timesteps=timesteps, condition=context)
        loss = F.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = F.mse_loss(
            inferer(inputs=images, diffusion_model=unet, noise=noise, timesteps=timesteps, condition=context), noise
        ).item()
    assert final < 0.95 * losses[0], (method, losses, final)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


# ---------------------------------------------------------------------------------------------
# the generic engine tests, on other networks with explicit targets
# ---------------------------------------------------------------------------------------------
def _n(factory, *args, name):
    def make():
        return factory(*args)

    make.__name__ = name
    return make


GENERIC = [
    Case("svdiff", {"target_types": ["Linear"]}, _n(h.tiny_vit, 2, name="vit"), (2, 1, 32, 32)),
    Case("svdiff", {"target_types": ["Conv3d"]}, _n(h.tiny_resnet, 3, name="resnet"), (2, 1, 16, 16, 16)),
    Case(
        "difffit",
        {"target_modules": ["attn.out_proj", "mlp.linear2"]},
        _n(h.tiny_vit, 3, name="vit"),
        (2, 1, 32, 32, 32),
    ),
    Case("diffusion_bias_norm_attention", {}, _n(h.tiny_vit, 2, name="vit"), (2, 1, 32, 32)),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in GENERIC])
def test_generic_engine_contract_on_other_networks(case, tmp_path):
    generic_identity(case)
    generic_round_trip(case, tmp_path)
    if case.method != "diffusion_bias_norm_attention":
        generic_merge(case)
    generic_training(case)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_svdiff_on_a_module_without_weight_matrix_fails_clearly():
    with pytest.raises(mp.MethodNotApplicableError, match=r"svdiff cannot adapt out\.0 \(GroupNorm\).*weight matrix"):
        mp.get_peft_model(tiny_unet(), mp.get_config("svdiff", target_modules=["out.0"]))
    with pytest.raises(mp.MethodNotApplicableError, match="svdiff cannot adapt"):
        mp.get_peft_model(nn.Sequential(nn.Embedding(4, 3)), mp.get_config("svdiff", target_modules=["0"]))
    with pytest.raises(mp.TargetingError, match="needs a network preset"):
        mp.get_peft_model(h.tiny_vit(2), mp.get_config("svdiff"))
    with pytest.raises(mp.ConfigError, match="svd_dtype"):
        mp.get_config("svdiff", svd_dtype="float16")


def test_difffit_on_a_network_that_is_not_a_diffusion_unet_fails_clearly():
    for net in (h.tiny_vit(2), h.tiny_resnet(3), nn.Sequential(nn.Linear(3, 3))):
        with pytest.raises(mp.MethodNotApplicableError, match="defined for diffusion U-Nets"):
            mp.get_peft_model(net, mp.get_config("difffit"))
    with pytest.raises(mp.MethodNotApplicableError, match=r"difffit cannot adapt out\.0 \(GroupNorm\)"):
        mp.get_peft_model(tiny_unet(), mp.get_config("difffit", target_modules=["out.0"]))
    with pytest.raises(mp.TargetingError, match="class_embedding_params"):
        mp.get_peft_model(tiny_unet(), mp.get_config("difffit", class_embedding_params=["label_emb.weight"]))
    assert "difffit" not in mp.applicable_methods(h.tiny_vit(2))


def test_bias_norm_attention_errors():
    with pytest.raises(mp.MethodNotApplicableError, match="no attention block"):
        mp.get_peft_model(tiny_unet(), mp.get_config("diffusion_bias_norm_attention", target_modules=["attn9"]))
    model = mp.get_peft_model(
        tiny_unet(attention_levels=(False, False)), mp.get_config("diffusion_bias_norm_attention", attention=False)
    )
    assert model.trainable_parameters()[0] > 0
    with pytest.raises(mp.ConfigError, match="at least one"):
        mp.get_config("diffusion_bias_norm_attention", bias=False, norm=False, attention=False)
    with pytest.raises(mp.ConfigError, match="norm_types"):
        mp.get_config("diffusion_bias_norm_attention", norm_types=["weird"])

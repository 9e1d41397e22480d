"""Selective tuning (monai_peft.methods.selective): exactly the intended base parameters train, 2D and 3D.

BitFit, norm tuning, attention tuning, partial-k, linear probing and full fine-tuning change no output at
injection, give gradients to exactly the parameters they name, and save/load bit-exactly (BatchNorm running
statistics included).
"""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks import nets
from torch import nn

import monai_peft as mp
from monai_peft.errors import MethodNotApplicableError
from tests.helpers import aniso_cnn_image, aniso_vit, aniso_vit_image, first, grad_report, tiny_resnet


def vit(spatial_dims: int) -> nets.ViT:
    return aniso_vit(spatial_dims, layers=3)


vit_image, cnn_image = aniso_vit_image, aniso_cnn_image


def _trained_after_backward(peft: mp.PeftModel, x: torch.Tensor) -> set[str]:
    peft.train()
    first(peft(x)).square().mean().backward()
    trainable, with_grad, missing = grad_report(peft)
    assert not missing, f"trainable parameters without gradient: {sorted(missing)[:5]}"
    assert with_grad == trainable, f"gradients outside the trainable set: {sorted(with_grad - trainable)[:5]}"
    return {n.removeprefix("base_model.") for n in trainable}


def _names(net: nn.Module, keep) -> set[str]:
    return {n for n, p in net.named_parameters() if keep(n, p)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bitfit_trains_every_bias_and_nothing_else(spatial_dims) -> None:
    net = vit(spatial_dims)
    expected = _names(net, lambda n, _: n.endswith(".bias") and "norm_cross_attn" not in n)
    trained = _trained_after_backward(mp.get_peft_model(copy.deepcopy(net), mp.BitFitConfig()), vit_image(spatial_dims))
    assert trained == expected
    cnn = tiny_resnet(spatial_dims)
    cnn_bias = _names(cnn, lambda n, _: n.endswith(".bias"))
    assert _trained_after_backward(mp.get_peft_model(cnn, mp.BitFitConfig()), cnn_image(spatial_dims)) == cnn_bias


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_norm_tuning_by_kind(spatial_dims) -> None:
    net = vit(spatial_dims)
    ln = {n for n in _names(net, lambda n, _: ".norm" in n or n.startswith("norm.")) if "norm_cross_attn" not in n}
    peft = mp.get_peft_model(copy.deepcopy(net), mp.NormTuningConfig(norm_types=["layernorm"]))
    assert _trained_after_backward(peft, vit_image(spatial_dims)) == ln
    assert len(ln) == 2 * (2 * 3 + 1), "norm1/norm2 of 3 blocks + final norm, weight and bias"
    cnn = tiny_resnet(spatial_dims)
    bn = {
        f"{m}.{p}"
        for m, mod in cnn.named_modules()
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm3d))
        for p in ("weight", "bias")
    }
    peft = mp.get_peft_model(copy.deepcopy(cnn), mp.NormTuningConfig(norm_types=["batchnorm"]))
    assert _trained_after_backward(peft, cnn_image(spatial_dims)) == bn
    with pytest.raises(MethodNotApplicableError, match="selects no parameter"):
        mp.get_peft_model(copy.deepcopy(cnn), mp.NormTuningConfig(norm_types=["layernorm"]))


def test_attention_tuning_trains_attention_and_positions_not_the_patch_embedding() -> None:
    net = vit(2)
    expected = _names(net, lambda n, _: ".attn." in n) | {"patch_embedding.position_embeddings"}
    trained = _trained_after_backward(mp.get_peft_model(copy.deepcopy(net), mp.AttentionTuningConfig()), vit_image(2))
    assert trained == expected
    assert not any(n.startswith("patch_embedding.patch_embeddings") for n in trained)
    no_pos = mp.get_peft_model(copy.deepcopy(net), mp.AttentionTuningConfig(include_pos_embed=False))
    assert _trained_after_backward(no_pos, vit_image(2)) == expected - {"patch_embedding.position_embeddings"}
    with pytest.raises(MethodNotApplicableError, match="attention"):
        mp.get_peft_model(tiny_resnet(2), mp.AttentionTuningConfig())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_partial_linear_probe_and_full(spatial_dims) -> None:
    net, x = vit(spatial_dims), vit_image(spatial_dims)
    head = _names(net, lambda n, _: n.startswith("classification_head."))
    last = _names(net, lambda n, _: n.startswith("blocks.2.") and "norm_cross_attn" not in n)
    assert _trained_after_backward(mp.get_peft_model(copy.deepcopy(net), mp.PartialConfig(k=1)), x) == last | head
    assert (
        _trained_after_backward(mp.get_peft_model(copy.deepcopy(net), mp.PartialConfig(k=1, include_head=False)), x)
        == last
    )
    assert _trained_after_backward(mp.get_peft_model(copy.deepcopy(net), mp.LinearProbeConfig()), x) == head
    everything = _names(net, lambda n, _: "norm_cross_attn" not in n)
    assert _trained_after_backward(mp.get_peft_model(copy.deepcopy(net), mp.FullFinetuneConfig()), x) == everything
    with pytest.raises(MethodNotApplicableError, match="only 3 blocks"):
        mp.get_peft_model(copy.deepcopy(net), mp.PartialConfig(k=4))


CONFIGS = [
    mp.BitFitConfig(),
    mp.NormTuningConfig(),
    mp.PartialConfig(k=1),
    mp.LinearProbeConfig(),
    mp.FullFinetuneConfig(),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_injection_changes_no_output(config, spatial_dims) -> None:
    net, x = tiny_resnet(spatial_dims).eval(), cnn_image(spatial_dims)
    with torch.no_grad():
        ref = first(net(x))
        assert torch.equal(first(mp.get_peft_model(copy.deepcopy(net), config).eval()(x)), ref)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_save_and_load_are_bit_exact_with_batchnorm_statistics(config, spatial_dims, tmp_path) -> None:
    base, x = tiny_resnet(spatial_dims), cnn_image(spatial_dims)
    fresh = copy.deepcopy(base)
    peft = mp.get_peft_model(base, config)
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1)
    peft.train()
    for _ in range(2):  # train steps move the parameters and the BatchNorm running statistics
        opt.zero_grad()
        first(peft(x)).square().mean().backward()
        opt.step()
    peft.eval()
    with torch.no_grad():
        out = first(peft(x))
        assert not torch.equal(out, first(copy.deepcopy(fresh).eval()(x)))
    peft.save_adapter(tmp_path)
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    saved, again = peft.adapter_state_dict(), loaded.adapter_state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert any(k.endswith("running_mean") for k in saved), "batchnorm_stats='save' stores the statistics"
    with torch.no_grad():
        assert torch.equal(first(loaded(x)), out)


def test_unload_restores_the_base_values() -> None:
    net = vit(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    peft = mp.get_peft_model(net, mp.BitFitConfig())
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(1.0)
    plain = peft.unload()
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())

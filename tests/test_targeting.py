"""Target selection rules and the per-network presets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monai_peft as mp
from monai_peft.targeting import TargetSpec, find_targets, get_preset, name_matches
from tests import helpers as h


def test_name_matching_rules():
    assert name_matches("blocks.0.attn.qkv", ["blocks.0.attn.qkv"])
    assert name_matches("blocks.0.attn.qkv", ["attn.qkv"])
    assert name_matches("blocks.0.attn.qkv", ["qkv"])
    assert not name_matches("blocks.0.attn.qkv_extra", ["qkv"])
    assert not name_matches("blocks.0.attn.qkv", ["kv"])  # suffix means a whole dotted component
    assert name_matches("blocks.3.attn.qkv", ["re:blocks\\.[0-3]\\..*"])
    assert not name_matches("blocks.4.attn.qkv", ["re:blocks\\.[0-3]\\..*"])
    assert name_matches("blocks.3.attn.qkv", r".*\.qkv")  # a bare string is a regex (peft)
    assert not name_matches("x", None)


def test_type_and_exclude_selection():
    net = h.tiny_vit(2)
    spec = TargetSpec(modules=["re:blocks\\..*"], types=["Linear"], exclude=["re:.*mlp.*", "blocks.1.attn.qkv"])
    assert find_targets(net, spec) == ["blocks.0.attn.out_proj", "blocks.0.attn.qkv", "blocks.1.attn.out_proj"]
    assert find_targets(net, TargetSpec(types=[nn.LayerNorm], exclude="re:.*cross.*".removeprefix("re:"))) == [
        "blocks.0.norm1",
        "blocks.0.norm2",
        "blocks.1.norm1",
        "blocks.1.norm2",
        "norm",
    ]


def test_nothing_matched_is_a_clear_error():
    with pytest.raises(mp.TargetingError, match="no module of ViT matches modules=\\['nope'\\].*look like"):
        find_targets(h.tiny_vit(2), TargetSpec(modules=["nope"]))


NETS = [
    ("monai.ViT", lambda: h.tiny_vit(2)),
    ("monai.ViT", lambda: h.tiny_vit(3)),
    ("monai.UNETR", lambda: h.tiny_unetr(3)),
    ("monai.SwinUNETR", lambda: h.tiny_swinunetr(3)),
    ("monai.MaskedAutoEncoderViT", lambda: h.tiny_mae(2)),
    ("monai.DenseNet", lambda: h.tiny_densenet(2)),
    ("monai.ResNet", lambda: h.tiny_resnet(2)),
    ("monai.ResNet", lambda: h.tiny_resnet(3)),
    ("monai.SegResNet", lambda: h.tiny_segresnet(3)),
    ("monai.BasicUNet", lambda: h.tiny_basicunet(2)),
]


@pytest.mark.parametrize("preset_name,factory", NETS)
def test_presets_exist_and_every_role_matches_something(preset_name, factory):
    net = factory()
    preset = get_preset(net)
    assert preset is not None and preset.name == preset_name
    for role, spec in preset.roles.items():
        if role == "unused":
            continue
        assert find_targets(net, spec), role
    head = find_targets(net, preset.role("head"))
    for role in ("convs", "ssf", "norms", "qkv"):
        if preset.role(role):
            names = find_targets(net, preset.role(role))
            assert not any(n == hd or n.startswith(hd + ".") for n in names for hd in head), (role, names)


def test_densenet121_preset():
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2)
    preset = get_preset(net)
    assert preset.name == "monai.DenseNet"
    model = mp.get_peft_model(net, mp.LoraConfig(r=1))
    assert model.trainable_parameters()[0] > 0


PRESET_DEFAULTS = [
    # (factory, method, kwargs, expected number of wrapped/owned sites)
    (lambda: h.tiny_vit(2), "lora", {}, 2),  # qkv of 2 blocks
    (lambda: h.tiny_vit(2), "adapter", {}, 4),  # attn + mlp of 2 blocks
    (lambda: h.tiny_vit(2), "adaptformer", {}, 2),
    (lambda: h.tiny_vit(2), "ssf", {}, 2 * 6 + 2),  # qkv, out_proj, 2 linears, 2 norms per block + patch + norm
    (lambda: h.tiny_swinunetr(3), "lora", {}, 4),
    (lambda: h.tiny_unetr(3), "lora", {}, 12),
    (lambda: h.tiny_resnet(3), "adapter", {}, 4),
]


@pytest.mark.parametrize("factory,method,kwargs,sites", PRESET_DEFAULTS)
def test_preset_defaults(factory, method, kwargs, sites):
    model = mp.get_peft_model(factory(), mp.get_config(method, **kwargs))
    # sites that hold trained tensors (helpers such as grid probes or input taps hold none)
    assert sum(any(p.numel() for p in layer.adapters.parameters()) for _, layer in model.adapter_layers()) == sites


def test_selective_presets_on_vit():
    net = h.tiny_vit(2)
    for method, check in [
        ("bitfit", lambda n: n.endswith(".bias")),
        ("norm_tuning", lambda n: ".norm" in n or n.startswith("norm.")),
        ("attention_tuning", lambda n: ".attn." in n or n == "patch_embedding.position_embeddings"),
        ("linear_probe", lambda n: n.startswith("classification_head")),
        ("partial", lambda n: n.startswith(("blocks.1.", "classification_head"))),
    ]:
        model = mp.get_peft_model(h.tiny_vit(2), mp.get_config(method))
        names = [n.removeprefix("base_model.") for n, p in model.named_parameters() if p.requires_grad]
        assert names and all(check(n) for n in names), (method, names)
        assert not any("norm_cross_attn" in n for n in names)  # never used in the forward pass
    del net


def test_attention_tuning_on_cnn_says_what_applies():
    with pytest.raises(
        mp.MethodNotApplicableError,
        match="attention tuning needs attention modules.*Methods that apply to ResNet with their defaults: .*'lora'",
    ):
        mp.get_peft_model(h.tiny_resnet(2), mp.AttentionTuningConfig())


def test_adaptformer_on_explicit_non_channel_module_errors_at_forward():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    model = mp.get_peft_model(net, mp.AdaptFormerConfig(target_modules=["1"], bottleneck=2, input="normed"))
    assert model(torch.randn(2, 4)).shape == (2, 4)


def test_applicable_methods_lists_what_fits():
    vit = set(mp.applicable_methods(h.tiny_vit(2)))
    cnn = set(mp.applicable_methods(h.tiny_resnet(2)))
    assert {"lora", "adapter", "adaptformer", "ssf", "attention_tuning", "bitfit"} <= vit
    assert {"lora", "adapter", "ssf", "bitfit", "norm_tuning"} <= cnn
    assert "attention_tuning" not in cnn and "adaptformer" not in cnn


def test_roles_are_structural_and_old_names_still_work():
    from monai_peft.targeting import ROLE_ALIASES, ROLES

    for net in (h.tiny_vit(2), h.tiny_resnet(2), h.tiny_swinunetr(2)):
        preset = mp.get_preset(net)
        assert set(preset.roles) <= set(ROLES), preset.name
        for old, new in ROLE_ALIASES.items():
            assert preset.role(old) is preset.role(new)
    assert mp.get_preset(h.tiny_vit(2)).qkv_slices == "qv"
    # image inputs are exact names: ResNet's stem conv1, not every block's conv1
    assert mp.find_targets(h.tiny_resnet(2), mp.get_preset(h.tiny_resnet(2)).role("image_input")) == ["conv1"]


def test_every_builtin_preset_lives_in_targeting():
    from monai_peft import targeting

    names = targeting.list_presets()
    assert {"monai.ViT", "monai.DiffusionModelUNet", "monai_peft.LiteMedSAM", "monai_peft.LiteMedSAMEncoder"} <= set(
        names
    )
    assert not hasattr(targeting.NetworkPreset, "method_defaults")


def test_exact_patterns_select_only_the_named_modules():
    from monai_peft.targeting import TargetSpec, exact_patterns

    net = h.tiny_resnet(2)
    pats = exact_patterns(net, ["layer1.0.conv1", "conv1"])
    assert pats == ["re:conv1", "layer1.0.conv1"]
    assert mp.find_targets(net, TargetSpec(modules=pats)) == ["conv1", "layer1.0.conv1"]

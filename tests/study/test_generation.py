"""The generation study (task: generation): schema, zero-init exactness, what trains, the FID score."""

from __future__ import annotations

import copy

import pytest
import torch

import monai_peft as mp
from monai_peft.errors import ConfigError
from monai_peft.study.generation_run import FeatureExtractor, adapt_model, build_unet, fid, train_diffusion
from monai_peft.study.generation_schema import (
    EvaluationSpec,
    GenerationMethodSpec,
    SchedulerSpec,
    UNetSpec,
    generation_from_dict,
)

TINY_UNET = UNetSpec(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
PEFT = {
    "lora": {"r": 2, "alpha": 2},
    "svdiff": {},
    "difffit": {},
    "diffusion_bias_norm_attention": {},
    "full_finetune": {},
}


def _study(**over):
    data = {"name": "g", "task": "generation", "methods": ["pretrained", {"name": "lora", "lr": 0.01}], "seeds": [0]}
    data.update(over)
    return data


# --- schema -------------------------------------------------------------------------------------------


def test_defaults_round_trip_and_execution_fields_leave_the_hash():
    spec = generation_from_dict(_study())
    assert generation_from_dict(spec.to_dict()).config_hash() == spec.config_hash()
    moved = generation_from_dict(_study(adaptation={"device": "cuda", "num_threads": 4}))
    assert moved.config_hash() == spec.config_hash()
    assert generation_from_dict(_study(seeds=[1])).config_hash() != spec.config_hash()
    # the base's identity ignores the adaptation but not the pretraining
    assert generation_from_dict(_study(adaptation={"steps": 3})).pretrain_hash() == spec.pretrain_hash()
    assert generation_from_dict(_study(pretrain={"steps": 3})).pretrain_hash() != spec.pretrain_hash()


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"epochs": 3}, r"unknown key\(s\) \['epochs'\].*valid keys"),
        ({"methods": ["lora", "vpt"]}, r"unknown generation method 'vpt'; valid methods: pretrained, scratch, full_"),
        ({"methods": ["lora", "lora"]}, "labels must be unique"),
        ({"methods": [{"name": "scratch", "kwargs": {"r": 2}}]}, "reference row and takes no kwargs"),
        ({"unet": {"channels": [16, 32], "attention_levels": [True]}}, "one entry per level"),
        (
            {"unet": {"channels": [12, 32], "attention_levels": [False, True]}},
            r"not multiples of unet.norm_num_groups=16",
        ),
        ({"unet": {"chanels": [16]}}, r"unknown key\(s\) \['chanels'\] in unet; valid keys"),
        ({"evaluation": {"layer": "head"}}, "unknown evaluation.layer 'head'; valid: reduction_3"),
        ({"evaluation": {"extractor": "inception"}}, "valid: efficientnet_lite0"),
        ({"image_size": 30}, "divisible by 2"),
        ({"scheduler": {"sample_steps": 2000}}, "must not exceed"),
        ({"source": {"kind": "nifti"}}, "valid kinds: brats_flair"),
        ({"target": {"train_images": 1}}, r"target.train_images must be an integer >= 2"),
        ({"seeds": [0, 0]}, "distinct"),
        ({"task": "classification"}, "task: generation"),
    ],
)
def test_bad_generation_studies_name_what_is_wrong(over, match):
    with pytest.raises(ConfigError, match=match):
        generation_from_dict(_study(**over))


def test_classification_loader_points_generation_files_elsewhere(tmp_path):
    from monai_peft.study import load_study

    path = tmp_path / "g.json"
    import json

    path.write_text(json.dumps({**_study(), "dataset": {"kind": "medmnist", "path": "x.npz"}, "backbones": ["a"],
                                "budgets": {"fractions": [1.0]}}))  # fmt: skip
    with pytest.raises(ConfigError, match="unknown key"):
        load_study(path)  # the classification schema does not know generation keys
    from monai_peft.study.generation import load_generation_study

    with pytest.raises(ConfigError, match="generation study; valid keys"):
        load_generation_study(path)


def test_packaged_generation_study_is_valid():
    from monai_peft.study.generation import load_generation_study

    spec = load_generation_study("diffusion_brats_to_pneumoniamnist")
    names = [m.name for m in spec.methods]
    assert {"pretrained", "scratch", "full_finetune", "lora", "svdiff", "difffit"} <= set(names)
    assert "diffusion_bias_norm_attention" in names and spec.evaluation.samples > 112  # 112-d features


# --- zero init and what trains ------------------------------------------------------------------------


def _unet3d():
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, True),
        num_res_blocks=1, num_head_channels=8, norm_num_groups=8,
    )  # fmt: skip


def _perturb(net: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial base weights (MONAI zero-initialises some output convs)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parametrize("method", ["lora", "svdiff", "difffit"])
@pytest.mark.parametrize("dims", [2, 3])
def test_zero_initialised_methods_predict_exactly_the_base_noise(method, dims):
    torch.manual_seed(0)
    base = _perturb(build_unet(TINY_UNET) if dims == 2 else _unet3d())
    x = torch.randn((2, 1, 8, 16) if dims == 2 else (2, 1, 8, 8, 16))  # non-square
    t = torch.tensor([3, 917])
    with torch.no_grad():
        ref = base(x, timesteps=t)
        if dims == 2:
            model = adapt_model(base, GenerationMethodSpec(method, kwargs=PEFT[method]), TINY_UNET, seed=0)
        else:
            model = mp.get_peft_model(copy.deepcopy(base), mp.get_config(method, **PEFT[method]))
        out = model.eval()(x, timesteps=t)
    assert torch.equal(out, ref)
    inits = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if method == "lora":
        bs = [p for n, p in inits.items() if "lora_B" in n]
        assert bs and all(bool((p == 0).all()) for p in bs)
    if method == "svdiff":
        assert all(bool((p == 0).all()) for n, p in inits.items() if n.endswith("delta"))
    if method == "difffit":
        gammas = [p for n, p in inits.items() if n.endswith("gamma")]
        assert gammas and all(bool((p == 1).all()) for p in gammas)


def _expected_trainable(method: str, name: str) -> bool:
    """Independent statement of what each method may change (canonical MONAI parameter names in ``name``)."""
    if method in ("full_finetune", "scratch"):
        return True
    name = name.removeprefix("base_model.")
    if method == "lora":
        return "lora_" in name
    if method == "svdiff":
        return name.endswith("delta")
    leaf = name.split(".")[-1]
    is_norm = ".norm" in name or "norm." in name or "norm1" in name or "norm2" in name or name.startswith("out.0")
    if method == "difffit":
        return name.endswith("gamma") or leaf == "bias" or is_norm
    if method == "diffusion_bias_norm_attention":
        return leaf == "bias" or is_norm or "attention" in name
    raise AssertionError(method)


@pytest.mark.parametrize("method", [*PEFT, "scratch"])
def test_one_training_step_changes_only_the_intended_parameters(method):
    torch.manual_seed(0)
    base = _perturb(build_unet(TINY_UNET))
    base_before = {k: v.clone() for k, v in base.state_dict().items()}
    model = adapt_model(base, GenerationMethodSpec(method, kwargs=PEFT.get(method, {})), TINY_UNET, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    images = torch.rand(6, 1, 16, 16)
    stats = train_diffusion(model, images, scheduler=SchedulerSpec(num_train_timesteps=50), steps=2, batch_size=4,
                            lr=1e-2, weight_decay=0.0, seed=0)  # fmt: skip
    assert stats["final_loss"] > 0 and len(stats["loss_history"]) == 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"
    wrong = sorted(n for n in trainable if not _expected_trainable(method, n))
    assert not wrong, f"{method} trains parameters it should not own: {wrong[:5]}"
    assert any(_expected_trainable(method, n) for n in changed)
    # the base the study keeps is never touched (each row trains a copy)
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())


def test_pretrained_row_trains_nothing():
    base = build_unet(TINY_UNET)
    model = adapt_model(base, GenerationMethodSpec("pretrained"), TINY_UNET, seed=0)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="no trainable parameter"):
        train_diffusion(model, torch.rand(4, 1, 16, 16), scheduler=SchedulerSpec(), steps=1, batch_size=2, lr=1e-3,
                        weight_decay=0.0, seed=0)  # fmt: skip


# --- the score ----------------------------------------------------------------------------------------


def test_fid_is_zero_on_the_same_set_and_the_mean_shift_on_a_shifted_one():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    assert abs(fid(a, a)) < 1e-6
    shift = torch.linspace(-1, 2, 12, dtype=torch.float64)
    # equal covariances: the Frechet distance is exactly |mu_a - mu_b|^2
    assert fid(a + shift, a) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    assert fid(torch.randn(300, 12, generator=g, dtype=torch.float64) * 3, a) > 1.0
    with pytest.raises(ValueError, match="more generated samples than feature dimensions"):
        fid(a[:10], a)


def test_extractor_features_score_near_zero_on_themselves_and_high_on_other_images():
    ext = FeatureExtractor(EvaluationSpec(layer="reduction_3", feature_size=32, batch_size=64))
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(120, 1, 4, 4, generator=g), size=(24, 40), mode="bilinear")
    noise = torch.rand(120, 1, 24, 40, generator=g)  # non-square images
    fs, fn = ext(smooth), ext(noise)
    assert fs.shape == (120, 40) and fs.dtype == torch.float64
    assert abs(fid(fs, fs)) < 1e-6
    assert fid(fn, fs) > 10 * max(abs(fid(fs[:60], fs[60:])), 1e-3)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        ext(torch.rand(4, 3, 16, 16))

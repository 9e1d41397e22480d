"""Configs (JSON round trip, validation), the registry and third-party methods."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import monai_peft as mp
from monai_peft.methods.base import AdapterLayer, WrappingTuner

EXPECTED = {
    "adapter",
    "adaptformer",
    "attention_tuning",
    "bitfit",
    "full_finetune",
    "linear_probe",
    "lora",
    "norm_tuning",
    "partial",
    "ssf",
    "convpass",
    "conv_adapter",
    "tsa",
    "fact",
    "vpt",
    "vp",
    "ept",
    "svdiff",
    "difffit",
    "dka",
    "diffusion_bias_norm_attention",
}


def test_list_methods_has_the_core_methods():
    assert set(mp.list_methods()) >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_config_round_trips_through_json(name, tmp_path):
    cfg = mp.get_config(name, target_modules=["a", "re:b\\..*"], modules_to_save=["head"])
    data = json.loads(cfg.to_json_string())
    assert data["method"] == name
    again = mp.PeftConfig.from_dict(data)
    assert type(again) is type(cfg) and again == cfg
    (tmp_path / "adapter_config.json").write_text(cfg.to_json_string())
    assert mp.PeftConfig.from_json_file(tmp_path) == cfg


def test_config_errors_are_specific():
    with pytest.raises(mp.ConfigError, match="unknown PEFT method 'nope'; registered methods"):
        mp.get_config("nope")
    with pytest.raises(mp.ConfigError, match="unknown argument\\(s\\) \\['rank'\\] for method 'lora'"):
        mp.get_config("lora", rank=4)
    with pytest.raises(mp.ConfigError, match="unknown field"):
        mp.PeftConfig.from_dict({"method": "lora", "bogus": 1})
    with pytest.raises(mp.ConfigError, match="no 'method' key"):
        mp.PeftConfig.from_dict({"r": 4})
    with pytest.raises(mp.ConfigError, match="not 'lora'"):
        mp.LoraConfig.from_dict({"method": "ssf"})
    with pytest.raises(mp.ConfigError, match="batchnorm_stats"):
        mp.LoraConfig(batchnorm_stats="sometimes")
    with pytest.raises(mp.ConfigError, match="target_modules entries must be strings"):
        mp.LoraConfig(target_modules=[3])
    with pytest.raises(mp.ConfigError, match="norm_types"):
        mp.NormTuningConfig(norm_types=["weirdnorm"])
    with pytest.raises(mp.ConfigError, match="k must be"):
        mp.PartialConfig(k=-1)


def test_get_config_equals_class_constructor():
    assert mp.get_config("lora", r=4, alpha=32, qkv_slices="qv") == mp.LoraConfig(r=4, alpha=32, qkv_slices="qv")


# --- a third-party method, registered without touching monai_peft ---------------------------
@dataclass
class ScaleConfig(mp.PeftConfig):
    init: float = 1.0


class ScaleLayer(AdapterLayer):
    mergeable = True

    def forward(self, x):
        out = self.base_layer(x)
        adapter = self.active()
        return out if adapter is None else out * adapter.factor

    def merge_adapter_into_base(self, adapter):
        with torch.no_grad():
            self.base_layer.weight.mul_(adapter.factor)
            self.base_layer.bias.mul_(adapter.factor)

    def unmerge_adapter_from_base(self, adapter):
        with torch.no_grad():
            self.base_layer.weight.div_(adapter.factor)
            self.base_layer.bias.div_(adapter.factor)


class ScaleTuner(WrappingTuner):
    config_cls = ScaleConfig
    applies_to = "nn.Linear"

    def layer_class(self, name, module):
        return ScaleLayer if isinstance(module, nn.Linear) else None

    def build_adapter(self, name, module, layer_cls):
        holder = nn.Module()
        holder.factor = nn.Parameter(torch.tensor(self.config.init))
        return holder


def test_third_party_method_gets_the_whole_api(tmp_path):
    mp.register_method("test_scale", ScaleConfig, ScaleTuner, overwrite=True)
    assert "test_scale" in mp.list_methods()
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    fresh = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    fresh.load_state_dict(net.state_dict())
    model = mp.get_peft_model(net, mp.get_config("test_scale", init=1.0, target_modules=["2"]))
    x = torch.randn(4, 3)
    ref = net(x).detach()
    torch.testing.assert_close(model(x), ref)
    with torch.no_grad():
        model.base_model[2].adapters["default"].factor.fill_(2.0)
    torch.testing.assert_close(model(x), 2 * ref)
    model.save_adapter(tmp_path)
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(loaded(x), 2 * ref)
    plain = loaded.merge_and_unload()
    torch.testing.assert_close(plain(x), 2 * ref)


def test_registry_rejects_bad_registrations():
    with pytest.raises(mp.ConfigError, match="already registered"):
        mp.register_method("lora", ScaleConfig, ScaleTuner)
    with pytest.raises(mp.ConfigError, match="must subclass monai_peft.PeftConfig"):
        mp.register_method("x_bad", dict, ScaleTuner)
    with pytest.raises(mp.ConfigError, match="must subclass monai_peft.BaseTuner"):
        mp.register_method("x_bad", ScaleConfig, object)


def test_entry_point_plugins_are_loaded(monkeypatch):
    import types

    from monai_peft import registry

    calls = []

    class FakeEP:
        def load(self):
            def plugin():
                calls.append(1)
                mp.register_method("test_plugin_scale", ScaleConfig, ScaleTuner, overwrite=True)

            return plugin

    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(
        registry.metadata, "entry_points", lambda group: [FakeEP()] if group == registry.ENTRY_POINT_GROUP else []
    )
    assert "test_plugin_scale" in mp.list_methods()
    assert calls == [1]
    del types


# ---------------------------------------------------------------------------------------------------------
# paper presets: get_config(name, preset=...), list_presets
# ---------------------------------------------------------------------------------------------------------
def test_get_config_with_a_preset_and_overrides() -> None:
    from monai_peft.registry import list_presets

    cfg = mp.get_config("lora", preset="med-peft")
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.qkv_slices) == (4, 32.0, 0.1, "qv")
    assert cfg.scaling == 8.0  # MED-PEFT: 32 / r
    again = mp.get_config("lora", preset="med-peft", r=32, dropout=0.0)
    assert (again.r, again.alpha, again.dropout, again.qkv_slices) == (32, 32.0, 0.0, "qv")
    assert mp.get_config("lora") == mp.LoraConfig()  # no preset: the class defaults
    assert "med-peft" in list_presets("lora") and list_presets("lora") == sorted(list_presets("lora"))
    assert list_presets("ssf") == ["dutt2023"] and list_presets("vpt") == []
    everything = list_presets()
    assert everything["dka"] == ["dka-convnext", "dka-swin", "dka-vit"]
    ssf = mp.get_config("ssf", preset="dutt2023")
    assert ssf.skip_before_norm and mp.get_config("adaptformer", preset="dutt2023").input == "normed"
    dka = mp.get_config("dka", preset="dka-convnext")
    assert (dka.large_kernel, dka.small_kernel, dka.batch_norm) == (11, 5, True)
    swin = mp.get_config("dka", preset="dka-swin")
    assert (swin.large_kernel, swin.small_kernel, swin.batch_norm) == (31, 5, False)
    # a preset config round-trips like any other (the preset is resolved into the fields)
    assert mp.PeftConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


def test_preset_errors_list_the_valid_ones(monkeypatch) -> None:
    import monai_peft.paper_presets as presets
    from monai_peft.paper_presets import PaperPreset, register_paper_preset
    from monai_peft.registry import list_presets

    monkeypatch.setattr(presets, "_PRESETS", dict(presets._PRESETS))  # the test presets below do not leak

    with pytest.raises(
        mp.ConfigError,
        match=r"unknown preset 'nope' for method 'lora'; valid presets for 'lora': \['dutt2023', 'med-peft'",
    ):
        mp.get_config("lora", preset="nope")
    with pytest.raises(mp.ConfigError, match="method 'vpt' has no presets"):
        mp.get_config("vpt", preset="dutt2023")
    with pytest.raises(mp.ConfigError, match="unknown argument"):
        mp.get_config("lora", preset="med-peft", rank=4)
    with pytest.raises(mp.ConfigError, match="unknown PEFT method"):
        list_presets("nope")
    register_paper_preset(PaperPreset("lora", "test-stale", {"rank": 2}, "a test"), overwrite=True)
    with pytest.raises(mp.ConfigError, match=r"sets field\(s\) \['rank'\] that LoraConfig does not have"):
        mp.get_config("lora", preset="test-stale")
    with pytest.raises(mp.ConfigError, match="exists; pass overwrite=True"):
        register_paper_preset(PaperPreset("lora", "test-stale", {"r": 2}, "a test"))
    with pytest.raises(mp.ConfigError, match="paper counts must be given for"):
        register_paper_preset(PaperPreset("lora", "test-bad", {}, "a test", {"vit_l16": None}))  # type: ignore[dict-item]


def test_new_config_fields_validate() -> None:
    with pytest.raises(mp.ConfigError, match="input must be one of"):
        mp.AdaptFormerConfig(input="x")
    assert mp.AdapterConfig().tune_layernorm is False
    assert mp.SSFConfig().skip_before_norm is False
    assert mp.AdaptFormerConfig().input == "block"

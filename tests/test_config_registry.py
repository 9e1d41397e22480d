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
    "adapter", "adaptformer", "attention_tuning", "bitfit", "full_finetune", "linear_probe", "lora", "norm_tuning",
    "partial", "ssf", "convpass", "conv_adapter", "tsa", "fact", "vpt", "vp", "ept", "svdiff", "difffit", "dka",
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
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [FakeEP()] if group == registry.ENTRY_POINT_GROUP else [])
    assert "test_plugin_scale" in mp.list_methods()
    assert calls == [1]
    del types

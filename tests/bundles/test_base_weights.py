"""monai_peft.bundle.base_weights: the float16 base files that bundles build and ship."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from monai_peft.bundle import read_base_weights, save_base_weights
from monai_peft.checkpoint import file_sha256
from monai_peft.errors import CheckpointError


def _net() -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=2, out_channels=3, channels=(4, 8), strides=(2,))


def test_round_trip_is_the_float16_rounding_and_the_hash_is_the_file(tmp_path):
    net = _net()
    path = tmp_path / "base_model.safetensors"
    sha = save_base_weights(net, path, {"trained_on": "pat0003"})
    assert sha == file_sha256(path)
    tensors = read_base_weights(path, sha256=sha)
    assert set(tensors) == set(net.state_dict())
    for k, v in net.state_dict().items():
        assert tensors[k].dtype == torch.float32
        assert torch.equal(tensors[k], v.to(torch.float16).to(torch.float32)), k
    assert not list(tmp_path.glob("*.tmp*")), "the write left a temporary file"


def test_wrong_hash_and_missing_file_say_what_to_do(tmp_path):
    path = tmp_path / "base_model.safetensors"
    save_base_weights(_net(), path, {})
    with pytest.raises(CheckpointError, match="not the 0+ the shipped adapter was trained on"):
        read_base_weights(path, sha256="0" * 64)
    with pytest.raises(CheckpointError, match=r"not found\. Rebuild it with `python scripts/train_base.py`"):
        read_base_weights(tmp_path / "absent.safetensors", rebuild="python scripts/train_base.py")

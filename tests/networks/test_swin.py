"""SwinUNETR self-supervised encoder weights in the ``model_swinvit.pt`` layout of the MONAI model zoo."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

from monai_peft.errors import CheckpointError, ConfigError, StateDictKeyError
from monai_peft.networks.swin import (
    build_swinunetr_ssl,
    infer_swin_config,
    load_swinunetr_ssl,
    swinvit_ssl_to_monai_state_dict,
)

FEATURE = 12  # the released file uses 48; 12 keeps the test fast with the same key layout


def _ssl_file_layout(seed: int = 0) -> dict:
    """A synthetic checkpoint written like model_swinvit.pt: {"state_dict": {"module.<swinViT key>"}} with the
    MLP named fc1/fc2 and the pretraining encoder's extra final norm."""
    torch.manual_seed(seed)
    source = SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE)
    state = {}
    for key, value in source.swinViT.state_dict().items():
        key = key.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        state[f"module.{key}"] = value.clone()
    state["module.norm.weight"] = torch.ones(16 * FEATURE)
    state["module.norm.bias"] = torch.zeros(16 * FEATURE)
    return {"state_dict": state, "global_step": 450}


@pytest.fixture(scope="module")
def ssl_checkpoint() -> dict:
    return _ssl_file_layout()


@pytest.fixture
def ssl_file(ssl_checkpoint: dict, tmp_path: Path) -> Path:
    path = tmp_path / "model_swinvit.pt"
    torch.save(ssl_checkpoint, path)
    return path


def test_layout_matches_monai_load_from(ssl_file: Path, ssl_checkpoint: dict) -> None:
    """MONAI's own SwinUNETR.load_from reads this layout; our loader must fill swinViT identically."""
    torch.manual_seed(1)
    ours = SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE)
    report = load_swinunetr_ssl(ours, ssl_file)
    assert report.ok and report.source == str(ssl_file)
    assert set(report.ignored) == {"norm.weight", "norm.bias"}
    assert len(report.loaded) == len(ours.swinViT.state_dict())

    torch.manual_seed(2)
    reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE)
    reference.load_from(ssl_checkpoint)
    ours_sd, ref_sd = ours.swinViT.state_dict(), reference.swinViT.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for key in ours_sd:
        assert torch.equal(ours_sd[key], ref_sd[key]), key


def test_fc_names_are_mapped(ssl_checkpoint: dict) -> None:
    state, ignored = swinvit_ssl_to_monai_state_dict(ssl_checkpoint["state_dict"])
    assert "layers2.0.blocks.1.mlp.linear1.weight" in state and "layers2.0.blocks.1.mlp.fc1.weight" not in state
    assert not any(k.startswith("module.") for k in state)
    assert ignored["norm.weight"].startswith("final norm of the pretraining encoder")


def test_sslhead_and_full_model_layouts(ssl_checkpoint: dict) -> None:
    base = {k[len("module.") :]: v for k, v in ssl_checkpoint["state_dict"].items()}
    sslhead = {f"module.swin_vit.{k}": v for k, v in base.items()}  # old SSLHead naming
    sslhead["module.rotation_head.weight"] = torch.zeros(4, 16 * FEATURE)
    sslhead["module.contrastive_head.weight"] = torch.zeros(512, 16 * FEATURE)
    sslhead["module.conv.0.weight"] = torch.zeros(1)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE)
    report = load_swinunetr_ssl(model, state_dict={"state_dict": sslhead})
    assert report.ok
    assert report.ignored["rotation_head.weight"] == "SSL pretraining head"  # keys reported without "module."
    assert report.ignored["conv.0.weight"] == "SSL pretraining head"

    full = {f"swinViT.{k}": v for k, v in model.swinViT.state_dict().items()}
    full.update({"encoder1.layer.conv1.conv.weight": torch.zeros(1), "out.conv.conv.weight": torch.zeros(1)})
    report = load_swinunetr_ssl(SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE), state_dict=full)
    assert report.ok and report.ignored["out.conv.conv.weight"] == "outside swinViT (decoder / head)"


def test_strict_errors_name_missing_and_unexpected(ssl_checkpoint: dict) -> None:
    state = dict(ssl_checkpoint["state_dict"])
    del state["module.layers3.0.blocks.1.attn.qkv.weight"]
    state["module.layers1.0.blocks.0.attn.extra_gate"] = torch.zeros(3)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=FEATURE)
    with pytest.raises(StateDictKeyError) as info:
        load_swinunetr_ssl(model, state_dict={"state_dict": state})
    message = str(info.value)
    assert "layers3.0.blocks.1.attn.qkv.weight" in message and "layers1.0.blocks.0.attn.extra_gate" in message
    assert info.value.missing == ["layers3.0.blocks.1.attn.qkv.weight"]
    report = load_swinunetr_ssl(model, state_dict={"state_dict": state}, strict=False)
    assert report.missing == ["layers3.0.blocks.1.attn.qkv.weight"]
    assert report.unexpected == ["layers1.0.blocks.0.attn.extra_gate"]
    assert len(report.loaded) == len(model.swinViT.state_dict()) - 1


def test_wrong_architecture_is_a_shape_error(ssl_file: Path) -> None:
    with pytest.raises(StateDictKeyError, match="shape mismatches"):
        load_swinunetr_ssl(SwinUNETR(in_channels=1, out_channels=2, feature_size=24), ssl_file)


def test_in_channel_adaptation_and_v2(ssl_checkpoint: dict) -> None:
    model = SwinUNETR(in_channels=4, out_channels=3, feature_size=FEATURE, use_v2=True)  # e.g. 4 MR sequences
    report = load_swinunetr_ssl(model, state_dict=ssl_checkpoint)
    assert report.ok
    assert report.adapted == {"patch_embed.proj.weight": "in-channels 1 -> 4"}
    assert report.fresh and all(k.startswith(("layers1c", "layers2c", "layers3c", "layers4c")) for k in report.fresh)
    original = ssl_checkpoint["state_dict"]["module.patch_embed.proj.weight"]
    assert torch.allclose(model.swinViT.patch_embed.proj.weight, original.repeat(1, 4, 1, 1, 1) / 4)
    with pytest.raises(StateDictKeyError, match="patch_embed.proj.weight"):
        load_swinunetr_ssl(
            SwinUNETR(in_channels=4, out_channels=3, feature_size=FEATURE),
            state_dict=ssl_checkpoint,
            adapt_in_channels=False,
        )


def test_build_infers_architecture(ssl_file: Path, ssl_checkpoint: dict) -> None:
    config = infer_swin_config(ssl_checkpoint["state_dict"])
    assert config == {
        "in_channels": 1,
        "feature_size": FEATURE,
        "patch_size": 2,
        "depths": (2, 2, 2, 2),
        "num_heads": (3, 6, 12, 24),
        "window_size": 7,
        "spatial_dims": 3,
    }
    model, report = build_swinunetr_ssl(ssl_file, out_channels=3)
    assert report.ok and not model.training
    with torch.no_grad():  # encoder features at strides 2..32 (the full UNet needs >= 64^3 inputs)
        hidden = model.swinViT(torch.rand(1, 1, 32, 32, 32))
    assert [tuple(h.shape) for h in hidden] == [
        (1, FEATURE * 2**i, 32 // 2 ** (i + 1), 32 // 2 ** (i + 1), 32 // 2 ** (i + 1)) for i in range(5)
    ]
    with pytest.raises(ConfigError, match="feature_size=48 does not match"):
        build_swinunetr_ssl(ssl_file, feature_size=48)
    with pytest.raises(CheckpointError, match="not a Swin-ViT encoder"):
        infer_swin_config({"conv.weight": torch.zeros(1)})

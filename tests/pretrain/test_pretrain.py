"""monai-peft pretrain: MAE on real 2D (PneumoniaMNIST) and 3D (BraTS) images, export, loading, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from monai_peft.errors import CheckpointError, ConfigError, InputDataError
from monai_peft.pretrain import (
    MAEPretrainConfig,
    PretrainFolderError,
    build_mae,
    load_mae_vit_with_report,
    load_unlabelled,
    patchify,
    pretrain_mae,
)
from monai_peft.pretrain.backbone import encoder_state_from_mae
from tests.conftest import require_shared
from tests.pretrain.helpers import TINY_MAE, real_npz, tiny_pretrained


def _cfg(data: Path, out: Path, **kw) -> MAEPretrainConfig:
    return MAEPretrainConfig(data=str(data), out=str(out), **{**TINY_MAE, **kw})


@pytest.mark.parametrize("size", [(8, 12), (8, 12, 16)])
def test_patchify_follows_the_conv_patch_embedding_token_order(size):
    """Token n of patchify is exactly the pixels the conv patch embedding turns into token n (non-square grids)."""
    p, c = 4, 2
    d = len(size)
    conv = (torch.nn.Conv2d if d == 2 else torch.nn.Conv3d)(c, p**d * c, p, stride=p, bias=False)
    # one-hot kernels: output channel j copies input value j of the patch in patchify's (p1, p2[, p3], C) order
    w = torch.zeros(p**d * c, c, *([p] * d))
    for j, idx in enumerate(np.ndindex(*([p] * d), c)):
        w[(j, idx[-1], *idx[:-1])] = 1.0
    conv.weight.data = w
    x = torch.randn(3, c, *size)
    tokens = conv(x).flatten(2).transpose(1, 2)  # MONAI PatchEmbeddingBlock: "b c h w -> b (h w) c"
    assert torch.equal(patchify(x, p), tokens)


def test_unlabelled_npz_2d_non_square(tmp_path):
    npz = real_npz(tmp_path, n=10)
    data = load_unlabelled(npz, image_size=(12, 20))
    assert data.images.shape == (10, 1, 12, 20) and data.spatial_dims == 2 and data.native_size == (28, 28)
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    native = load_unlabelled(npz)
    with np.load(npz) as f:
        assert torch.allclose(native.images[:, 0], torch.from_numpy(f["train_images"] / 255.0).float())


def test_loss_decreases_on_real_2d_images_and_the_export_loads_as_the_study_vit(tmp_path):
    from monai_peft.networks import load_backbone
    from monai_peft.study.models import build_classifier
    from monai_peft.study.schema import BackboneSpec

    out = tiny_pretrained(tmp_path, image_size=(12, 16), epochs=6, batch_size=64)  # 64 images: one step per epoch
    meta = json.loads((out / "mae_vit.json").read_text())
    losses = meta["pretraining"]["epoch_loss"]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
    assert meta["architecture"]["img_size"] == [12, 16] and meta["pretraining"]["images"] == 64
    assert (out / "history.json").is_file() and (out / "checkpoint.pt").is_file()

    mae = build_mae(_cfg(out, out), 2, 1, (12, 16))
    mae.load_state_dict(load_file(str(out / "mae.safetensors")))
    enc = encoder_state_from_mae(mae.state_dict(), 2)
    # the study's ViT (mae_vit backbone, pretraining size) carries the MAE encoder's weights exactly
    net, head = build_classifier(BackboneSpec("mae_vit", source=str(out)), 2, 1, 16)
    assert head == ["head"]
    assert net.spec.img_size == (16, 16)  # the study is square: positions resampled 3x4 -> 4x4
    exact, _ = load_mae_vit_with_report(out, num_classes=2, global_pool="token")
    state = exact.state_dict()
    for key, value in enc.items():
        assert torch.equal(state["vit." + key], value), key
    via_registry = load_backbone("mae_vit", str(out), num_classes=3)
    assert via_registry(torch.rand(2, 1, 12, 16)).shape == (2, 3)
    # and it computes what the MAE encoder computes on all (unmasked) tokens
    x = torch.rand(2, 1, 12, 16)
    with torch.no_grad():
        t = mae.patch_embedding(x)
        t = mae.blocks(torch.cat([mae.cls_token.expand(2, -1, -1), t], dim=1))
        ours = exact.eval().forward_features(x)["tokens"]
    assert torch.allclose(ours, t, atol=1e-6)


def test_3d_nifti_folder_anisotropic(tmp_path):
    brats = require_shared("brats")
    cfg = _cfg(brats, tmp_path / "mae3d", pattern="*/Flair*.nii.gz", image_size=(16, 24, 20), epochs=4, batch_size=4)
    res = pretrain_mae(cfg)
    arch = res["architecture"]
    assert arch["spatial_dims"] == 3 and arch["img_size"] == [16, 24, 20] and res["pretraining"]["images"] == 4
    losses = res["pretraining"]["epoch_loss"]
    assert losses[-1] < losses[0], losses
    vit, report = load_mae_vit_with_report(tmp_path / "mae3d", num_classes=2)
    assert report.ok
    enc = load_file(str(tmp_path / "mae3d" / "encoder.safetensors"))
    state = vit.state_dict()
    assert all(torch.equal(state[k], v) for k, v in enc.items())
    logits, hidden = vit(torch.rand(1, 1, 16, 24, 20))
    assert logits.shape == (1, 2) and len(hidden) == 2
    bigger, rep = load_mae_vit_with_report(tmp_path / "mae3d", img_size=(16, 32, 20))
    assert bigger(torch.rand(1, 1, 16, 32, 20))[0].shape == (1, arch["hidden_size"]) and "token grid" in str(
        rep.adapted
    )


def test_resume_after_a_kill_continues_from_the_saved_step(tmp_path, monkeypatch):
    import monai_peft.pretrain.mae as mae_mod

    npz = real_npz(tmp_path, n=64)
    opts = {"image_size": (12, 12), "epochs": 2, "batch_size": 16, "save_every": 1}  # 4 steps per epoch
    full = pretrain_mae(_cfg(npz, tmp_path / "full", **opts))
    # a "kill" at step 6: the loss raises inside the step, after 5 saved steps
    calls = {"n": 0}
    real_loss = mae_mod.mae_loss

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("killed")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(mae_mod, "mae_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain_mae(_cfg(npz, tmp_path / "killed", **opts))
    monkeypatch.setattr(mae_mod, "mae_loss", real_loss)
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert int(ckpt["step"]) == 5 and not (tmp_path / "killed" / "encoder.safetensors").exists()
    assert not list((tmp_path / "killed").glob(".*.tmp"))  # atomic writes leave no partial files
    with pytest.raises(PretrainFolderError, match="--resume"):
        pretrain_mae(_cfg(npz, tmp_path / "killed", **opts))
    resumed = pretrain_mae(_cfg(npz, tmp_path / "killed", **opts), resume=True)
    assert resumed["step"] == full["step"] == 8
    a = load_file(str(tmp_path / "full" / "mae.safetensors"))
    b = load_file(str(tmp_path / "killed" / "mae.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same weights as the uninterrupted run
    assert resumed["pretraining"]["epoch_loss"] == full["pretraining"]["epoch_loss"]
    with pytest.raises(PretrainFolderError, match="mask_ratio"):
        pretrain_mae(_cfg(npz, tmp_path / "killed", **{**opts, "mask_ratio": 0.5}), resume=True)


def test_max_steps_stops_and_resume_finishes(tmp_path):
    npz = real_npz(tmp_path, n=32)
    opts = {"image_size": (8, 8), "epochs": 1, "batch_size": 8}
    part = pretrain_mae(_cfg(npz, tmp_path / "run", max_steps=2, tensorboard=True, **opts))
    assert part == {"finished": False, "step": 2, "total_steps": 4, "out": str(tmp_path / "run")}
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))  # TensorBoard log
    with pytest.raises(ConfigError, match="has not finished"):
        load_mae_vit_with_report(tmp_path / "run")
    done = pretrain_mae(_cfg(npz, tmp_path / "run", **opts), resume=True)
    assert done["finished"] and done["step"] == 4


def test_bad_input_gives_clear_errors(tmp_path):
    empty = tmp_path / "empty.npz"
    np.savez(empty, train_images=np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(InputDataError, match="holds no images"):
        pretrain_mae(_cfg(empty, tmp_path / "o1"))
    nokey = tmp_path / "nokey.npz"
    np.savez(nokey, images=np.zeros((4, 28, 28), np.uint8))
    with pytest.raises(InputDataError, match="train_images"):
        load_unlabelled(nokey)
    npz = real_npz(tmp_path, n=8)
    with pytest.raises(ConfigError, match="3 dimensions but the data"):
        pretrain_mae(_cfg(npz, tmp_path / "o2", image_size=(16, 16, 16)))
    with pytest.raises(ConfigError, match="not 3D"):
        pretrain_mae(_cfg(npz, tmp_path / "o3", spatial_dims=3))
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        pretrain_mae(_cfg(npz, tmp_path / "o4", image_size=(14, 14)))
    with pytest.raises(ConfigError, match="mask_ratio"):
        pretrain_mae(_cfg(npz, tmp_path / "o5", mask_ratio=1.0))
    with pytest.raises(ConfigError, match="divisible by 6 for 3D"):
        pretrain_mae(_cfg(require_shared("brats"), tmp_path / "o6", pattern="*/Flair*", hidden_size=32))
    weird = tmp_path / "weird.npz"
    np.savez(weird, train_images=np.zeros((4, 2, 3, 4, 5, 6), np.uint8))
    with pytest.raises(InputDataError, match="expected"):
        load_unlabelled(weird)
    (tmp_path / "nonifti").mkdir()
    with pytest.raises(InputDataError, match="no NIfTI files"):
        load_unlabelled(tmp_path / "nonifti")
    with pytest.raises(InputDataError, match="does not exist"):
        load_unlabelled(tmp_path / "missing.npz")
    for bad in ("o1", "o2", "o3", "o4", "o5", "o6"):
        assert not (tmp_path / bad).exists()  # nothing written before the checks passed
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("someone else's")
    with pytest.raises(PretrainFolderError, match="not empty"):
        pretrain_mae(_cfg(npz, busy, image_size=(8, 8)))


def test_loader_refuses_foreign_or_tampered_folders(tmp_path):
    with pytest.raises(ConfigError, match="monai-peft pretrain"):
        load_mae_vit_with_report(tmp_path / "nothing")
    out = tiny_pretrained(tmp_path, image_size=(8, 8), epochs=1)
    with pytest.raises(ConfigError, match="unknown mae_vit option"):
        load_mae_vit_with_report(out, img_sz=8)
    with pytest.raises(ConfigError, match="multiple of the MAE-ViT's patch size"):
        load_mae_vit_with_report(out, img_size=10)
    meta = json.loads((out / "mae_vit.json").read_text())
    meta["encoder_sha256"] = "0" * 64
    (out / "mae_vit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_mae_vit_with_report(out)
    meta["format"] = "something_else"
    (out / "mae_vit.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="monai_peft.mae_vit"):
        load_mae_vit_with_report(out)


def test_cli_pretrain(tmp_path, capsys):
    from monai_peft.cli import main

    npz = real_npz(tmp_path, n=16)
    args = ["pretrain", str(npz), "--out", str(tmp_path / "cli"), "--image-size", "8", "12", "--epochs", "1"]
    args += ["--hidden-size", "24", "--num-layers", "1", "--num-heads", "2", "--decoder-hidden-size", "8"]
    args += ["--decoder-layers", "1", "--decoder-heads", "2", "--no-progress", "--no-tensorboard"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "pretrained on 16 images" in text and "name: mae_vit" in text
    assert main(args) == 2  # the folder holds a run: refused without --resume
    assert "--resume" in capsys.readouterr().err

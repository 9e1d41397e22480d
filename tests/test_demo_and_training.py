"""The demo end to end on real PneumoniaMNIST (tiny settings), and the training loop's resume."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader

import monai_peft as mp
from monai_peft.data import MedMNISTDataset
from monai_peft.training import evaluate_classifier, fit_classifier
from tests.conftest import require_shared
from tests.helpers import tiny_vit


def test_demo_runs_end_to_end_on_real_data(tmp_path, capsys):
    npz = require_shared("medmnist/pneumoniamnist_28.npz")
    from monai_peft.demo import run_demo

    res = run_demo("lora", data=str(npz), fraction=0.02, epochs=1, image_size=64, out_dir=str(tmp_path / "demo"))
    out = capsys.readouterr().out
    assert "PneumoniaMNIST (real" in res.data_source and "trainable params:" in out and "test AUC" in out
    assert res.train_images == 94  # 2 % of 1214 normal + 3494 pneumonia, rounded per class
    assert 0 < res.trainable_parameters < 0.05 * res.all_parameters
    assert 0.0 <= res.test_auc <= 1.0 and 0.0 <= res.val_auc <= 1.0
    assert 0 < res.adapter_bytes < 2_000_000
    assert (tmp_path / "demo" / "best" / "adapter_model.safetensors").is_file()


def test_demo_cli_reports_a_missing_data_file(capsys):
    from monai_peft.cli import main

    assert main(["demo", "--data", "/nonexistent/pneumonia.npz"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _loaders():
    train = MedMNISTDataset.synthetic(split="train", n_classes=2, seed=0, n_train=32, n_val=16, n_test=16)
    val = MedMNISTDataset.synthetic(split="val", n_classes=2, seed=0, n_train=32, n_val=16, n_test=16)
    return DataLoader(train, batch_size=8, shuffle=False), DataLoader(val, batch_size=16)


def test_fit_resumes_from_last_checkpoint(tmp_path):
    torch.manual_seed(0)
    train, val = _loaders()
    net = tiny_vit(2, img=28, patch=7, classes=2)
    model = mp.get_peft_model(net, mp.LoraConfig(r=2), modules_to_save=["classification_head"])
    first = fit_classifier(
        model, train, val, num_classes=2, epochs=1, out_dir=tmp_path, progress=False, tensorboard=False
    )
    assert first.epochs_run == 1 and len(first.history) == 1
    assert (tmp_path / "last" / "trainer_state.pt").is_file() and (tmp_path / "best" / "adapter_config.json").is_file()
    saved = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    with torch.no_grad():  # scramble the live adapter: resuming must restore the saved one
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    second = fit_classifier(
        model, train, val, num_classes=2, epochs=2, out_dir=tmp_path, progress=False, tensorboard=False
    )
    assert second.epochs_run == 2 and [h["epoch"] for h in second.history] == [2]
    assert not all(torch.equal(saved[k], v) for k, v in model.adapter_state_dict().items())  # trained on
    metrics = evaluate_classifier(model, val, num_classes=2)
    assert set(metrics) == {"auc", "acc"}


def test_fit_rejects_plain_or_frozen_models(tmp_path):
    train, val = _loaders()
    with pytest.raises(mp.ConfigError, match="wrap the network with get_peft_model"):
        fit_classifier(tiny_vit(2, img=28, patch=7), train, val, num_classes=2, out_dir=tmp_path)
    model = mp.get_peft_model(tiny_vit(2, img=28, patch=7), mp.LoraConfig(r=2))
    model.save_adapter(tmp_path / "a")
    frozen = mp.PeftModel.from_pretrained(model.unload(), tmp_path / "a")
    with pytest.raises(mp.ConfigError, match="no trainable parameter"):
        fit_classifier(frozen, train, val, num_classes=2, out_dir=tmp_path)

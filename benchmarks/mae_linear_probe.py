"""How linearly separable are the features of a ``monai-peft pretrain`` encoder? (a backbone check, no PEFT)

For every MAE-ViT folder given, the frozen encoder embeds the PneumoniaMNIST train / val / test images (the
mean of the patch tokens, layer-normalised: the input of the study's head), a logistic regression is fitted to
convergence on the training features (scikit-learn, L-BFGS; the inverse regularisation ``C`` chosen on the
validation AUROC), and the test AUROC of the chosen ``C`` is printed. A randomly initialised encoder of the same
architecture is the baseline measured in the same run. The scale of the features is printed too: over the
channels, the mean of ``|mu_c|`` and of ``sigma_c`` (mean and standard deviation of channel ``c`` across the
training images); a small ``sigma/|mu|`` is the bad conditioning that a plain linear head trained by SGD/AdamW
suffers from and MAE's BatchNorm before the head (``head_norm: batchnorm``) removes.

    python benchmarks/mae_linear_probe.py runs/mae_pneumoniamnist runs/mae_e80_npl

It reads test labels only after ``C`` is chosen on validation. Record results in docs/study.md with the command.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from monai_peft.pretrain.backbone import load_mae_vit
from monai_peft.study.run import prepare_images

DEFAULT_DATA = Path("../shared/data/medmnist/pneumoniamnist_28.npz")


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray, mean: float, std: float, batch: int = 512) -> np.ndarray:
    """``(N, H, W)`` uint8 images -> ``(N, C)`` pooled features of the frozen encoder (the study's input scaling)."""
    out = []
    for i in range(0, len(images), batch):
        out.append(model(prepare_images(images[i : i + batch], images.shape[1], mean, std)).numpy())
    return np.concatenate(out)


def probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], test_x: np.ndarray):
    """Choose C on validation AUROC; return ``(C, val AUROC, test scores)``."""
    scaler = StandardScaler().fit(train[0])
    best = (-1.0, 0.0, None)
    for c in (1e-3, 1e-2, 1e-1, 1.0, 10.0):
        clf = LogisticRegression(C=c, max_iter=5000).fit(scaler.transform(train[0]), train[1])
        auc = roc_auc_score(val[1], clf.predict_proba(scaler.transform(val[0]))[:, 1])
        if auc > best[0]:
            best = (auc, c, clf)
    auc, c, clf = best
    return c, auc, clf.predict_proba(scaler.transform(test_x))[:, 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="monai-peft pretrain --out folders")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--mean", type=float, default=0.0)
    parser.add_argument("--std", type=float, default=1.0)
    args = parser.parse_args()
    if not args.data.is_file():
        parser.error(f"{args.data} not found: pass --data PATH to pneumoniamnist_28.npz (see ../shared/data/README.md)")
    torch.manual_seed(0)
    data = np.load(args.data, allow_pickle=False)
    labels = {s: data[f"{s}_labels"].reshape(-1) for s in ("train", "val", "test")}
    rows = []
    for folder in [None, *args.folders]:
        t0 = time.perf_counter()
        if folder is None:
            model = load_mae_vit(args.folders[0], num_classes=0)
            for p in model.parameters():  # same architecture, random weights: the baseline
                if p.dim() > 1:
                    torch.nn.init.trunc_normal_(p, std=0.02)
            name, epochs = "random init (baseline)", 0
        else:
            model = load_mae_vit(folder, num_classes=0)
            meta = json.loads((folder / "mae_vit.json").read_text())
            name, epochs = str(folder), meta["pretraining"]["epochs"]
        feats = {s: embed(model.eval(), data[f"{s}_images"], args.mean, args.std) for s in labels}
        c, val_auc, scores = probe((feats["train"], labels["train"]), (feats["val"], labels["val"]), feats["test"])
        test_auc = roc_auc_score(labels["test"], scores)  # read once, after C was chosen on validation
        mu, sigma = np.abs(feats["train"].mean(0)).mean(), feats["train"].std(0).mean()
        rows.append((name, epochs, mu, sigma, c, val_auc, test_auc, time.perf_counter() - t0))
    head = f"{'encoder':32s} {'epochs':>6s} {'|mu|':>6s} {'sigma':>6s} {'C':>7s} {'val AUROC':>9s} {'test AUROC':>10s}"
    print(head + f" {'s':>6s}")
    for name, epochs, mu, sigma, c, val_auc, test_auc, sec in rows:
        print(f"{name:32s} {epochs:6d} {mu:6.3f} {sigma:6.3f} {c:7.0e} {val_auc:9.4f} {test_auc:10.4f} {sec:6.1f}")


if __name__ == "__main__":
    main()

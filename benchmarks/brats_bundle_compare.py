"""BraTS bundle comparison: LoRA adapter vs full fine-tuning (same base) vs training from scratch.

All three train the bundle's SwinUNETR (``bundles/brats_mri_swinunetr_lora``: FLAIR + T1c, 3 mm, 64^3 patches) for
4-class tumour sub-region segmentation with the same loop (``brats_swinunetr.fit``: DiceCE, AdamW, batch 1, one CPU
thread), epochs, learning rate and data split, and are then evaluated the way the bundle's inference runs: the
inference preprocessing, ``PeftSlidingWindowInferer`` (LoRA merged), inversion to the original 1 mm grid, Dice per
class against the manual ``OTMultiClass`` labels of the held-out case.

Split (4 cases only): train pat0003 + pat0004, validation (model selection) pat0005, held-out test pat0006. The
base (``models/base``) was trained on the same two training cases for whole-tumour segmentation
(``scripts/train_base.py``), never on pat0005 / pat0006.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/brats_bundle_compare.py --variant scratch   # each variant ~10-15 min
    OMP_NUM_THREADS=1 python benchmarks/brats_bundle_compare.py --variant lora --install
    OMP_NUM_THREADS=1 python benchmarks/brats_bundle_compare.py --variant full
    python benchmarks/brats_bundle_compare.py --table        # merge results/brats_compare_*.json into the table

Each variant writes ``benchmarks/results/brats_compare_<variant>.json``; ``--install`` copies the LoRA adapter to the
bundle's ``models/adapter`` (replacing the shipped one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brats_mri_swinunetr_lora"
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(BUNDLE / "scripts"))

import brats_swinunetr as bs  # noqa: E402

from monai_peft.checkpoint import file_sha256  # noqa: E402

TRAIN = ("brats_2013_pat0003_1", "brats_2013_pat0004_1")
VAL = ("brats_2013_pat0005_1",)
TEST = ("brats_2013_pat0006_1",)
VARIANTS = ("lora", "dka", "decoder", "full", "scratch")
LORA = {
    "r": 8,
    "alpha": 16.0,
    "qkv_slices": "qv",
    "target_modules": bs.LORA_TARGETS,
    "modules_to_save": list(bs.HEAD_MODULES),
}


def default_data_root() -> Path:
    env = os.environ.get("MONAI_PEFT_SHARED_DATA")
    return Path(env) / "brats" if env else ROOT.parent / "shared" / "data" / "brats"


def build(variant: str, base_file: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(trained module, module to evaluate) for ``variant``."""
    import monai_peft as mp

    if variant == "scratch":
        net = bs.build_network(5, seed=0)
        return net, net
    base = bs.load_base_network(base_file, 5)
    if variant == "full":
        return base, base
    cfg = mp.LoraConfig(
        r=LORA["r"], alpha=LORA["alpha"], qkv_slices=LORA["qkv_slices"], target_modules=LORA["target_modules"]
    )
    if variant == "dka":  # one Dual-Kernel Adapter after every Swin block (the preset), + the head
        cfg = mp.get_config("dka")
    elif variant == "decoder":  # the Swin encoder frozen; the CNN encoder/decoder convs and the head trained
        decoder = [name for name, _ in base.named_children() if name != "swinViT"]
        cfg = mp.get_config("partial", target_modules=decoder, k=len(decoder), include_head=False)
    model = mp.get_peft_model(base, cfg, modules_to_save=LORA["modules_to_save"] if variant != "decoder" else None)
    return model, model


def evaluate_case(network: torch.nn.Module, case: dict, roi=(64, 64, 64)) -> dict:
    """Bundle-style inference on one case, on the original grid: Dice per class + regions, and the time it took."""
    from monai.transforms import LoadImage

    from monai_peft.inference import InvertToOriginald, PeftSlidingWindowInferer

    pre = bs.preprocessing("inference")
    t0 = time.time()
    d = pre({"image": case["image"]})
    inferer = PeftSlidingWindowInferer(roi_size=list(roi), sw_batch_size=1, overlap=0.25, mode="gaussian")
    with torch.no_grad():
        logits = inferer(d["image"][None], network)
    d["pred"] = torch.as_tensor(logits[0]).argmax(0, keepdim=True).float()  # (1, X, Y, Z) on the 3 mm grid
    d = InvertToOriginald(keys="pred", preprocessing=pre, orig_key="image")(d)
    seconds = time.time() - t0
    pred = torch.as_tensor(d["pred"]).round().long()
    label = LoadImage(image_only=True, ensure_channel_first=True)(case["label"]).long()
    assert pred.shape == label.shape, (pred.shape, label.shape)
    per = bs.dice_per_class(pred, label, 5)

    def region(values: tuple[int, ...]) -> float:
        p, g = torch.isin(pred, torch.tensor(values)), torch.isin(label, torch.tensor(values))
        return 2.0 * int((p & g).sum()) / max(int(p.sum()) + int(g.sum()), 1)

    return {
        "case": case["case"],
        "dice": {bs.CLASS_NAMES[c]: per[c - 1] for c in range(1, 5)},
        "mean_dice_4_classes": float(np.nanmean(per)),
        "whole_tumour_dice": region((1, 2, 3, 4)),
        "tumour_core_dice": region((1, 3, 4)),
        "enhancing_dice": region((4,)),
        "inference_s": round(seconds, 1),
    }


def run_variant(args: argparse.Namespace) -> dict:
    from monai.data import CacheDataset
    from monai.utils import set_determinism

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    base_file = Path(args.base_file)
    train = CacheDataset(bs.brats_cases(args.data_root, TRAIN), bs.preprocessing("train"), progress=False)
    val = CacheDataset(bs.brats_cases(args.data_root, VAL), bs.preprocessing("validate"), progress=False)
    trained, evaluated = build(args.variant, base_file)
    n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in trained.parameters())
    result = bs.fit(
        trained, train, val, num_classes=5, epochs=args.epochs, lr=args.lr, val_every=args.val_every,
        log=lambda s: print(f"[{args.variant}] {s}", flush=True),
    )  # fmt: skip
    work = Path(args.work_dir) / args.variant
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if args.variant in ("lora", "dka", "decoder"):
        adapter_dir = trained.save_adapter(work / "adapter")
        files = [adapter_dir / "adapter_model.safetensors"]
        if args.install and args.variant == "lora":
            dst = BUNDLE / "models" / "adapter"
            tmp = dst.with_name(".adapter.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(adapter_dir, tmp)
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
    else:
        from safetensors.torch import save_file

        files = [work / "model.safetensors"]
        save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(files[0]))
    test = [evaluate_case(evaluated, c) for c in bs.brats_cases(args.data_root, TEST)]
    out = {
        "variant": args.variant,
        "trainable_params": n_train,
        "total_params": n_total,
        "saved_file_mb": round(sum(f.stat().st_size for f in files) / 1e6, 3),
        "train_wall_s": result["wall_s"],
        "best_val_mean_dice": result["best_metric"],
        "best_epoch": result["best_epoch"],
        "epochs": args.epochs,
        "lr": args.lr,
        "seed": args.seed,
        "lora": LORA if args.variant == "lora" else None,
        "peft_config": trained.peft_config["default"].to_dict() if hasattr(trained, "peft_config") else None,
        "base_sha256": file_sha256(base_file) if args.variant != "scratch" else None,
        "split": {"train": TRAIN, "val": VAL, "test": TEST},
        "test": test,
        "log": result["log"],
        "command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"brats_compare_{args.variant}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, path)
    print(json.dumps({k: v for k, v in out.items() if k != "log"}, indent=1))
    return out


def table() -> str:
    """Markdown table from ``results/brats_compare_*.json`` (written to ``results/brats_compare.md``)."""
    rows = [
        "| variant | trainable params | saved file (MB) | train wall (s) | best val mean Dice (epoch) | "
        "necrosis | edema | non-enhancing | enhancing | mean (4) | whole tumour | tumour core |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "lora": "LoRA r=8 (Swin q,v + decoder convs) + head, from base",
        "dka": "DKA after every Swin block + head, from base",
        "decoder": "decoder only (Swin encoder frozen), from base",
        "full": "full fine-tuning from base",
        "scratch": "from scratch",
    }
    for v in VARIANTS:
        p = RESULTS / f"brats_compare_{v}.json"
        if not p.is_file():
            continue
        r = json.loads(p.read_text())
        t = r["test"][0]
        dice = [t["dice"][bs.CLASS_NAMES[c]] for c in range(1, 5)]
        rows.append(
            f"| {names[v]} | {r['trainable_params']:,} / {r['total_params']:,} | {r['saved_file_mb']:.2f} | "
            f"{r['train_wall_s']:.0f} | {r['best_val_mean_dice']:.3f} ({r['best_epoch']}) | "
            + " | ".join(f"{x:.3f}" for x in dice)
            + f" | {t['mean_dice_4_classes']:.3f} | {t['whole_tumour_dice']:.3f} | {t['tumour_core_dice']:.3f} |"
        )
    text = "\n".join(rows) + "\n"
    (RESULTS / "brats_compare.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--data_root", default=str(default_data_root()))
    ap.add_argument("--base_file", default=str(BUNDLE / "models" / "base" / "base_model.safetensors"))
    ap.add_argument("--work_dir", default="/tmp/brats_bundle_compare")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--val_every", type=int, default=3)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--install", action="store_true", help="copy the LoRA adapter to the bundle's models/adapter")
    args = ap.parse_args(argv)
    if args.variant:
        run_variant(args)
    if args.table or not args.variant:
        print(table())


if __name__ == "__main__":
    main()

"""Rebuild the bundle's base weights: DynUNet trained from scratch on ANOTHER patient's CT (example_ct_sm).

The base is the "foundation" that the shipped LoRA adapter adapts to the DICOM series: same 6 organ / muscle
classes (:data:`ct_dynunet.CLASS_NAMES`), but a different patient, scanner, field of view and resolution
(``totalseg/example_ct_sm.nii.gz``, 122 x 101 x 30 at 3 mm, with its TotalSegmentator map ``example_seg.nii.gz``),
resampled to the bundle's 3 x 3 x 2 mm grid. It never sees the DICOM series. Offline, fixed seed, one CPU thread,
fixed number of steps; stored in float16 as ``models/base/base_model.safetensors`` (its sha256 is in the configs).

Usage (from the bundle folder; a few minutes on one free CPU core)::

    OMP_NUM_THREADS=1 python scripts/train_base.py --data_root ../../../shared/data --out models/base/base_model.safetensors

The same machine and library versions give the same file; elsewhere the last bits may differ, and the adapter's base
fingerprint check then refuses the shipped adapter: retrain it with ``configs/train.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ct_dynunet as ct

IMAGE = "totalseg/example_ct_sm.nii.gz"
LABEL = "totalseg/example_seg.nii.gz"


def main(argv: list[str] | None = None) -> dict:
    """Train the base, write it (float16 safetensors) and return a summary with the training log."""
    from monai.data import CacheDataset, DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism

    here = Path(__file__).resolve()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data_root", default=str(here.parents[4] / "shared" / "data"))
    ap.add_argument("--out", default=str(here.parents[1] / "models" / "base" / "base_model.safetensors"))
    ap.add_argument("--steps", type=int, default=400, help="optimisation steps (2 patches each)")
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    set_determinism(seed=args.seed)
    t0 = time.time()
    cases = ct.ct_cases(args.data_root, IMAGE, LABEL)
    roi = (64, 64, 16)
    train_ds = CacheDataset(cases, ct.preprocessing("train", roi_size=roi), progress=False)
    full = ct.preprocessing("validate")(cases[0])
    loader = DataLoader(train_ds, batch_size=1, shuffle=False, num_workers=0)
    net = ct.build_network(seed=args.seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    log, step = [], 0
    while step < args.steps:
        for batch in loader:
            net.train()
            opt.zero_grad()
            loss = loss_fn(net(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 10 == 0 or step == args.steps:
                log.append({"step": step, "loss": round(float(loss), 4), "time_s": round(time.time() - t0, 1)})
                print(json.dumps(log[-1]), flush=True)
            if step >= args.steps:
                break
    net.eval()
    with torch.no_grad():
        logits = sliding_window_inference(full["image"][None], list(roi), 2, net, 0.25, "gaussian")
    dice = ct.dice_per_class(logits.argmax(1)[0], full["label"][0].long())
    info = {
        "task": "6 TotalSegmentator classes (spleen, liver, stomach, aorta, autochthon L/R) on example_ct_sm",
        "network": "DynUNet(in=1, out=7, filters 8-16-32-64, strides 1,2,2,(2,2,1), instance norm)",
        "train_image": IMAGE,
        "train_label": LABEL,
        "pixdim_mm": [3.0, 3.0, 2.0],
        "roi_size": list(roi),
        "steps": args.steps,
        "patches_per_step": 2,
        "lr": args.lr,
        "seed": args.seed,
        "training_case_dice": {k: round(v, 4) for k, v in dice.items()},
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sha = ct.save_base_weights(net, args.out, info)
    summary = {**info, "file": Path(args.out).name, "sha256": sha, "wall_s": round(time.time() - t0, 1), "log": log}
    print(json.dumps({k: v for k, v in summary.items() if k != "log"}), flush=True)
    return {**summary, "out": str(args.out)}


if __name__ == "__main__":
    from monai_peft.checkpoint import atomic_write_bytes

    result = main()
    out = Path(result.pop("out")).with_suffix(".json")
    atomic_write_bytes(out, (json.dumps(result, indent=1) + "\n").encode())

"""3D sliding-window inference on a full BraTS volume (240 x 240 x 155, FLAIR + T1c): voxels/s and peak memory.

Variants, all in the same process and run, timed in alternating order (forward on even repetitions, reversed on
odd ones):

* ``merged_lora``   - :class:`monai_peft.inference.PeftSlidingWindowInferer` on a LoRA PeftModel (merged once,
  cached; ``amp="auto"``: fp32 on CPU, bf16/fp16 on GPU);
* ``dka_unmerged``  - the same inferer on a DKA PeftModel of the same base (cannot be merged);
* ``monai_plain``   - ``monai.inferers.sliding_window_inference`` in fp32 on the base network;
* ``merged_lora_channels_last`` / ``merged_lora_bf16`` / ``merged_lora_compile`` - options that may beat plain
  MONAI (channels-last memory format, bf16 autocast, ``torch.compile``).

The network is the BraTS bundle's SwinUNETR (2 input channels, feature_size 12, depths 2-2-2-2, 5 classes,
untrained weights: speed and memory do not depend on the values). ``dice_vs_merged`` compares each variant's argmax
labels with the merged fp32 ones (mean Dice over the classes present): 1.0 means the same segmentation.

Peak memory: on CPU the process's peak RSS during the variant (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; minus the RSS before the run gives ``peak_rss_delta_mb``); on GPU
``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/bench_sliding_window.py --reps 2 --out docs/benchmarks/sliding_window_cpu.json
    python benchmarks/bench_sliding_window.py --device cuda --reps 5 --roi 128 128 128 --overlap 0.5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = (
    "merged_lora",
    "dka_unmerged",
    "monai_plain",
    "merged_lora_channels_last",
    "merged_lora_bf16",
    "merged_lora_compile",
)


def _proc_status(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1]) / 1024.0  # kB -> MB
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    import monai

    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _load_volume(case: Path) -> torch.Tensor:
    import nibabel as nib

    chans = [
        np.asanyarray(nib.load(str(case / f"{m}_subtrMeanDivStd.nii.gz")).dataobj, dtype=np.float32)
        for m in ("Flair", "T1c")
    ]
    return torch.from_numpy(np.stack(chans))[None]  # (1, 2, 240, 240, 155)


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    scores = []
    for c in torch.unique(torch.cat([a.unique(), b.unique()])):
        x, y = a == c, b == c
        denom = int(x.sum()) + int(y.sum())
        if denom:
            scores.append(2.0 * int((x & y).sum()) / denom)
    return float(np.mean(scores)) if scores else 1.0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", default=str(ROOT.parent / "shared" / "data" / "brats" / "brats_2013_pat0003_1"))
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 160], help="window in voxels (multiples of 32)")
    parser.add_argument("--overlap", type=float, default=0.0)
    parser.add_argument("--sw-batch-size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--feature-size", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS[:5]), choices=VARIANTS)
    parser.add_argument("--out", default=None, help="JSON file to write (atomically)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")

    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    import monai_peft as mp
    from monai_peft.inference import PeftSlidingWindowInferer

    torch.manual_seed(0)
    volume = _load_volume(Path(args.case))
    if device.type == "cuda":
        volume = volume.to(device)
    base = SwinUNETR(in_channels=2, out_channels=5, feature_size=args.feature_size, spatial_dims=3).eval().to(device)
    lora = mp.get_peft_model(copy.deepcopy(base), mp.LoraConfig(r=8, alpha=16))
    with torch.no_grad():  # non-zero B so the merge really changes the weights
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    lora.eval()
    dka = mp.get_peft_model(copy.deepcopy(base), mp.DKAConfig()).eval()
    roi, ov, sw = tuple(args.roi), args.overlap, args.sw_batch_size
    common = dict(roi_size=roi, sw_batch_size=sw, overlap=ov, mode="gaussian", check_finite=False)

    runners: dict[str, Any] = {}
    inferers = {
        "merged_lora": (PeftSlidingWindowInferer(**common, amp="auto"), lora),
        "dka_unmerged": (PeftSlidingWindowInferer(**common, amp="auto"), dka),
        "merged_lora_channels_last": (PeftSlidingWindowInferer(**common, amp="auto", channels_last=True), lora),
        "merged_lora_bf16": (PeftSlidingWindowInferer(**common, amp="bf16"), lora),
        "merged_lora_compile": (PeftSlidingWindowInferer(**common, amp="auto", compile=True), lora),
    }
    for name in args.variants:
        if name == "monai_plain":

            def plain(x: torch.Tensor) -> torch.Tensor:
                with torch.no_grad():
                    return sliding_window_inference(x, roi, sw, base, ov, mode="gaussian")

            runners[name] = plain
        else:
            inf, net = inferers[name]
            runners[name] = lambda x, inf=inf, net=net: inf(x, net)

    # warm-up on one window: prepares (merges / compiles) and caches, outside the timing
    prepare_s: dict[str, float] = {}
    warm = volume[..., : roi[0], : roi[1], : roi[2]]
    for name, run in runners.items():
        t0 = time.perf_counter()
        run(warm)
        prepare_s[name] = time.perf_counter() - t0

    voxels = int(np.prod(volume.shape[2:]))
    times: dict[str, list[float]] = {n: [] for n in runners}
    peaks: dict[str, list[float]] = {n: [] for n in runners}
    deltas: dict[str, list[float]] = {n: [] for n in runners}
    labels: dict[str, torch.Tensor] = {}
    order = list(runners)
    for rep in range(args.reps):
        for name in order if rep % 2 == 0 else order[::-1]:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated() / 2**20
            else:
                _reset_peak_rss()
                before = _proc_status("VmRSS") or 0.0
            t0 = time.perf_counter()
            out = runners[name](volume)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() / 2**20
            else:
                peak = _proc_status("VmHWM") or float("nan")
            peaks[name].append(peak)
            deltas[name].append(peak - before)
            if name not in labels:
                labels[name] = torch.argmax(out, dim=1).to("cpu", torch.uint8)
            print(f"rep {rep} {name:28s} {times[name][-1]:8.2f} s  peak {peak:9.1f} MB", flush=True)
            del out

    ref = labels.get("merged_lora")
    results = {}
    plain_vps = voxels / statistics.median(times["monai_plain"]) if "monai_plain" in times else None
    for name in runners:
        med = statistics.median(times[name])
        vps = voxels / med
        results[name] = {
            "times_s": [round(t, 3) for t in times[name]],
            "median_s": round(med, 3),
            "voxels_per_s": round(vps, 1),
            "ratio_vs_monai_plain": round(vps / plain_vps, 3) if plain_vps else None,
            "peak_mb": round(max(peaks[name]), 1),
            "peak_delta_mb": round(max(deltas[name]), 1),
            "prepare_s": round(prepare_s[name], 3),
            "dice_vs_merged": round(_dice(labels[name], ref), 4) if ref is not None and "lora" in name else None,
        }
    report = {
        "benchmark": "sliding_window_3d",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": _machine(),
        "device": str(device),
        "memory_metric": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)",
        "volume": {"case": Path(args.case).name, "shape": list(volume.shape), "voxels": voxels},
        "network": {
            "class": "SwinUNETR",
            "feature_size": args.feature_size,
            "depths": [2, 2, 2, 2],
            "in_channels": 2,
            "out_channels": 5,
            "parameters": sum(p.numel() for p in base.parameters()),
        },
        "inference": {"roi_size": list(roi), "overlap": ov, "sw_batch_size": sw, "mode": "gaussian", "reps": args.reps},
        "results": results,
    }
    print(f"\n{'variant':28s} {'median s':>9s} {'voxels/s':>11s} {'x MONAI':>8s} {'peak MB':>9s} {'dice':>6s}")
    for name, r in results.items():
        ratio = f"{r['ratio_vs_monai_plain']:.3f}" if r["ratio_vs_monai_plain"] else "-"
        dice = f"{r['dice_vs_merged']:.4f}" if r["dice_vs_merged"] is not None else "-"
        print(f"{name:28s} {r['median_s']:9.2f} {r['voxels_per_s']:11.0f} {ratio:>8s} {r['peak_mb']:9.1f} {dice:>6s}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, out)
    return report


if __name__ == "__main__":
    main()

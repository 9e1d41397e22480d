"""LoRA vs full fine-tuning vs from scratch vs the base alone, all through the bundle's own train.json/evaluate.json.

Each variant trains with ``configs/train.json`` (same data, slabs, loss, optimiser, epochs, seed) into
``runs/compare/<variant>``, then ``configs/train.json`` + ``configs/evaluate.json`` measure Dice on the held-out
slab (RAS slices 14-19 of the DICOM series); per-class Dice, trainable parameters, saved-file size and wall time go
to ``benchmarks/results/ct_compare_<variant>.json`` (atomically). Usage (from the bundle folder)::

    OMP_NUM_THREADS=1 python scripts/compare.py --variant base
    OMP_NUM_THREADS=1 python scripts/compare.py --variant lora --install   # also installs the adapter in models/
    OMP_NUM_THREADS=1 python scripts/compare.py --variant full
    OMP_NUM_THREADS=1 python scripts/compare.py --variant scratch
    python scripts/compare.py --table

``--install`` copies the LoRA run's best adapter to ``models/adapter`` (replacing the shipped one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

BUNDLE = Path(__file__).resolve().parents[1]
RESULTS = BUNDLE.parents[1] / "benchmarks" / "results"
VARIANTS = ("base", "lora", "full", "scratch")
FULL = {"peft_config": {"_target_": "FullFinetuneConfig"}}
SCRATCH = {**FULL, "base_network": "$@helpers.build_network(@num_classes, seed=@seed)"}
OVERRIDES: dict[str, dict[str, Any]] = {"base": {}, "lora": {}, "full": FULL, "scratch": SCRATCH}


def _parser(configs: list[str], overrides: dict[str, Any]) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in configs])
    parser.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    parser["bundle_root"] = str(BUNDLE)
    for k, v in overrides.items():
        parser[k] = v
    return parser


def _run(parser: Any) -> None:
    for key in ("initialize", "run"):
        for i in range(len(parser.get(key, []))):
            parser.get_parsed_content(f"{key}#{i}", instantiate=True)


def evaluate(overrides: dict[str, Any], adapter_dir: str | None) -> dict[str, Any]:
    """Dice per class and mean on the held-out slab (evaluate.json) for ``adapter_dir`` (None: the base alone)."""
    ov = dict(overrides)
    if adapter_dir is None:
        ov["network"] = "$@base_network.to(@device).eval()"
    else:
        ov["adapter_dir"] = adapter_dir
    ov["eval_dir"] = str(BUNDLE / "runs" / "compare" / "eval_tmp")
    parser = _parser(["train.json", "evaluate.json"], ov)
    parser.parse(True)
    evaluator = parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    names = parser.get_parsed_content("class_names")
    details = evaluator.state.metric_details["val_mean_dice"].nanmean(0).tolist()
    return {
        "mean_dice": float(evaluator.state.metrics["val_mean_dice"]),
        "dice": {n: (None if math.isnan(v) else round(float(v), 4)) for n, v in zip(names, details)},
    }


def run_variant(variant: str, install: bool = False) -> dict[str, Any]:
    """Train (except ``base``) and evaluate one variant; return its result record."""
    import torch

    from monai_peft.bundle import install_adapter, unwrap_ddp

    torch.set_num_threads(1)
    ov = dict(OVERRIDES[variant])
    record: dict[str, Any] = {"variant": variant, "torch": torch.__version__}
    if variant == "base":
        parser = _parser(["train.json"], ov)
        net = parser.get_parsed_content("base_network")
        record.update(trainable=0, total=sum(p.numel() for p in net.parameters()), saved_mb=0.0, train_wall_s=0.0)
        record["test"] = evaluate(ov, None)
        return record
    out = BUNDLE / "runs" / "compare" / variant
    if out.exists():
        import shutil

        shutil.rmtree(out)
    ov["output_dir"] = str(out)
    parser = _parser(["train.json"], ov)
    parser.parse(True)
    net = unwrap_ddp(parser.get_parsed_content("network"))
    trainable, total = net.trainable_parameters()
    t0 = time.time()
    _run(parser)
    wall = time.time() - t0
    best = out / "best"
    info = json.loads((best / "checkpoint_info.json").read_text())
    size = sum(p.stat().st_size for p in best.glob("*.safetensors")) / 1e6
    record.update(
        trainable=int(trainable),
        total=int(total),
        saved_mb=round(size, 3),
        train_wall_s=round(wall, 1),
        epochs=parser.get_parsed_content("epochs"),
        best=info,
    )
    record["test"] = evaluate(ov, str(best))
    if install and variant == "lora":
        install_adapter(str(best), str(BUNDLE / "models" / "adapter"), overwrite=True)
        record["installed"] = True
    return record


def table() -> str:
    """Markdown table of the saved results."""
    rows = ["| variant | trainable / total params | saved file (MB) | train wall (s) | "
            "spleen | liver | stomach | aorta | autochthon L | autochthon R | mean (6) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in VARIANTS:
        p = RESULTS / f"ct_compare_{v}.json"
        if not p.is_file():
            continue
        r = json.loads(p.read_text())
        d = r["test"]["dice"]
        cells = " | ".join("n/a" if d[n] is None else f"{d[n]:.3f}" for n in d)
        rows.append(
            f"| {v} | {r['trainable']:,} / {r['total']:,} | {r['saved_mb']:.3f} | {r['train_wall_s']:.0f} | {cells} | "
            f"{r['test']['mean_dice']:.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS)
    ap.add_argument("--install", action="store_true")
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args(argv)
    if args.table or not args.variant:
        print(table())
        return
    from monai_peft.checkpoint import atomic_write_bytes

    record = run_variant(args.variant, install=args.install)
    text = json.dumps(record, indent=1, default=str) + "\n"
    atomic_write_bytes(RESULTS / f"ct_compare_{args.variant}.json", text.encode())
    print(text)


if __name__ == "__main__":
    sys.exit(main())

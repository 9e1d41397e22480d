"""Why do the methods of the 13-method MAE-ViT study differ? Effective receptive fields of its retrained cells.

For each method given, the cell ``(mae_vit, method, budget, seed)`` of ``pneumoniamnist_cpu_vit`` is trained again
exactly as the study trained it (same learning rate, from the published ``results.csv``; same seed, data subset
and epoch selection on validation), and the script checks that its validation AUROC equals the published one
(so the network measured is the one the study reported). Then the ERF of the last encoder block's centre token
(:func:`monai_peft.analysis.erf.compute_erf`, Luo et al. 2016: ``|d y / d x|`` summed over images) is measured
on the first ``--erf-images`` *validation* images (no test image is read), and the area ratios (share of the
28 x 28 input that holds t % of the contribution) are printed with the published test AUROC of the cell.

    OMP_NUM_THREADS=1 python benchmarks/vit_study_erf.py --out-json benchmarks/results/vit_study_erf.json \\
        --figure docs/figures/erf_mae_vit_study.png

The backbone folder is the study file's (``runs/mae_e80_npl``; set MONAI_PEFT_MAE_VIT for another).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from monai_peft.analysis.erf import THRESHOLDS, compute_erf, ratio_table, save_erf_figure
from monai_peft.study import load_study
from monai_peft.study.data import load_splits
from monai_peft.study.grid import RunCell
from monai_peft.study.run import prepare_images, train_cell

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "study" / "pneumoniamnist_cpu_vit"


def published_cells(folder: Path) -> dict[tuple[str, str, int], dict[str, str]]:
    """``{(method, budget, seed): row}`` of a published ``results.csv``."""
    with open(folder / "results.csv", newline="") as f:
        return {(r["method"], r["budget"], int(r["seed"])): r for r in csv.DictReader(f)}


def _std(values) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summary_table(rows: list[dict], methods: list[str]) -> str:
    """Markdown: per method the mean ± std over seeds of each area ratio and of the published test AUROC."""
    import numpy as np

    head = "| method | " + " | ".join(f"area ratio t = {t:.0%}" for t in THRESHOLDS) + " | test AUROC |"
    lines = [head, "|---|" + "---:|" * (len(THRESHOLDS) + 1)]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cols = [np.array([r["area_ratios"][str(t)] for r in mine]) for t in THRESHOLDS]
        cols.append(np.array([r["test_auroc"] for r in mine]))
        lines.append(f"| {m} | " + " | ".join(f"{v.mean():.4f} ± {_std(v):.4f}" for v in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", default="pneumoniamnist_cpu_vit")
    parser.add_argument("--published", type=Path, default=PUBLISHED)
    parser.add_argument("--methods", nargs="+", default=["linear_probe", "adapter", "dka", "full_finetune"])
    parser.add_argument("--budget", default="f0.01")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--layer", default="vit.blocks.3", help="encoder block whose centre token is measured")
    parser.add_argument("--erf-images", type=int, default=64)
    parser.add_argument("--out-json", type=Path)
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args()
    study = load_study(args.study)
    torch.set_num_threads(study.training.num_threads)  # the study's numerics (one thread per cell)
    cells = published_cells(args.published)
    data = load_splits(study.dataset, study.image_size)
    results, rows = {}, []
    for method, seed in [(m, s) for m in args.methods for s in args.seeds]:
        key = (method, args.budget, seed)
        if key not in cells:
            parser.error(f"{args.published / 'results.csv'} has no cell {key}")
        row = cells[key]
        t0 = time.perf_counter()
        cell = RunCell("mae_vit", method, args.budget, seed)
        model, bspec, _, selection, _ = train_cell(study, cell, float(row["lr"]), data)
        if abs(selection.val_auroc - float(row["val_auroc"])) > 1e-9:
            raise SystemExit(
                f"{method}: retrained validation AUROC {selection.val_auroc} differs from the published "
                f"{row['val_auroc']}: not the network the study reported (another backbone folder or code version?)"
            )
        images = prepare_images(data.val().images[: args.erf_images], study.input_size(bspec), bspec.mean, bspec.std)
        res = compute_erf(model, images, layer=args.layer, num_prefix_tokens=1)
        if seed == args.seeds[0]:
            results[method] = res  # the figure shows the first seed
        rows.append(
            {
                "method": method,
                "seed": seed,
                "lr": float(row["lr"]),
                "val_auroc": selection.val_auroc,
                "test_auroc": float(row["test_auroc"]),
                "area_ratios": {str(t): res.area_ratios[t] for t in THRESHOLDS},
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"{method} seed {seed}: val AUROC {selection.val_auroc:.4f} (= published)", flush=True)
    print(f"first seed ({args.seeds[0]}):\n" + ratio_table(results) + "\n")
    print(summary_table(rows, args.methods))
    if args.figure:
        title = f"ERF of {args.layer}, mae_vit, {args.budget}, seed {args.seeds[0]}"
        save_erf_figure(results, args.figure, suptitle=title)
    if args.out_json:
        meta = {"study": args.study, "budget": args.budget, "seeds": args.seeds, "layer": args.layer}
        meta |= {"erf_images": args.erf_images, "torch": torch.__version__}
        args.out_json.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""The report of a segmentation study (``task: segmentation``): CSV, JSON, a Markdown table and a PNG plot.

Files written into the results folder (atomically), beside the classification report's names:

* ``results.csv`` - one row per finished ``(backbone, method, budget, seed)`` cell: test Dice per class and mean,
  validation Dice of the chosen epoch, trainable parameters, wall time;
* ``summary.csv`` / ``summary.json`` - one row per ``(backbone, method, budget)``: test Dice per foreground class
  and the mean over classes as mean ± std over seeds (sample std, ``ddof=1``; 0 for one seed), validation Dice,
  learning rate, trainable parameters, mean wall time of a cell (training + validation + test inference);
* ``table.md`` - the summary as Markdown (:func:`seg_markdown`);
* ``params.png`` - test mean Dice vs trainable parameters (log axis), one point per (method, budget), error bars =
  std over seeds.

Dice per class of a cell is the mean over its test cases of :func:`~monai_peft.study.segmentation.dice_per_class`
(a class absent from both the prediction and the label of a case is left out of that case).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.study.metrics import mean_std
from monai_peft.study.store import write_json

__all__ = ["foreground_names", "seg_budget_label", "seg_markdown", "summarise_seg", "write_seg_report"]


def foreground_names(study: dict[str, Any]) -> list[str]:
    """Names of the foreground classes ``1..num_classes-1`` of a ``study.json`` mapping."""
    ds = study["dataset"]
    names = ds.get("class_names") or [str(i) for i in range(int(ds["num_classes"]))]
    return list(names[1:])


def seg_budget_label(budget: str) -> str:
    """``k2`` -> ``2 cases``, ``f0.5`` -> ``50% of cases``."""
    if budget.startswith("k"):
        k = int(budget[1:])
        return f"{k} case" + ("s" if k != 1 else "")
    return f"{float(budget[1:]) * 100:g}% of cases"


def _order(study: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    from monai_peft.study.report import _order as order

    return order(study)


def summarise_seg(study: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (backbone, method, budget) with at least one finished seed, in study order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["backbone"], r["method"], r["budget"])].append(r)
    classes = foreground_names(study)
    backbones, methods, budgets = _order(study)
    rows = []
    for b in backbones:
        for m in methods:
            for bud in budgets:
                recs = sorted(groups.get((b, m, bud), []), key=lambda r: r["seed"])
                if not recs:
                    continue
                row: dict[str, Any] = {
                    "backbone": b, "method": m, "method_name": recs[0]["method_name"], "budget": bud,
                    "budget_label": seg_budget_label(bud), "seeds": [r["seed"] for r in recs], "n_seeds": len(recs),
                    "train_cases": float(sum(r["train_images"] for r in recs) / len(recs)), "lr": recs[0]["lr"],
                    "trainable_parameters": recs[0]["trainable_parameters"],
                    "total_parameters": recs[0]["total_parameters"],
                }  # fmt: skip
                row["trainable_percent"] = 100.0 * row["trainable_parameters"] / max(1, row["total_parameters"])
                row["val_dice_mean"], row["val_dice_std"] = mean_std([r["selection"]["val_dice"] for r in recs])
                for c in classes:
                    row[f"test_dice_{c}_mean"], row[f"test_dice_{c}_std"] = mean_std(
                        [r["test"]["dice"].get(c) for r in recs]
                    )
                row["test_mean_dice_mean"], row["test_mean_dice_std"] = mean_std([r["test"]["mean_dice"] for r in recs])
                row["seconds_mean"], _ = mean_std([r["seconds"] for r in recs])
                rows.append(row)
    return rows


def _cell_rows(study: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    classes = foreground_names(study)
    fields = ["backbone", "method", "budget", "seed", "lr", "train_cases", "best_epoch", "val_dice",
              *[f"test_dice_{c}" for c in classes], "test_mean_dice", "trainable_parameters", "total_parameters",
              "seconds"]  # fmt: skip
    rows = []
    for r in sorted(records, key=lambda r: r["cell_id"]):
        row = {"backbone": r["backbone"], "method": r["method"], "budget": r["budget"], "seed": r["seed"],
               "lr": r["lr"], "train_cases": " ".join(r["train_cases"]), "best_epoch": r["selection"]["best_epoch"],
               "val_dice": r["selection"]["val_dice"], "test_mean_dice": r["test"]["mean_dice"],
               "trainable_parameters": r["trainable_parameters"], "total_parameters": r["total_parameters"],
               "seconds": r["seconds"]}  # fmt: skip
        row.update({f"test_dice_{c}": r["test"]["dice"].get(c) for c in classes})
        rows.append(row)
    return rows, fields


def _pm(row: dict[str, Any], name: str) -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if mean is None or mean != mean:
        return "-"
    return f"{mean:.3f} ± {std:.3f}"


def seg_markdown(study: dict[str, Any], rows: list[dict[str, Any]], expected: int | None, finished: int | None) -> str:
    """Markdown: one table per backbone, a row per (method, budget): Dice per class, mean, parameters, wall time."""
    backbones, _, _ = _order(study)
    classes = foreground_names(study)
    seeds = ", ".join(str(s) for s in study["seeds"])
    lines = [f"## {study['name']}", ""]
    if expected is not None:
        lines += [
            f"Finished cells: {finished} of {expected}. Seeds: {seeds}. Test Dice per class on the full test volumes "
            "(sliding window), mean ± std over seeds; wall = seconds per cell (training, validation, test).",
            "",
        ]
    for b in backbones:
        mine = [r for r in rows if r["backbone"] == b]
        if not mine:
            continue
        lines += [
            f"### {b}: test Dice",
            "",
            "| method | budget | trainable | " + " | ".join(classes) + " | mean Dice | val Dice | lr | wall (s) |",
            "|---|---|---:|" + "---:|" * len(classes) + "---:|---:|---:|---:|",
        ]
        for r in mine:
            trainable = f"{r['trainable_parameters']:,} ({r['trainable_percent']:.2f} %)"
            dice = " | ".join(_pm(r, f"test_dice_{c}") for c in classes)
            lines.append(
                f"| {r['method']} | {r['budget_label']} | {trainable} | {dice} | {_pm(r, 'test_mean_dice')} | "
                f"{_pm(r, 'val_dice')} | {r['lr']:.1e} | {r['seconds_mean']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plot(study: dict[str, Any], rows: list[dict[str, Any]], root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from monai_peft.study.report import save_png

    _, methods, budgets = _order(study)
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = "osD^vP*Xh<>"
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for r in rows:
        ax.errorbar(r["trainable_parameters"], r["test_mean_dice_mean"], yerr=r["test_mean_dice_std"],
                    color=colors[r["method"]], marker=markers[budgets.index(r["budget"]) % len(markers)], capsize=3,
                    ms=6)  # fmt: skip
    for m in methods:
        ax.scatter([], [], color=colors[m], marker="o", label=m)
    if len(budgets) > 1:
        for i, b in enumerate(budgets):
            ax.scatter([], [], color="gray", marker=markers[i % len(markers)], label=seg_budget_label(b))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test mean Dice over classes (mean ± std over seeds)")
    ax.set_title(f"{study['name']}: Dice vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = root / "params.png"
    save_png(fig, path)
    plt.close(fig)
    return path


def write_seg_report(root: str | Path) -> dict[str, str]:
    """Write the report files of a segmentation results folder; returns ``{kind: path}``."""
    from monai_peft.study.report import csv_bytes, expected_cells, load_records, report_paths

    root = Path(root)
    head, records = load_records(root)
    study = head["study"]
    rows = summarise_seg(study, records)
    expected = expected_cells(study)
    paths = report_paths(root)
    cell_rows, fields = _cell_rows(study, records)
    atomic_write_bytes(paths["results_csv"], csv_bytes(cell_rows, fields))
    atomic_write_bytes(
        paths["summary_csv"], csv_bytes(rows, list(rows[0]) if rows else ["backbone", "method", "budget"])
    )
    summary = {"study": study["name"], "task": "segmentation", "config_hash": head["config_hash"],
               "finished_cells": len(records), "expected_cells": expected, "rows": rows}  # fmt: skip
    write_json(paths["summary_json"], json.loads(json.dumps(summary)))
    atomic_write_bytes(paths["table"], (seg_markdown(study, rows, expected, len(records)) + "\n").encode())
    result = {k: str(v) for k, v in paths.items()}
    if rows:
        result["params"] = str(_plot(study, rows, root))
    return result

"""The study report: CSV, JSON, a Markdown table and PNG plots from the finished cells of a results folder.

Files written into the results folder (atomically):

* ``results.csv`` - one row per finished ``(backbone, method, budget, seed)`` cell;
* ``summary.csv`` / ``summary.json`` - one row per ``(backbone, method, budget)``: test AUROC / accuracy /
  macro-F1 as mean ± std over seeds (sample std, ``ddof=1``), the bootstrap 95 % CI of the seed mean
  (:func:`~monai_peft.study.metrics.bootstrap_ci` over the test images, same resamples for every seed), mean
  validation AUROC, tuned learning rate, trainable parameters;
* ``table.md`` - the summary as Markdown tables (one per backbone: methods x budgets, then every metric);
* ``fraction.png`` - test AUROC vs training fraction (log axis; K-shot budgets in their own panel), one line per
  method, error bars = std over seeds;
* ``params.png`` - test AUROC vs trainable parameters (log axis), one point per (method, budget).
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.study.grid import budget_label
from monai_peft.study.metrics import METRICS, bootstrap_ci, mean_std
from monai_peft.study.store import write_json

__all__ = ["expected_cells", "load_records", "summarise", "write_report"]

_ROW_FIELDS = [
    "backbone", "method", "budget", "seed", "lr", "train_images", "best_epoch", "val_auroc",
    "test_auroc", "test_accuracy", "test_macro_f1", "test_auroc_ci_low", "test_auroc_ci_high",
    "trainable_parameters", "total_parameters", "seconds",
]  # fmt: skip


def load_records(root: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(study.json content, finished cell records of its config hash)`` of a results folder."""
    root = Path(root)
    head = json.loads((root / "study.json").read_text())
    records = []
    for p in sorted((root / "cells").glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("config_hash") == head["config_hash"]:
            records.append(rec)
    return head, records


def _order(study: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    backbones = [b["label"] or b["name"].replace(":", "-") for b in study["backbones"]]
    methods = [m["label"] or m["name"] for m in study["methods"]]
    budgets = [f"f{float(f):g}" for f in study["budgets"]["fractions"]] + [
        f"k{int(k)}" for k in study["budgets"]["k_shots"]
    ]
    return backbones, methods, budgets


def summarise(study: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary row per (backbone, method, budget) with at least one finished seed, in study order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["backbone"], r["method"], r["budget"])].append(r)
    n_boot, boot_seed = study["metrics"]["bootstrap"], study["metrics"]["bootstrap_seed"]
    rows = []
    backbones, methods, budgets = _order(study)
    for b in backbones:
        for m in methods:
            for bud in budgets:
                recs = sorted(groups.get((b, m, bud), []), key=lambda r: r["seed"])
                if not recs:
                    continue
                labels = np.asarray(recs[0]["test_labels"])
                probs = [np.asarray(r["test_probs"]) for r in recs]
                row: dict[str, Any] = {
                    "backbone": b, "method": m, "method_name": recs[0]["method_name"], "budget": bud,
                    "budget_label": budget_label(bud), "seeds": [r["seed"] for r in recs], "n_seeds": len(recs),
                    "train_images": float(np.mean([r["train_images"] for r in recs])), "lr": recs[0]["lr"],
                    "trainable_parameters": recs[0]["trainable_parameters"], "total_parameters": recs[0]["total_parameters"],
                }  # fmt: skip
                row["trainable_percent"] = 100.0 * row["trainable_parameters"] / max(1, row["total_parameters"])
                row["val_auroc_mean"], row["val_auroc_std"] = mean_std([r["selection"]["val_auroc"] for r in recs])
                for name in METRICS:
                    row[f"test_{name}_mean"], row[f"test_{name}_std"] = mean_std([r["test"][name] for r in recs])
                    lo, hi = bootstrap_ci(probs, labels, name, n_boot=n_boot, seed=boot_seed)
                    row[f"test_{name}_ci95"] = [lo, hi]
                rows.append(row)
    return rows


def csv_bytes(rows: list[dict[str, Any]], fields: list[str]) -> bytes:
    """``rows`` as CSV with the columns ``fields`` (lists and dicts as JSON), UTF-8 bytes."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})
    return buf.getvalue().encode()


def _cell_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in sorted(records, key=lambda r: r["cell_id"]):
        rows.append({
            "backbone": r["backbone"], "method": r["method"], "budget": r["budget"], "seed": r["seed"], "lr": r["lr"],
            "train_images": r["train_images"], "best_epoch": r["selection"]["best_epoch"],
            "val_auroc": r["selection"]["val_auroc"], "test_auroc": r["test"]["auroc"],
            "test_accuracy": r["test"]["accuracy"], "test_macro_f1": r["test"]["macro_f1"],
            "test_auroc_ci_low": r["test_ci95"]["auroc"][0], "test_auroc_ci_high": r["test_ci95"]["auroc"][1],
            "trainable_parameters": r["trainable_parameters"], "total_parameters": r["total_parameters"],
            "seconds": round(r["seconds"], 2),
        })  # fmt: skip
    return rows


def _pm(row: dict[str, Any], name: str, ci: bool = True) -> str:
    mean, std = row[f"test_{name}_mean"], row[f"test_{name}_std"]
    text = f"{mean:.3f} ± {std:.3f}"
    if ci:
        lo, hi = row[f"test_{name}_ci95"]
        text += f" [{lo:.3f}, {hi:.3f}]"
    return text


def markdown(
    study: dict[str, Any], rows: list[dict[str, Any]], expected_cells: int | None = None, finished: int | None = None
) -> str:
    """The Markdown tables of ``rows`` (see the module docstring)."""
    backbones, methods, budgets = _order(study)
    seeds = ", ".join(str(s) for s in study["seeds"])
    lines = [f"## {study['name']}", ""]
    if expected_cells is not None:
        lines += [
            f"Finished cells: {finished} of {expected_cells}. Seeds: {seeds}. Test AUROC: mean ± std over seeds [bootstrap 95 % CI of the mean].",
            "",
        ]
    index = {(r["backbone"], r["method"], r["budget"]): r for r in rows}
    for b in backbones:
        cols = [bud for bud in budgets if any((b, m, bud) in index for m in methods)]
        if not cols:
            continue
        lines += [
            f"### {b}: test AUROC",
            "",
            "| method | trainable | " + " | ".join(budget_label(c) for c in cols) + " |",
        ]
        lines.append("|---|---:|" + "---:|" * len(cols))
        for m in methods:
            present = [index.get((b, m, c)) for c in cols]
            if not any(present):
                continue
            first = next(p for p in present if p)
            trainable = f"{first['trainable_parameters']:,} ({first['trainable_percent']:.2f} %)"
            cells = [_pm(p, "auroc") if p else "-" for p in present]
            lines.append(f"| {m} | {trainable} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"### {b}: all metrics",
            "",
            "| method | budget | train images | lr | val AUROC | test AUROC | test accuracy | test macro-F1 |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for m in methods:
            for c in cols:
                r = index.get((b, m, c))
                if r:
                    lines.append(
                        f"| {m} | {r['budget_label']} | {r['train_images']:.0f} | {r['lr']:.2e} | {r['val_auroc_mean']:.3f} | "
                        f"{_pm(r, 'auroc', False)} | {_pm(r, 'accuracy', False)} | {_pm(r, 'macro_f1', False)} |"
                    )
        lines.append("")
    return "\n".join(lines)


def save_png(fig: Any, path: Path, dpi: int = 120, tight: bool = True) -> None:
    """Write a matplotlib figure atomically as PNG (``tight``: crop to the drawn area) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plots(study: dict[str, Any], rows: list[dict[str, Any]], root: Path) -> list[Path]:
    """``fraction.png`` and ``params.png`` (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    backbones, methods, budgets = _order(study)
    frac = [b for b in budgets if b.startswith("f")]
    shots = [b for b in budgets if b.startswith("k")]
    panels = [(bb, kind, buds) for bb in backbones for kind, buds in (("fraction", frac), ("K-shot", shots)) if buds]
    index = {(r["backbone"], r["method"], r["budget"]): r for r in rows}
    colors = {m: plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")(i % 20) for i, m in enumerate(methods)}
    out = []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4), squeeze=False)
    for ax, (bb, kind, buds) in zip(axes[0], panels, strict=False):
        for m in methods:
            pts = [
                (float(b[1:]) * (100 if kind == "fraction" else 1), index[(bb, m, b)])
                for b in buds
                if (bb, m, b) in index
            ]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["test_auroc_mean"] for p in pts], yerr=[p[1]["test_auroc_std"] for p in pts],
                            marker="o", capsize=3, label=m, color=colors[m])  # fmt: skip
        ax.set_xscale("log")
        ticks = [float(b[1:]) * (100 if kind == "fraction" else 1) for b in buds]
        ax.set_xticks(ticks, [budget_label(b) for b in buds])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel(
            "training images per class (% of the training split)" if kind == "fraction" else "K (images per class)"
        )
        ax.set_ylabel("test AUROC (mean ± std over seeds)")
        ax.set_title(f"{bb}: AUROC vs {kind}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(study["name"])
    save_png(fig, root / "fraction.png")
    plt.close(fig)
    out.append(root / "fraction.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = "osD^vP*Xh<>"
    for r in rows:
        i = budgets.index(r["budget"])
        ax.scatter(
            r["trainable_parameters"],
            r["test_auroc_mean"],
            color=colors[r["method"]],
            marker=markers[i % len(markers)],
            s=40,
        )
    for m in methods:
        ax.scatter([], [], color=colors[m], marker="o", label=m)
    for i, b in enumerate(budgets):
        ax.scatter([], [], color="gray", marker=markers[i % len(markers)], label=budget_label(b))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test AUROC (mean over seeds)")
    ax.set_title(
        f"{study['name']}: AUROC vs trainable parameters" + (f" ({', '.join(backbones)})" if len(backbones) > 1 else "")
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, root / "params.png")
    plt.close(fig)
    out.append(root / "params.png")
    return out


def expected_cells(study: dict[str, Any]) -> int:
    """Runs of the grid of ``study`` (a ``study.json`` mapping), with ``methods[i].backbones`` and
    ``budgets.k_shot_methods`` applied (:func:`~monai_peft.study.grid.expand_grid`)."""
    backbones, _, budgets = _order(study)
    k_methods = study["budgets"].get("k_shot_methods")
    n = 0
    for m in study["methods"]:
        key = m["label"] or m["name"]
        on = [b for b in backbones if not m.get("backbones") or b in m["backbones"]]
        buds = [b for b in budgets if not b.startswith("k") or k_methods is None or key in k_methods]
        n += len(on) * len(buds)
    return n * len(study["seeds"])


def report_paths(root: Path) -> dict[str, Path]:
    """The report files of a results folder that every study kind writes: results/summary CSV, summary JSON, table."""
    names = {"results_csv": "results.csv", "summary_csv": "summary.csv", "summary_json": "summary.json"}
    return {**{k: root / v for k, v in names.items()}, "table": root / "table.md"}


def write_report(root: str | Path) -> dict[str, str]:
    """Write the report files of a results folder; returns ``{kind: path}``."""
    root = Path(root)
    head, records = load_records(root)
    study = head["study"]
    if study.get("task") == "segmentation":  # Dice per class: monai_peft.study.seg_report
        from monai_peft.study.seg_report import write_seg_report

        return write_seg_report(root)
    rows = summarise(study, records)
    expected = expected_cells(study)
    paths = report_paths(root)
    atomic_write_bytes(paths["results_csv"], csv_bytes(_cell_rows(records), _ROW_FIELDS))
    fields = list(rows[0]) if rows else ["backbone", "method", "budget"]
    atomic_write_bytes(paths["summary_csv"], csv_bytes(rows, fields))
    write_json(
        paths["summary_json"],
        {
            "study": study["name"],
            "config_hash": head["config_hash"],
            "finished_cells": len(records),
            "expected_cells": expected,
            "rows": rows,
        },
    )
    atomic_write_bytes(paths["table"], (markdown(study, rows, expected, len(records)) + "\n").encode())
    result = {k: str(v) for k, v in paths.items()}
    if rows:
        for p in plots(study, rows, root):
            result[p.stem] = str(p)
    return result

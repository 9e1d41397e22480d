"""The generation arm of the study: a DDPM U-Net pretrained on one image set, adapted to another with PEFT.

``monai-peft study FILE`` runs a study file with ``task: generation`` (schema:
:mod:`~monai_peft.study.generation_schema`) in this order:

1. read the source (BraTS FLAIR slices) and target (MedMNIST) images (:mod:`~monai_peft.study.generation_data`);
2. pretrain the base ``DiffusionModelUNet`` on the source once and cache it in ``<out>/pretrain/`` (a rerun with
   ``--resume`` loads it);
3. per seed, the reference FIDs: real target *training* images (the floor of the score at this sample size) and
   real source images, each against the target reference split;
4. per (method, seed): adapt a copy of the base (or train from scratch, or keep it as is for ``pretrained``) on
   ``target.train_images`` images, sample ``evaluation.samples`` images with DDIM, score them with
   ``monai.metrics.FIDMetric`` (:mod:`~monai_peft.study.generation_run`), write ``<out>/cells/<id>.json`` and a
   sample grid ``<out>/samples/<id>.png``;
5. the report: ``results.csv`` (one row per cell), ``summary.json`` / ``summary.csv`` (one row per method: FID
   mean ± std over seeds, trainable parameters and %, wall times), ``table.md``, ``fid_params.png`` (FID vs
   trainable parameters) and ``samples.png`` (samples of every row, first seed).

The results folder is tied to the study's config hash (:class:`~monai_peft.study.store.ResultsFolder`): another
study's folder is refused, and finished cells are skipped with ``--resume``.

``python -m monai_peft.study.generation --report RESULTS`` rewrites a results folder's report from its cells,
``--publish RESULTS DEST`` copies the report files (no weights) and
``python -m monai_peft.study.generation [--check]`` renders (checks) the ``<!-- generation-results: DIR -->``
blocks of ``docs/study.md`` from the committed files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.errors import ConfigError
from monai_peft.study.generation_schema import GenerationMethodSpec, GenerationStudySpec, generation_from_dict
from monai_peft.study.report import csv_bytes, load_records, save_png
from monai_peft.study.store import ResultsFolder, write_json

__all__ = [
    "GENERATION_PUBLISHED",
    "dry_run",
    "is_generation_study",
    "load_generation_study",
    "publish_generation",
    "refresh_report",
    "render_generation_block",
    "run_generation_study",
    "summarise_generation",
    "update_generation_doc",
    "write_generation_report",
]

#: Report files copied to docs/study/<name>/ (plus samples/*.png); cells/ and pretrain/ stay in runs/.
GENERATION_PUBLISHED = (
    "study.json",
    "summary.json",
    "summary.csv",
    "results.csv",
    "table.md",
    "fid_params.png",
    "samples.png",
)
_REAL_ROWS = {"real_target": "real target training images (floor)", "real_source": "real source images (BraTS)"}


def is_generation_study(data: Any) -> bool:
    """Whether a raw study mapping is a generation study (``task: generation``)."""
    return isinstance(data, dict) and data.get("task") == "generation"


def load_generation_study(config: str | os.PathLike) -> GenerationStudySpec:
    """Read a study file (or packaged study name) and validate it as a generation study."""
    from monai_peft.study.schema import read_study_file

    return generation_from_dict(read_study_file(config))


def _cell_id(method: str, seed: int) -> str:
    return f"{method}__s{seed}"


def _set_threads(study: GenerationStudySpec) -> None:
    torch.set_num_threads(study.adaptation.num_threads)


class _Data:
    """Source images, target training images and the target reference split, read once."""

    def __init__(self, study: GenerationStudySpec) -> None:
        from monai_peft.study.generation_data import load_source_images, load_target_split

        self.source = load_source_images(study.source, study.image_size)
        self.target_train = load_target_split(study.target, "train", study.image_size)
        self.reference = load_target_split(study.target, study.target.reference_split, study.image_size)


def dry_run(study: GenerationStudySpec) -> list[str]:
    """Check the data and every method on the U-Net without training; returns the lines to print."""
    from monai_peft.study.generation_run import adapt_model, build_unet, count_parameters

    data = _Data(study)
    lines = [
        f"generation study {study.name!r} (config hash {study.config_hash()})",
        f"  source: {len(data.source)} BraTS FLAIR slices; target: {len(data.target_train)} training images "
        f"({study.target.train_images} per seed), {len(data.reference)} {study.target.reference_split} images",
    ]
    if study.evaluation.samples > len(data.reference):
        lines.append(f"  note: evaluation.samples exceeds the {len(data.reference)} reference images")
    base = build_unet(study.unet)
    total = count_parameters(base)[1]
    lines.append(f"  U-Net: {total:,d} parameters; {len(study.methods)} rows x {len(study.seeds)} seeds")
    for m in study.methods:
        trainable = 0 if m.name == "pretrained" else count_parameters(adapt_model(base, m, study.unet, 0))[0]
        lr = f"lr {m.lr:g}" if m.trains else "not trained"
        lines.append(f"  {m.key}: trainable {trainable:,d} ({100.0 * trainable / total:.2f} %), {lr}")
    return lines


def _save_grid(images: torch.Tensor, path: Path, n: int = 64) -> None:
    """First ``n`` images ``(N, 1, S, S)`` in [0, 1] as a square grid, an 8-bit grayscale PNG (1 px borders)."""
    from PIL import Image

    x = images[:n, 0].numpy()
    cols = int(np.ceil(np.sqrt(len(x))))
    rows = int(np.ceil(len(x) / cols))
    s = x.shape[-1]
    grid = np.ones((rows * (s + 1) + 1, cols * (s + 1) + 1), dtype=np.float32)
    for k, img in enumerate(x):
        r, c = divmod(k, cols)
        grid[1 + r * (s + 1) : 1 + r * (s + 1) + s, 1 + c * (s + 1) : 1 + c * (s + 1) + s] = img
    buf = io.BytesIO()
    Image.fromarray(np.round(grid * 255.0).astype(np.uint8), mode="L").save(buf, format="png", optimize=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _pretrain(study: GenerationStudySpec, folder: ResultsFolder, data: _Data, progress: bool) -> tuple[Any, dict]:
    """The base U-Net: loaded from ``<out>/pretrain/`` when cached for this pretraining, else trained and cached."""
    from monai_peft.study.generation_run import build_unet, train_diffusion

    pdir = folder.root / "pretrain"
    meta_file, weights = pdir / "base.json", pdir / "base.pt"
    torch.manual_seed(study.pretrain.seed)
    base = build_unet(study.unet)
    if meta_file.is_file() and weights.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("pretrain_hash") == study.pretrain_hash():
            base.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return base.eval(), {**meta, "cached": True}
    bar = _bar(study.pretrain.steps, "pretrain (source)", progress)
    stats = train_diffusion(
        base,
        data.source,
        scheduler=study.scheduler,
        steps=study.pretrain.steps,
        batch_size=study.pretrain.batch_size,
        lr=study.pretrain.lr,
        weight_decay=study.adaptation.weight_decay,
        seed=study.pretrain.seed,
        device=study.adaptation.device,
        progress=bar,
    )
    base.cpu()
    buf = io.BytesIO()
    torch.save(base.state_dict(), buf)
    pdir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(weights, buf.getvalue())
    meta = {
        "pretrain_hash": study.pretrain_hash(),
        "source_images": len(data.source),
        "seconds": stats["seconds"],
        "final_loss": stats["final_loss"],
        "loss_history": stats["loss_history"],
    }
    write_json(meta_file, meta)
    return base.eval(), {**meta, "cached": False}


def _bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm step callback ``(step, loss)`` (None when progress is off)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)

    def update(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step == total:
            bar.close()

    return update


def _real_cell(study, kind: str, seed: int, data: _Data, extractor, ref_feats) -> dict[str, Any]:
    from monai_peft.study.generation_data import target_train_subset
    from monai_peft.study.generation_run import fid

    n = study.evaluation.samples
    pool = data.target_train if kind == "real_target" else data.source
    images = target_train_subset(pool, min(n, len(pool)), 10_000 + seed)
    return {
        "cell_id": _cell_id(kind, seed),
        "method": kind,
        "method_name": kind,
        "seed": seed,
        "images": len(images),
        "fid": fid(extractor(images), ref_feats),
    }


def _method_cell(
    study: GenerationStudySpec,
    m: GenerationMethodSpec,
    seed: int,
    base: Any,
    data: _Data,
    extractor: Any,
    ref_feats: torch.Tensor,
    folder: ResultsFolder,
    progress: bool,
) -> dict[str, Any]:
    from monai_peft.study.generation_data import target_train_subset
    from monai_peft.study.generation_run import adapt_model, count_parameters, fid, sample_images

    t0 = time.perf_counter()
    model = adapt_model(base, m, study.unet, seed)
    trainable, _ = count_parameters(model)
    unet_total = sum(p.numel() for p in base.parameters())
    stats: dict[str, Any] = {"seconds": 0.0, "loss_history": [], "final_loss": None}
    if m.trains:
        images = target_train_subset(data.target_train, study.target.train_images, seed)
        stats = train_diffusion_cell(study, m, model, images, seed, progress)
    t1 = time.perf_counter()
    samples = sample_images(
        model,
        study.evaluation.samples,
        study.image_size,
        study.scheduler,
        seed=20_000 + seed,
        batch_size=study.evaluation.batch_size,
        device=study.adaptation.device,
    )
    sample_seconds = time.perf_counter() - t1
    cell_id = _cell_id(m.key, seed)
    _save_grid(samples, folder.root / "samples" / f"{cell_id}.png")
    return {
        "cell_id": cell_id,
        "method": m.key,
        "method_name": m.name,
        "seed": seed,
        "lr": m.lr if m.trains else None,
        "steps": study.adaptation.steps if m.trains else 0,
        "train_images": study.target.train_images if m.trains else 0,
        "trainable_parameters": int(trainable),
        "unet_parameters": int(unet_total),
        "trainable_percent": 100.0 * trainable / unet_total,
        "train_seconds": stats["seconds"],
        "sample_seconds": sample_seconds,
        "seconds": time.perf_counter() - t0,
        "final_loss": stats["final_loss"],
        "loss_history": stats["loss_history"],
        "samples": study.evaluation.samples,
        "fid": fid(extractor(samples), ref_feats),
        "sample_mean": float(samples.mean()),
        "sample_std": float(samples.std()),
    }


def train_diffusion_cell(
    study: GenerationStudySpec, m: GenerationMethodSpec, model: Any, images: torch.Tensor, seed: int, progress: bool
) -> dict[str, Any]:
    """Adaptation of one (method, seed) cell on ``images`` ``(N, 1, S, S)`` with the study's adaptation settings."""
    from monai_peft.study.generation_run import train_diffusion

    a = study.adaptation
    return train_diffusion(
        model,
        images,
        scheduler=study.scheduler,
        steps=a.steps,
        batch_size=a.batch_size,
        lr=m.lr,
        weight_decay=a.weight_decay,
        seed=seed,
        device=a.device,
        progress=_bar(a.steps, f"{m.key} s{seed}", progress),
    )


def run_generation_study(
    study: GenerationStudySpec, out: str | Path, *, resume: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Run (or continue) a generation study into ``out`` (see the module docstring).

    Returns:
        ``{"out", "ran", "skipped", "pretrain" (its metadata), "report" ({kind: path})}``.

    Raises:
        StudyFolderError: ``out`` holds another study's results, foreign files, or this study's without ``resume``.
    """
    from monai_peft.study.generation_run import FeatureExtractor

    folder = ResultsFolder(out, study)  # type: ignore[arg-type]  # duck-typed: name, to_dict, config_hash
    folder.open(resume)
    _set_threads(study)
    data = _Data(study)
    base, pre = _pretrain(study, folder, data, progress)
    extractor = FeatureExtractor(study.evaluation, study.adaptation.device)
    ref_feats = extractor(data.reference)
    cells = [(kind, seed) for seed in study.seeds for kind in _REAL_ROWS] + [
        (m, seed) for seed in study.seeds for m in study.methods
    ]
    ran = skipped = 0
    iterator: Any = cells
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cells, desc=f"study {study.name}")
    for item, seed in iterator:
        key = item if isinstance(item, str) else item.key
        cid = _cell_id(key, seed)
        if folder.read("cells", cid) is not None:
            skipped += 1
            continue
        if isinstance(item, str):
            record = _real_cell(study, item, seed, data, extractor, ref_feats)
        else:
            record = _method_cell(study, item, seed, base, data, extractor, ref_feats, folder, progress)
        folder.write("cells", record)
        ran += 1
    report = write_generation_report(folder.root, extractor.description, pre, len(data.reference))
    return {"out": str(folder.root), "ran": ran, "skipped": skipped, "pretrain": pre, "report": report}


# --- report -----------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise_generation(study: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per reference / method with at least one finished seed: FID mean ± std (ddof=1) over seeds."""
    order = list(_REAL_ROWS) + [m["label"] or m["name"] for m in study["methods"]]
    rows = []
    for key in order:
        recs = sorted((r for r in records if r["method"] == key), key=lambda r: r["seed"])
        if not recs:
            continue
        row: dict[str, Any] = {
            "method": key,
            "method_name": recs[0]["method_name"],
            "label": _REAL_ROWS.get(key, key),
            "seeds": [r["seed"] for r in recs],
            "n_seeds": len(recs),
        }
        row["fid_mean"], row["fid_std"] = _mean_std([r["fid"] for r in recs])
        row["fid_per_seed"] = [r["fid"] for r in recs]
        if key not in _REAL_ROWS:
            for name in ("trainable_parameters", "unet_parameters", "trainable_percent", "lr", "steps"):
                row[name] = recs[0][name]
            for name in ("train_seconds", "sample_seconds"):
                row[f"{name}_mean"] = float(np.mean([r[name] for r in recs]))
            losses = [r["final_loss"] for r in recs if r["final_loss"] is not None]
            row["final_loss_mean"] = float(np.mean(losses)) if losses else None
        rows.append(row)
    return rows


def generation_markdown(head: dict[str, Any], summary: dict[str, Any]) -> str:
    """The Markdown table of a generation summary (``summary.json``) with the setup it was measured with."""
    s = head["study"]
    ev, sch, pre, ad = s["evaluation"], s["scheduler"], s["pretrain"], s["adaptation"]
    lines = [
        f"### {s['name']}",
        "",
        f"Config hash `{head['config_hash']}`; {summary['finished_cells']} of {summary['expected_cells']} cells. "
        f"Score: `monai.metrics.FIDMetric` on {summary['extractor']}; {ev['samples']} generated images per "
        f"(method, seed) against the {summary['reference_images']} target {s['target']['reference_split']} images. "
        f"Base: {summary['pretrain']['source_images']} BraTS FLAIR slices, {pre['steps']} DDPM steps "
        f"(batch {pre['batch_size']}, lr {pre['lr']:g}); adaptation: {s['target']['train_images']} target training "
        f"images, {ad['steps']} steps (batch {ad['batch_size']}, constant lr per method, AdamW); sampling: DDIM, "
        f"{sch['sample_steps']} steps. Seeds {s['seeds']}; FID mean ± std over seeds (lower is better).",
        "",
        "| row | trainable params | % of U-Net | lr | adaptation wall (s) | sampling wall (s) | FID |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        fid_text = f"{r['fid_mean']:.2f} ± {r['fid_std']:.2f}" if r["n_seeds"] > 1 else f"{r['fid_mean']:.2f} (1 seed)"
        if r["method"] in _REAL_ROWS:
            lines.append(f"| {r['label']} | - | - | - | - | - | {fid_text} |")
            continue
        lr = "-" if r["lr"] is None else f"{r['lr']:g}"
        lines.append(
            f"| {r['label']} | {r['trainable_parameters']:,d} | {r['trainable_percent']:.2f} | {lr} | "
            f"{r['train_seconds_mean']:.0f} | {r['sample_seconds_mean']:.0f} | {fid_text} |"
        )
    trained = [r for r in summary["rows"] if r["method"] not in _REAL_ROWS]
    adapt = sum(r["train_seconds_mean"] * r["n_seeds"] for r in trained)
    sample = sum(r["sample_seconds_mean"] * r["n_seeds"] for r in trained)
    pre_s = summary["pretrain"]["seconds"]
    lines += [
        "",
        f"Compute recorded in the results (device {ad['device']}, {ad['num_threads']} thread(s)): pretraining "
        f"{pre_s:.0f} s, adaptation {adapt:.0f} s, sampling {sample:.0f} s, together "
        f"{(pre_s + adapt + sample) / 60:.1f} min. Wall times are per cell and seed mean.",
    ]
    return "\n".join(lines) + "\n"


def refresh_report(root: str | Path) -> dict[str, Path]:
    """Rewrite the report files of a finished results folder from its cells (no model is run)."""
    root = Path(root)
    summary = json.loads((root / "summary.json").read_text())
    meta = json.loads((root / "pretrain" / "base.json").read_text())
    return write_generation_report(root, summary["extractor"], meta, summary["reference_images"])


def _plots(root: Path, head: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in rows:
        if r["method"] in _REAL_ROWS or not r["trainable_parameters"]:
            continue
        ax.errorbar(r["trainable_parameters"], r["fid_mean"], yerr=r["fid_std"], fmt="o", capsize=3, label=r["label"])
    styles = {"real_target": ("k", "--"), "real_source": ("tab:gray", ":")}
    for r in rows:
        if r["method"] in _REAL_ROWS:
            ax.axhline(r["fid_mean"], color=styles[r["method"]][0], ls=styles[r["method"]][1], label=r["label"])
        elif r["method_name"] == "pretrained":
            ax.axhline(r["fid_mean"], color="tab:red", ls="-.", label=f"{r['label']} (not adapted)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title(head["study"]["name"], fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_png(fig, root / "fid_params.png", dpi=110, tight=False)
    out["fid_params.png"] = root / "fid_params.png"

    seed = head["study"]["seeds"][0]
    grids = [(r["label"], root / "samples" / f"{_cell_id(r['method'], seed)}.png") for r in rows]
    grids = [(label, p) for label, p in grids if p.is_file()]
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(2.0 * len(grids), 2.4), squeeze=False)
        for a, (label, p) in zip(axes[0], grids, strict=True):
            a.imshow(plt.imread(p), cmap="gray", vmin=0.0, vmax=1.0)
            a.set_title(label, fontsize=7)
            a.axis("off")
        fig.suptitle(f"DDIM samples, seed {seed}", fontsize=8)
        fig.tight_layout()
        save_png(fig, root / "samples.png", dpi=100, tight=False)
        out["samples.png"] = root / "samples.png"
    return out


def write_generation_report(
    root: str | Path, extractor: str, pretrain: dict[str, Any], reference_images: int
) -> dict[str, Path]:
    """Write results.csv, summary.json/.csv, table.md and the plots of a generation results folder."""
    root = Path(root)
    head, records = load_records(root)
    study = head["study"]
    rows = summarise_generation(study, records)
    fields = ["method", "method_name", "seed", "fid", "trainable_parameters", "unet_parameters", "trainable_percent"]
    fields += ["lr", "steps", "train_images", "train_seconds", "sample_seconds", "final_loss", "samples", "images"]
    atomic_write_bytes(root / "results.csv", csv_bytes(sorted(records, key=lambda r: r["cell_id"]), fields))
    sfields = ["method", "label", "n_seeds", "fid_mean", "fid_std", "fid_per_seed", "trainable_parameters"]
    sfields += ["trainable_percent", "lr", "steps", "train_seconds_mean", "sample_seconds_mean", "final_loss_mean"]
    atomic_write_bytes(root / "summary.csv", csv_bytes(rows, sfields))
    summary = {
        "config_hash": head["config_hash"],
        "extractor": extractor,
        "reference_images": int(reference_images),
        "expected_cells": len(study["seeds"]) * (len(study["methods"]) + len(_REAL_ROWS)),
        "finished_cells": len(records),
        "pretrain": {k: v for k, v in pretrain.items() if k != "loss_history"},
        "rows": rows,
    }
    write_json(root / "summary.json", summary)
    atomic_write_bytes(root / "table.md", generation_markdown(head, summary).encode())
    out = {"results.csv": root / "results.csv", "summary.json": root / "summary.json", "table.md": root / "table.md"}
    out.update(_plots(root, head, rows))
    return out


# --- docs -------------------------------------------------------------------------------------------------

_BLOCK = re.compile(
    r"(<!-- generation-results: (?P<path>[^ ]+) -->\n)(?P<body>.*?)(<!-- /generation-results -->)", re.S
)


def render_generation_block(folder: str | Path) -> str:
    """The Markdown of a published generation folder (``study.json`` + ``summary.json``), headings demoted."""
    folder = Path(folder)
    try:
        head = json.loads((folder / "study.json").read_text())
        summary = json.loads((folder / "summary.json").read_text())
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{folder} is not a published generation study (needs study.json, summary.json): {exc}"
        ) from exc
    if summary.get("config_hash") != head.get("config_hash"):
        raise ConfigError(f"{folder}: summary.json and study.json come from different studies (config hashes differ).")
    text = generation_markdown(head, summary)
    return "\n".join("#" + line if line.startswith("#") else line for line in text.splitlines()) + "\n"


def update_generation_doc(doc: str | Path, root: str | Path = ".", *, check: bool = False) -> list[str]:
    """Rewrite (or, with ``check``, compare) every generation-results block of ``doc``; returns those that differed."""
    doc, root = Path(doc), Path(root)
    text = doc.read_text()
    stale: list[str] = []

    def repl(m: re.Match) -> str:
        body = render_generation_block(root / m.group("path"))
        if body != m.group("body"):
            stale.append(m.group("path"))
        return m.group(1) + body + "<!-- /generation-results -->"

    new = _BLOCK.sub(repl, text)
    if not check and new != text:
        atomic_write_bytes(doc, new.encode())
    return stale


def publish_generation(results: str | Path, dest: str | Path) -> list[Path]:
    """Copy the report files and the first seed's sample grids of a results folder to ``dest`` (no weights)."""
    results, dest = Path(results), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    head = json.loads((results / "study.json").read_text())
    seed = head["study"]["seeds"][0]
    names = [n for n in GENERATION_PUBLISHED if (results / n).is_file()]
    names += [f"samples/{p.name}" for p in sorted((results / "samples").glob(f"*__s{seed}.png"))]
    out = []
    for name in names:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(results / name, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
        out.append(target)
    return out


def run_from_cli(data: dict[str, Any], args: argparse.Namespace) -> int:
    """``monai-peft study FILE`` for a ``task: generation`` file (``--out``, ``--resume``, ``--dry-run``)."""
    study = generation_from_dict(data)
    if getattr(args, "workers", 1) != 1 or getattr(args, "ray", None):
        raise ConfigError("a generation study runs in one process; drop --workers / --ray.")
    out = args.out or f"runs/study_{study.name}"
    if args.dry_run:
        _set_threads(study)
        for line in dry_run(study):
            print(line)
        print(f"  results in {out}")
        return 0
    res = run_generation_study(study, out, resume=args.resume, progress=not args.no_progress)
    pre = res["pretrain"]
    base = "loaded from cache" if pre["cached"] else "pretrained in {:.0f} s".format(pre["seconds"])
    print(
        f"generation study {study.name!r}: {res['ran']} cells done, {res['skipped']} skipped; base {base}; "
        f"results in {res['out']}"
    )
    for kind, path in res["report"].items():
        print(f"  {kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render the generation results blocks of docs/study.md")
    parser.add_argument("--doc", type=Path, default=Path("docs/study.md"))
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if a block is out of date")
    parser.add_argument("--publish", nargs=2, metavar=("RESULTS", "DEST"), help="copy a results folder's report first")
    parser.add_argument("--report", metavar="RESULTS", help="rewrite the report files of a results folder first")
    args = parser.parse_args(argv)
    if args.report:
        for p in refresh_report(args.report).values():
            print(f"wrote {p}")
    if args.publish:
        for p in publish_generation(*args.publish):
            print(f"published {p}")
    from monai_peft.study.docs import report_doc_update

    stale = update_generation_doc(args.doc, check=args.check)
    return report_doc_update(args.doc, stale, args.check, "monai_peft.study.generation")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Run a study: check everything, search learning rates, train the cells (in parallel), write the report.

:func:`run_study` does, in order:

1. **Checks, before any training** (each a clear error; the results folder is left as it was):
   the results folder (another study's results are refused), the dataset (files, every class in every split),
   every budget for every seed (a fraction that leaves a class empty), every backbone and every method on every
   backbone (unknown names list the valid ones; a method that does not apply names those that do).
2. **Learning-rate search** per ``(backbone, method, budget)`` (:mod:`~monai_peft.study.tune`), on validation.
3. **Runs** per ``(backbone, method, budget, seed)`` (:mod:`~monai_peft.study.run`), test evaluated once each.
4. **Report** (:mod:`~monai_peft.study.report`).

Work items run in the main process (``workers=1``), in ``workers`` local processes (``multiprocessing`` spawn
context through :class:`concurrent.futures.ProcessPoolExecutor`), or as Ray tasks when ``ray_address`` is given
(``ray.init(address=ray_address)``; an already initialised Ray is reused; ``"local"`` starts a local instance with
``workers`` CPUs). Each task returns its record and the driver writes it atomically, so a Ray cluster needs the
dataset at the same path on every node but no shared results folder. Finished records are skipped with
``resume=True``. Progress over the grid is shown with tqdm.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monai_peft.errors import MonaiPeftError
from monai_peft.study.grid import RunCell, TuneCell, budget_names, expand_grid, expand_tuning
from monai_peft.study.schema import StudySpec, study_from_dict
from monai_peft.study.store import ResultsFolder

__all__ = ["Preflight", "StudyRunError", "preflight", "run_study"]

logger = logging.getLogger(__name__)


class StudyRunError(MonaiPeftError, RuntimeError):
    """Some cells failed; the finished ones are saved and a rerun with ``--resume`` retries the rest."""


@dataclass
class Preflight:
    """What the checks found: split sizes, training images per (budget, seed), trainable parameters."""

    source: str
    classes: tuple[str, ...]
    split_counts: dict[str, dict[int, int]]
    train_images: dict[str, dict[int, int]]
    trainable: dict[str, dict[str, int]]


def preflight(study: StudySpec) -> Preflight:
    """Every check that can fail before training (see the module docstring); raises the first problem found."""
    from monai_peft.study.data import budget_indices, load_splits
    from monai_peft.study.models import check_backbone_methods

    if study.task == "segmentation":
        from monai_peft.study.segmentation import seg_preflight

        return seg_preflight(study)
    data = load_splits(study.dataset, study.image_size)
    labels = data.train_labels()
    sizes: dict[str, dict[int, int]] = {}
    for budget in budget_names(study):
        sizes[budget] = {s: len(budget_indices(labels, budget, study.budgets, s, data.classes)) for s in study.seeds}
        if study.tune_seed not in study.seeds:
            budget_indices(labels, budget, study.budgets, study.tune_seed, data.classes)
    trainable = check_backbone_methods(study, data.num_classes, data.channels)
    return Preflight(data.source, data.classes, data.counts(), sizes, trainable)


# --- work items (top-level functions: they travel to spawned processes and Ray workers) ---------------------


def _set_threads(n: int) -> int:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    return previous


def tune_task(study_dict: dict[str, Any], cell: tuple[str, str, str]) -> dict[str, Any]:
    """Learning-rate search of one cell (in whatever process runs it)."""
    from monai_peft.study.data import load_splits
    from monai_peft.study.tune import tune_cell

    study = study_from_dict(study_dict)
    previous = _set_threads(study.training.num_threads)
    try:
        if study.task == "segmentation":
            from monai_peft.study.segmentation import tune_seg_task

            return tune_seg_task(study, TuneCell(*cell))
        return tune_cell(study, TuneCell(*cell), load_splits(study.dataset, study.image_size))
    finally:
        _set_threads(previous)


def run_task(study_dict: dict[str, Any], cell: tuple[str, str, str, int], lr: float) -> dict[str, Any]:
    """Train, select and test one cell (in whatever process runs it)."""
    from monai_peft.study.data import load_splits
    from monai_peft.study.run import run_cell

    study = study_from_dict(study_dict)
    previous = _set_threads(study.training.num_threads)
    try:
        if study.task == "segmentation":
            from monai_peft.study.segmentation import run_seg_task

            return run_seg_task(study, RunCell(*cell), lr)
        return run_cell(study, RunCell(*cell), lr, load_splits(study.dataset, study.image_size))
    finally:
        _set_threads(previous)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="cell", disable=not enabled)


def _execute(
    fn: Callable[..., dict[str, Any]],
    jobs: list[tuple[str, tuple]],
    done: Callable[[dict[str, Any]], None],
    *,
    workers: int,
    ray_address: str | None,
    num_cpus: int,
    num_gpus: float,
    desc: str,
    progress: bool,
) -> dict[str, str]:
    """Run ``fn(*args)`` for each ``(id, args)``; ``done(record)`` as each finishes. Returns ``{id: error}``."""
    errors: dict[str, str] = {}
    if not jobs:
        return errors
    bar = _progress(len(jobs), desc, progress)

    def finish(job_id: str, get: Callable[[], dict[str, Any]]) -> None:
        try:
            done(get())
        except Exception as exc:  # one failed cell must not lose the others
            logger.error("%s failed: %s: %s", job_id, type(exc).__name__, exc)
            errors[job_id] = f"{type(exc).__name__}: {exc}"
        bar.update(1)

    try:
        if ray_address is not None:
            from monai_peft.errors import require

            ray = require("ray", feature="running a study on Ray (--ray)", install="ray")
            if not ray.is_initialized():
                if ray_address == "local":
                    ray.init(num_cpus=max(1, workers), include_dashboard=False)
                else:
                    ray.init(address=ray_address)
            remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(fn)
            pending = {remote.remote(*args): job_id for job_id, args in jobs}
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                finish(pending.pop(ref), lambda ref=ref: ray.get(ref))
        elif workers <= 1:
            for job_id, args in jobs:
                finish(job_id, lambda args=args: fn(*args))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = {pool.submit(fn, *args): job_id for job_id, args in jobs}
                for fut in as_completed(futures):
                    finish(futures[fut], fut.result)
    finally:
        bar.close()
    return errors


def run_study(
    study: StudySpec,
    out: str | Path,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    resume: bool = False,
    progress: bool = True,
    report: bool = True,
) -> dict[str, Any]:
    """Run ``study`` into the results folder ``out`` (see the module docstring).

    Args:
        study: a validated study (:func:`~monai_peft.study.schema.load_study`).
        out: results folder (created; refused if it holds another study's results).
        workers: parallel local processes (1 = in this process); with Ray, the CPUs of a ``"local"`` instance.
        ray_address: Ray cluster address (``"auto"``, ``"ray://host:10001"``, ``"local"``), or None for local processes.
        resume: continue a study whose results folder already holds finished cells (they are skipped).
        progress: show tqdm progress bars.
        report: write the report at the end.

    Returns:
        ``{"out", "preflight", "tuned", "ran", "skipped", "report"}``.

    Raises:
        ConfigError / InputDataError / MethodNotApplicableError: bad input, before any training.
        StudyRunError: some cells failed (the others are saved; rerun with ``resume=True``).
    """
    if workers < 1:
        from monai_peft.errors import ConfigError

        raise ConfigError(f"workers must be >= 1, got {workers}.")
    folder = ResultsFolder(out, study)
    folder.check(resume)  # before reading any data: refuse another study's folder at once
    checks = preflight(study)
    folder.open(resume)
    study_dict = study.to_dict()
    num_gpus = 1.0 if study.training.device.startswith("cuda") else 0.0
    options = dict(
        workers=workers,
        ray_address=ray_address,
        num_cpus=study.training.num_threads,
        num_gpus=num_gpus,
        progress=progress,
    )

    tune_cells = expand_tuning(study)
    todo_tune = [
        (c.cell_id, (study_dict, (c.backbone, c.method, c.budget)))
        for c in tune_cells
        if folder.read("tune", c.cell_id) is None
    ]
    errors = _execute(tune_task, todo_tune, lambda r: folder.write("tune", r), desc="learning-rate search", **options)

    lrs = {c.cell_id: rec["lr"] for c in tune_cells if (rec := folder.read("tune", c.cell_id)) is not None}
    cells = expand_grid(study)
    todo: list[tuple[str, tuple]] = []
    skipped = 0
    for c in cells:
        if folder.read("cells", c.cell_id) is not None:
            skipped += 1
        elif c.tune.cell_id in lrs:
            todo.append((c.cell_id, (study_dict, (c.backbone, c.method, c.budget, c.seed), lrs[c.tune.cell_id])))
    errors.update(_execute(run_task, todo, lambda r: folder.write("cells", r), desc="cells", **options))

    paths = None
    if report:
        from monai_peft.study.report import write_report

        paths = write_report(folder.root)
    if errors:
        detail = "\n".join(f"  {k}: {v}" for k, v in sorted(errors.items()))
        raise StudyRunError(
            f"{len(errors)} work item(s) failed (finished ones are saved in {folder.root}; rerun with --resume):\n{detail}"
        )
    return {
        "out": str(folder.root),
        "preflight": checks,
        "tuned": len(todo_tune),
        "ran": len(todo),
        "skipped": skipped,
        "report": paths,
    }

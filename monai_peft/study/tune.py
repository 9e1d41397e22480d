"""Learning-rate search of one ``(backbone, method, budget)`` cell on the validation split (Optuna).

Each trial samples ``lr`` log-uniformly in ``[low, high]`` with a seeded TPE sampler (``lr_search.sampler: tpe``;
Optuna's TPE draws its first 10 trials at random, so a search of up to 10 trials is a seeded random search that
offers every cell the same rates) or takes the next rate of a log-even grid (``sampler: grid``: the ``n_trials``
rates ``low * (high / low) ** ((i + 0.5) / n_trials)``, ``i = 0 .. n_trials - 1``, in increasing order), trains the cell on the
training subset of ``lr_search.data_seed`` (default: the study's first seed) for ``lr_search.epochs`` epochs (more on small budgets when ``training.min_steps`` is set, see
:func:`~monai_peft.study.run.epochs_for`), and
reports the validation AUROC after every epoch to a ``MedianPruner`` (a trial whose AUROC falls below the median
of earlier trials at the same epoch stops early). The objective is the best validation AUROC of the trial; the
learning rate of the best trial is used for every seed of the cell. ``low == high`` fixes the learning rate (no
search). The test split is not an argument of anything here: tuning cannot see it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from monai_peft.errors import require
from monai_peft.study.data import GuardedSplits
from monai_peft.study.grid import TuneCell
from monai_peft.study.schema import LRSearchSpec, StudySpec

__all__ = ["grid_rates", "optuna_search", "search_name", "tune_cell"]


def grid_rates(low: float, high: float, n: int) -> list[float]:
    """``n`` learning rates log-evenly inside ``[low, high]``: the midpoints of ``n`` equal bins of ``log lr``."""
    return [low * (high / low) ** ((i + 0.5) / n) for i in range(n)]


def search_name(spec: LRSearchSpec) -> str:
    """How a cell was searched, as recorded in its tune file."""
    return f"optuna-{spec.sampler}-median-pruner"


def optuna_search(spec: LRSearchSpec, objective: Callable[[Any], float], lr_range: tuple[float, float]) -> Any:
    """Maximise ``objective(trial)`` (which suggests ``"lr"`` in ``lr_range``, log scale) over ``spec.n_trials``
    trials with a ``MedianPruner``: a seeded TPE sampler, or the :func:`grid_rates` enqueued in order."""
    optuna = require("optuna", feature="the learning-rate search of monai_peft.study", install="optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=spec.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials, n_warmup_steps=spec.n_warmup_steps),
    )
    if spec.sampler == "grid":
        for lr in grid_rates(*lr_range, spec.n_trials):
            search.enqueue_trial({"lr": lr})
    search.optimize(objective, n_trials=spec.n_trials)
    return search


def tune_cell(study: StudySpec, cell: TuneCell, data: GuardedSplits) -> dict[str, Any]:
    """Search the learning rate of ``cell``; returns ``{"cell_id", "lr", "val_auroc", "trials": [...], "seconds"}``."""
    spec = study.lr_search
    t0 = time.time()
    low, high = study.lr_range(cell.method)
    if low == high:
        return {
            "cell_id": cell.cell_id,
            "lr": float(low),
            "val_auroc": None,
            "trials": [],
            "seconds": 0.0,
            "search": "fixed",
        }
    optuna = require("optuna", feature="the learning-rate search of monai_peft.study", install="optuna")
    from monai_peft.study.run import build_cell_model, epochs_for, train_inputs, train_select

    epochs = spec.epochs or study.training.epochs
    seed = study.tune_seed
    inputs: dict[str, Any] = {}

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", low, high, log=True)
        model, bspec, _ = build_cell_model(study, cell, data.num_classes, data.channels, seed)
        if not inputs:
            inputs["v"] = train_inputs(study, data, cell.budget, seed, bspec)
        tx, ty, vx, vy, n_train = inputs["v"]

        def report(epoch: int, value: float) -> None:
            trial.report(value if math.isfinite(value) else 0.0, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val AUROC {value:.4f})")

        selection, _ = train_select(
            model,
            tx,
            ty,
            vx,
            vy,
            lr=lr,
            epochs=epochs_for(n_train, epochs, study.training),
            training=study.training,
            seed=seed,
            on_epoch=report,
        )
        return selection.val_auroc

    search = optuna_search(spec, objective, (low, high))
    trials = [
        {
            "number": t.number,
            "lr": t.params.get("lr"),
            "state": t.state.name,
            "val_auroc": t.value,
            "epochs": len(t.intermediate_values),
        }
        for t in search.trials
    ]
    done = [t for t in search.trials if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)]
    if not done:
        from monai_peft.errors import MonaiPeftError

        raise MonaiPeftError(
            f"{cell.cell_id}: no learning-rate trial completed with a finite validation AUROC: {trials}"
        )
    best = max(done, key=lambda t: t.value)
    return {
        "cell_id": cell.cell_id,
        "lr": float(best.params["lr"]),
        "val_auroc": float(best.value),
        "trials": trials,
        "seconds": time.time() - t0,
        "search": search_name(spec),
        "data_seed": seed,
    }

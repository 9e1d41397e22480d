"""3D segmentation cells of a study (``task: segmentation``, ``dataset.kind: segmentation_datalist``).

Backbones: ``monai:<Net>`` - a network of ``monai.networks.nets`` built with ``spatial_dims=3``,
``in_channels=dataset.channels``, ``out_channels=dataset.num_classes`` plus ``kwargs`` (e.g. ``monai:SwinUNETR``
with ``feature_size: 12``). With ``source:`` (a ``.safetensors`` / ``.pt`` state dict, e.g. the BraTS bundle's
``models/base/base_model.safetensors``) every tensor is loaded from the file; tensors whose shape differs (the
output convolution of a base trained for another number of classes) keep their fresh initialisation, and a name
missing from the file or a file tensor the network lacks is an error.

Methods: every ``monai_peft`` method that applies to the network (``full_finetune``, ``lora``, ``dka``, ``partial``
with ``target_modules`` for decoder-only tuning, ...), plus ``scratch``: the same network **without** the
``source`` weights, every parameter trained (the reference). The output convolution (the last convolution with
``num_classes`` output channels) is trained in full beside every method that does not train it already.

Training (:func:`train_select_seg`): AdamW on the trainable parameters, cosine schedule per step, DiceCE loss
(softmax, one-hot labels); each epoch draws ``samples_per_case`` random ``roi_size`` patches of every training
case (zero padding where the volume is smaller; a random flip of the first spatial axis with ``training.hflip``)
in batches of ``training.batch_size``. After every epoch: sliding-window inference
(:class:`monai.inferers.SlidingWindowInferer`, window ``roi_size``, overlap 0.25, Gaussian) on each full validation
volume, Dice per foreground class, and the mean; the best epoch's trainable tensors are kept. The learning rate is
searched on that validation Dice (:func:`tune_seg_cell`, Optuna, same protocol as classification).

Test (:func:`run_seg_cell`), once, after ``finalize_selection``: the same sliding-window inference on each full
test volume, :func:`dice_per_class` (``monai.metrics.DiceMetric``), per class and the mean over classes.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_peft.errors import CheckpointError, ConfigError, MonaiPeftError
from monai_peft.study.grid import RunCell, TuneCell, budget_names
from monai_peft.study.models import not_applicable
from monai_peft.study.schema import BackboneSpec, MethodSpec, StudySpec
from monai_peft.study.seg_data import SegCase, SegSplits, case_budget, load_seg_splits

__all__ = [
    "SCRATCH",
    "SegSelection",
    "build_seg_model",
    "check_seg_methods",
    "dice_per_class",
    "predict_volume",
    "run_seg_cell",
    "seg_preflight",
    "train_select_seg",
    "tune_seg_cell",
]

#: the reference method: the backbone without its ``source`` weights, every parameter trained.
SCRATCH = "scratch"
_TRAINS_EVERYTHING = ("full_finetune", SCRATCH)


def build_seg_network(spec: BackboneSpec, in_channels: int, num_classes: int, *, pretrained: bool = True) -> nn.Module:
    """``monai.networks.nets.<Net>(spatial_dims=3, in_channels, out_channels, **kwargs)``, weights of ``source``.

    Raises:
        ConfigError: not a ``monai:<Net>`` name, or the network cannot be built with those arguments.
        CheckpointError: the ``source`` file is missing or holds another network's tensors.
    """
    if not spec.name.startswith("monai:"):
        raise ConfigError(
            f"backbone {spec.name!r}: a segmentation study takes monai:<Net> (a monai.networks.nets network, e.g. "
            "monai:SwinUNETR with kwargs, weights from source: or none), not a classification backbone."
        )
    import monai.networks.nets as nets

    cls_name = spec.name.split(":", 1)[1]
    cls = getattr(nets, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"backbone {spec.name!r}: monai.networks.nets has no network {cls_name!r}.")
    params = inspect.signature(cls).parameters
    base: dict[str, Any] = {"in_channels": in_channels, "out_channels": num_classes}
    if "spatial_dims" in params:
        base["spatial_dims"] = 3
    args = {**base, **spec.kwargs}
    try:
        net = cls(**args)
    except Exception as exc:
        raise ConfigError(f"backbone {spec.name!r} could not be built with {args}: {exc}") from exc
    if pretrained and spec.source:
        load_matching(net, spec.source)
    return net


def load_matching(net: nn.Module, source: str) -> list[str]:
    """Load ``source`` into ``net``: same-shape tensors copied, other shapes left as initialised (returned).

    Raises:
        CheckpointError: missing file, unreadable, or names that do not match the network's.
    """
    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"backbone weights {path} (source:) do not exist.")
    try:
        if path.suffix == ".safetensors":
            from monai_peft.bundle.base_weights import read_base_weights

            tensors = read_base_weights(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
            tensors = tensors.get("state_dict", tensors) if isinstance(tensors, dict) else tensors
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot read backbone weights {path}: {exc}") from exc
    state = net.state_dict()
    missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or extra:
        raise CheckpointError(
            f"{path} does not hold this network's tensors ({len(missing)} missing, e.g. {missing[:3]}; {len(extra)} "
            f"unexpected, e.g. {extra[:3]}); check the backbone's kwargs match the network the file was saved from."
        )
    reinit = [k for k, v in state.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    net.load_state_dict({k: (v if k in reinit else tensors[k].to(v.dtype)) for k, v in state.items()})
    return reinit


def output_conv(net: nn.Module, num_classes: int) -> list[str]:
    """Name of the last convolution with ``num_classes`` output channels (the segmentation head), as a list."""
    names = [
        n
        for n, m in net.named_modules()
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and m.out_channels == num_classes
    ]
    return names[-1:]


def _method_spec(study: StudySpec, key: str) -> MethodSpec:
    return next(m for m in study.methods if m.key == key)


def _backbone_spec(study: StudySpec, key: str) -> BackboneSpec:
    return next(b for b in study.backbones if b.key == key)


def build_seg_model(bspec: BackboneSpec, mspec: MethodSpec, in_channels: int, num_classes: int, seed: int) -> Any:
    """The PEFT model of one cell (``scratch``: no source weights, ``full_finetune``), initialised from ``seed``."""
    import monai_peft as mp
    from monai_peft.study.run import seed_everything

    seed_everything(seed)
    net = build_seg_network(bspec, in_channels, num_classes, pretrained=mspec.name != SCRATCH)
    if mspec.name == SCRATCH:
        return mp.get_peft_model(net, mp.get_config("full_finetune"))
    from monai_peft.study.models import method_config

    head = output_conv(net, num_classes)
    save = None if mspec.name in _TRAINS_EVERYTHING or mspec.name == "partial" or not head else head
    return mp.get_peft_model(net, method_config(mspec), modules_to_save=save)


def check_seg_methods(study: StudySpec) -> dict[str, dict[str, int]]:
    """Build every backbone and apply every method (before training); ``{backbone: {method: trainable}}``.

    Raises:
        ConfigError: unknown method (the message lists the registered ones and ``scratch``).
        MethodNotApplicableError: a method that does not apply; the message names those that do.
    """
    import monai_peft as mp

    names = set(mp.list_methods()) | {SCRATCH}
    for m in study.methods:
        if m.name not in names:
            raise ConfigError(
                f"unknown method {m.name!r} in the study; registered methods: {', '.join(sorted(names))} "
                f"({SCRATCH!r}: the backbone trained from scratch, a reference)."
            )
    ds = study.dataset
    out: dict[str, dict[str, int]] = {}
    for b in study.backbones:
        net = build_seg_network(b, ds.channels, ds.num_classes)
        applicable = [*mp.applicable_methods(net), SCRATCH]
        out[b.key] = {}
        for m in study.methods:
            if not m.runs_on(b.key):
                continue
            try:
                model = build_seg_model(b, m, ds.channels, ds.num_classes, 0)
            except Exception as exc:
                if m.name in applicable and isinstance(exc, MonaiPeftError):
                    raise
                raise not_applicable(m, b.key, exc, applicable) from exc
            out[b.key][m.key] = int(model.trainable_parameters()[0])
    del net
    return out


def seg_preflight(study: StudySpec) -> Any:
    """The checks of :func:`monai_peft.study.execute.preflight` for a segmentation study."""
    from monai_peft.study.execute import Preflight

    data = load_seg_splits(study.dataset)
    n = len(data.items["train"])
    sizes = {bud: {s: len(case_budget(n, bud, study.budgets, s)) for s in study.seeds} for bud in budget_names(study)}
    trainable = check_seg_methods(study)
    return Preflight(data.source, data.classes, data.counts(), sizes, trainable)


# --- metric and inference -----------------------------------------------------------------------------------


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class ``1..num_classes-1`` (``monai.metrics.DiceMetric``, background excluded).

    Args:
        pred, label: integer label maps ``(1, X, Y, Z)`` of the same shape.

    Returns:
        ``num_classes - 1`` values ``2 |P & G| / (|P| + |G|)``; NaN where the class is in neither map (nothing to
        score); 0 where it is in only one of them.
    """
    from monai.metrics import DiceMetric

    if tuple(pred.shape) != tuple(label.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    k = int(num_classes)

    def onehot(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(x.long().reshape(1, *x.shape[1:]), k).movedim(-1, 1).float()

    p, g = onehot(pred), onehot(label)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    values = metric(p, g)[0].tolist()
    present = ((p + g).flatten(2).sum(-1) > 0)[0, 1:].tolist()
    return [float(v) if ok else float("nan") for v, ok in zip(values, present, strict=True)]


@torch.no_grad()
def predict_volume(
    model: nn.Module, image: torch.Tensor, roi: tuple[int, ...], sw_batch: int, device: torch.device
) -> torch.Tensor:
    """Label map ``(1, X, Y, Z)`` of a full volume ``(C, X, Y, Z)``: sliding window (overlap 0.25, Gaussian), argmax."""
    from monai.inferers import SlidingWindowInferer

    model.eval()
    inferer = SlidingWindowInferer(roi_size=list(roi), sw_batch_size=sw_batch, overlap=0.25, mode="gaussian")
    logits = inferer(image[None].to(device), model)
    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
    return torch.as_tensor(logits).argmax(1).cpu()  # (1, X, Y, Z)


def _mean_dice(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else 0.0


def evaluate_cases(model: nn.Module, cases: list[SegCase], study: StudySpec) -> list[dict[str, Any]]:
    """``[{"case", "dice": [per foreground class], "mean_dice"}]`` of ``model`` on full volumes."""
    ds, tr = study.dataset, study.training
    out = []
    for c in cases:
        pred = predict_volume(model, c.image, tuple(ds.roi_size), tr.batch_size, torch.device(tr.device))
        d = dice_per_class(pred, c.label, ds.num_classes)
        out.append({"case": c.case, "dice": d, "mean_dice": _mean_dice(d)})
    return out


# --- training -----------------------------------------------------------------------------------------------


@dataclass
class SegSelection:
    """What validation chose: best epoch, its validation mean Dice, the learning rate, the per-epoch history."""

    best_epoch: int
    val_dice: float
    lr: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _patch(case: SegCase, roi: tuple[int, ...], gen: torch.Generator, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``roi`` patch ``(C, *roi)`` / ``(1, *roi)`` of ``case`` (zero padded where the volume is smaller)."""
    img, lab = case.image, case.label
    pad = []
    for axis in (3, 2, 1):  # F.pad wants the last axis first
        short = max(0, roi[axis - 1] - img.shape[axis])
        pad += [short // 2, short - short // 2]
    if any(pad):
        img, lab = nn.functional.pad(img, pad), nn.functional.pad(lab, pad)
    starts = [int(torch.randint(0, img.shape[a] - roi[a - 1] + 1, (1,), generator=gen)) for a in (1, 2, 3)]
    sl = tuple(slice(s, s + r) for s, r in zip(starts, roi, strict=True))
    x, y = img[(slice(None), *sl)], lab[(slice(None), *sl)]
    if flip and bool(torch.rand(1, generator=gen) < 0.5):
        x, y = x.flip(1), y.flip(1)
    return x, y


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable or k in buffers}


def seg_epochs(study: StudySpec, n_cases: int, epochs: int) -> int:
    """Epochs for ``n_cases`` training cases: ``epochs``, raised to reach ``training.min_steps`` optimiser steps.

    An epoch is ``n_cases * samples_per_case`` patches in batches of ``training.batch_size``; the rule is the
    classification study's (:func:`monai_peft.study.run.epochs_for`), so a one- or two-case budget trains as many
    steps as the configuration asks for.
    """
    from monai_peft.study.run import epochs_for

    return epochs_for(n_cases * int(study.dataset.samples_per_case or 1), epochs, study.training)


def train_select_seg(
    model: nn.Module,
    train: list[SegCase],
    val: list[SegCase],
    study: StudySpec,
    *,
    lr: float,
    epochs: int,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[SegSelection, dict[str, torch.Tensor]]:
    """Train on ``train`` patches, keep the epoch with the best validation mean Dice (see the module docstring).

    Returns:
        ``(selection, best_state)``: the trainable tensors and buffers of the best epoch.
    """
    from monai.losses import DiceCELoss

    ds, tr = study.dataset, study.training
    roi = tuple(int(v) for v in ds.roi_size)
    device = torch.device(tr.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=tr.weight_decay)
    per_epoch = len(train) * int(ds.samples_per_case or 1)
    bs = min(tr.batch_size, per_epoch)
    steps = math.ceil(per_epoch / bs)
    total = max(1, epochs * steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    )
    gen = torch.Generator().manual_seed(seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    selection = SegSelection(best_epoch=0, val_dice=float("-inf"), lr=float(lr))
    best_state = _snapshot(model)
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        order = [i for _ in range(int(ds.samples_per_case or 1)) for i in range(len(train))]
        order = [order[i] for i in torch.randperm(len(order), generator=gen).tolist()]
        losses = []
        for s in range(0, len(order), bs):
            pairs = [_patch(train[i], roi, gen, tr.hflip) for i in order[s : s + bs]]
            xb = torch.stack([p[0] for p in pairs]).to(device)
            yb = torch.stack([p[1] for p in pairs]).to(device)
            out = model(xb)
            loss = loss_fn(out[0] if isinstance(out, (tuple, list)) else out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        scores = evaluate_cases(model, val, study)
        value = float(np.mean([s["mean_dice"] for s in scores]))
        per_class = np.nanmean(np.array([s["dice"] for s in scores], dtype=float), axis=0) if scores else []
        selection.history.append({
            "epoch": epoch, "train_loss": float(np.mean(losses)), "val_mean_dice": value,
            "val_dice": [None if not math.isfinite(v) else float(v) for v in per_class],
            "seconds": round(time.time() - t0, 2),
        })  # fmt: skip
        if value > selection.val_dice:
            selection.best_epoch, selection.val_dice = epoch, value
            best_state = _snapshot(model)
        if on_epoch is not None:
            on_epoch(epoch, value)
    return selection, best_state


def _inputs(study: StudySpec, data: SegSplits, budget: str, seed: int) -> tuple[list[SegCase], list[SegCase]]:
    train = data.train()
    idx = case_budget(len(train), budget, study.budgets, seed)
    return [train[i] for i in idx], data.val()


def tune_seg_cell(study: StudySpec, cell: TuneCell, data: SegSplits) -> dict[str, Any]:
    """Learning-rate search of one cell on the validation mean Dice (see :mod:`monai_peft.study.tune`)."""
    spec = study.lr_search
    t0 = time.time()
    low, high = study.lr_range(cell.method)
    if low == high:
        return {"cell_id": cell.cell_id, "lr": float(low), "val_dice": None, "trials": [], "seconds": 0.0,
                "search": "fixed"}  # fmt: skip
    from monai_peft.errors import require
    from monai_peft.study.tune import optuna_search, search_name

    optuna = require("optuna", feature="the learning-rate search of monai_peft.study", install="optuna")
    bspec, mspec = _backbone_spec(study, cell.backbone), _method_spec(study, cell.method)
    seed = study.tune_seed
    train, val = _inputs(study, data, cell.budget, seed)

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", low, high, log=True)
        model = build_seg_model(bspec, mspec, data.channels, data.num_classes, seed)

        def report(epoch: int, value: float) -> None:
            trial.report(value, step=epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch} (val Dice {value:.4f})")

        epochs = seg_epochs(study, len(train), spec.epochs or study.training.epochs)
        selection, _ = train_select_seg(model, train, val, study, lr=lr, epochs=epochs, seed=seed, on_epoch=report)
        return selection.val_dice

    search = optuna_search(spec, objective, (low, high))
    trials = [{"number": t.number, "lr": t.params.get("lr"), "state": t.state.name, "val_dice": t.value,
               "epochs": len(t.intermediate_values)} for t in search.trials]  # fmt: skip
    done = [t for t in search.trials if t.state.name == "COMPLETE" and t.value is not None]
    if not done:
        raise MonaiPeftError(f"{cell.cell_id}: no learning-rate trial completed: {trials}")
    best = max(done, key=lambda t: t.value)
    return {"cell_id": cell.cell_id, "lr": float(best.params["lr"]), "val_dice": float(best.value), "trials": trials,
            "seconds": time.time() - t0, "search": search_name(spec), "data_seed": seed}  # fmt: skip


def run_seg_cell(study: StudySpec, cell: RunCell, lr: float, data: SegSplits) -> dict[str, Any]:
    """Train ``cell``, select on validation, then (only then) evaluate every full test volume once.

    Returns:
        A JSON-able record: ids, learning rate, training cases, selection (best epoch, validation Dice, history),
        ``test`` (``dice``: per class name, mean over test cases; ``mean_dice``), ``test_cases`` (per case),
        trainable / total parameters, seconds.
    """
    t0 = time.time()
    bspec, mspec = _backbone_spec(study, cell.backbone), _method_spec(study, cell.method)
    model = build_seg_model(bspec, mspec, data.channels, data.num_classes, cell.seed)
    train, val = _inputs(study, data, cell.budget, cell.seed)
    epochs = seg_epochs(study, len(train), study.training.epochs)
    selection, best_state = train_select_seg(model, train, val, study, lr=lr, epochs=epochs, seed=cell.seed)
    train_seconds = time.time() - t0
    data.finalize_selection(selection)  # from here on the test split may be read
    model.load_state_dict(best_state, strict=False)
    cases = evaluate_cases(model, data.test(), study)
    per_class = np.nanmean(np.array([c["dice"] for c in cases], dtype=float), axis=0)
    names = data.classes[1:]
    dice = {n: (float(v) if math.isfinite(v) else None) for n, v in zip(names, per_class, strict=True)}
    finite = [v for v in dice.values() if v is not None]
    trainable, total = model.trainable_parameters()
    return {
        "cell_id": cell.cell_id, "backbone": cell.backbone, "backbone_name": bspec.name, "method": cell.method,
        "method_name": mspec.name, "budget": cell.budget, "seed": cell.seed, "lr": float(lr),
        "train_images": len(train), "train_cases": [c.case for c in train],
        "selection": asdict(selection),
        "test": {"dice": dice, "mean_dice": float(np.mean(finite)) if finite else None},
        "test_cases": cases,
        "trainable_parameters": int(trainable), "total_parameters": int(total),
        "train_seconds": train_seconds, "seconds": time.time() - t0, "device": study.training.device,
    }  # fmt: skip


def tune_seg_task(study: StudySpec, cell: TuneCell) -> dict[str, Any]:
    return tune_seg_cell(study, cell, load_seg_splits(study.dataset))


def run_seg_task(study: StudySpec, cell: RunCell, lr: float) -> dict[str, Any]:
    return run_seg_cell(study, cell, lr, load_seg_splits(study.dataset))

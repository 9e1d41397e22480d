"""Train one study cell, select on validation, then evaluate on test once.

:func:`train_select` is the training loop (AdamW on the trainable parameters, cosine schedule per step,
cross-entropy, random horizontal flips): after every epoch it computes the validation AUROC, calls
``on_epoch(epoch, val_auroc)`` (the Optuna pruner hook of :mod:`~monai_peft.study.tune`) and keeps a copy of the
best epoch's trainable tensors and buffers. It never receives test data.

:func:`run_cell` is the protocol of one ``(backbone, method, budget, seed)`` cell:

1. read train and val from the :class:`~monai_peft.study.data.GuardedSplits`, take the budget's subset of train;
2. build the network and apply the method; train with the tuned learning rate; choose the best epoch on val;
3. :meth:`~monai_peft.study.data.GuardedSplits.finalize_selection` - only now can the test split be read;
4. restore the best epoch, predict test once, compute AUROC / accuracy / macro-F1 and their bootstrap CIs.

Inputs of the networks: images scaled to [0, 1], resized to the backbone's ``image_size`` (else the study's;
bilinear, MONAI ``Resize``), converted to the backbone's ``channels`` when it sets them, normalised with the
backbone's ``(x - mean) / std``, shape ``(B, C, image_size, image_size)``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_peft.study.data import GuardedSplits, SplitArrays, budget_indices
from monai_peft.study.grid import RunCell, TuneCell
from monai_peft.study.metrics import bootstrap_ci, classification_metrics
from monai_peft.study.models import build_classifier, build_peft_model
from monai_peft.study.schema import BackboneSpec, MethodSpec, StudySpec, TrainingSpec

__all__ = [
    "Selection",
    "build_cell_model",
    "train_cell",
    "predict_proba",
    "prepare_images",
    "run_cell",
    "seed_everything",
    "train_select",
]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (initialisation of heads/adapters, shuffling, flips)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_images(
    images: np.ndarray, image_size: int, mean: float, std: float, channels: int | None = None
) -> torch.Tensor:
    """uint8 ``(N, H, W)`` / ``(N, H, W, 3)`` -> float32 ``(N, C, image_size, image_size)``, ``(x / 255 - mean) / std``.

    ``channels`` (None: as stored) converts: grayscale repeated to 3 channels, RGB to gray by luminance.
    """
    from monai.transforms import Resize

    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32) / 255.0
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x[:, None]
    if channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif channels == 1 and x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    n, c, h, w = x.shape
    if (h, w) != (image_size, image_size):
        resize = Resize((image_size, image_size), mode="bilinear", anti_aliasing=False)
        x = torch.as_tensor(resize(x.reshape(n * c, h, w))).reshape(n, c, image_size, image_size)
    return ((x - mean) / std).contiguous()


def _logits(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    """Softmax probabilities ``(N, K)`` of ``model`` on ``x`` ``(N, C, H, W)`` (eval mode)."""
    model.eval()
    out = [
        torch.softmax(_logits(model(x[i : i + batch_size].to(device))).float(), dim=1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(out).numpy()


@dataclass
class Selection:
    """What validation chose: best epoch, its validation AUROC, the learning rate and the per-epoch history."""

    best_epoch: int
    val_auroc: float
    lr: float
    history: list[dict[str, float]] = field(default_factory=list)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable or k in buffers}


def batch_starts(n: int, batch_size: int) -> list[int]:
    """Start index of every training batch of an epoch over ``n`` images (a last batch of one is folded in)."""
    starts = list(range(0, n, min(batch_size, n)))
    if len(starts) > 1 and n - starts[-1] == 1:  # a batch of one breaks BatchNorm in train mode: fold it in
        starts.pop()
    return starts


def epochs_for(n_train: int, epochs: int, training: TrainingSpec) -> int:
    """Epochs to train for: ``epochs``, raised to reach ``training.min_steps`` optimiser steps on small budgets.

    With ``B`` batches per epoch over ``n_train`` images, this is
    ``max(epochs, ceil(min_steps * (epochs / training.epochs) / B))``: a run (``epochs = training.epochs``) makes at
    least ``min_steps`` steps, so at 1 % of the data it is not stopped after a handful of steps while the 100 % runs
    keep ``epochs``; a shorter learning-rate search (``lr_search.epochs``) gets the same proportion of them.
    """
    if training.min_steps is None:
        return epochs
    steps = training.min_steps * epochs / training.epochs
    return max(epochs, math.ceil(steps / len(batch_starts(n_train, training.batch_size))))


def train_select(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: np.ndarray,
    *,
    lr: float,
    epochs: int,
    training: TrainingSpec,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[Selection, dict[str, torch.Tensor]]:
    """Train for ``epochs`` and keep the epoch with the best validation AUROC.

    Args:
        model: the PEFT model; only parameters with ``requires_grad`` are optimised.
        train_x / train_y: ``(N, C, H, W)`` float inputs and ``(N,)`` long labels of the training subset.
        val_x / val_y: validation inputs and labels.
        on_epoch: called as ``on_epoch(epoch, val_auroc)`` after each epoch (may raise to stop, e.g. pruning).

    Returns:
        ``(selection, best_state)``: ``best_state`` holds the trainable tensors and buffers of the best epoch.
    """
    from monai_peft.study.metrics import auroc

    device = torch.device(training.device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=training.weight_decay)
    n = len(train_y)
    starts = batch_starts(n, training.batch_size)
    total = max(1, epochs * len(starts))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
    )
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    selection = Selection(best_epoch=0, val_auroc=float("-inf"), lr=float(lr))
    best_state = _snapshot(model)
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        losses = []
        for k, s in enumerate(starts):
            end = starts[k + 1] if k + 1 < len(starts) else n
            idx = perm[s:end]
            xb, yb = train_x[idx], train_y[idx]
            if training.hflip:
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = loss_fn(_logits(model(xb.to(device))), yb.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        probs = predict_proba(model, val_x, training.eval_batch_size, device)
        value = auroc(probs, val_y)
        selection.history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_auroc": value})
        if value > selection.val_auroc:  # NaN never wins
            selection.best_epoch, selection.val_auroc = epoch, value
            best_state = _snapshot(model)
        if on_epoch is not None:
            on_epoch(epoch, value)
    return selection, best_state


def _spec(items: tuple, key: str, what: str) -> Any:
    for item in items:
        if item.key == key:
            return item
    raise KeyError(f"{what} {key!r} is not in the study")


def build_cell_model(
    study: StudySpec, cell: RunCell | TuneCell, num_classes: int, in_channels: int, seed: int
) -> tuple[Any, BackboneSpec, MethodSpec]:
    """Backbone + head + method of ``cell``, with heads/adapters initialised from ``seed``."""
    bspec = _spec(study.backbones, cell.backbone, "backbone")
    mspec = _spec(study.methods, cell.method, "method")
    seed_everything(seed)
    net, head = build_classifier(bspec, num_classes, bspec.channels or in_channels, study.input_size(bspec))
    return build_peft_model(net, head, mspec), bspec, mspec


def train_inputs(
    study: StudySpec, data: GuardedSplits, budget: str, seed: int, bspec: BackboneSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, int]:
    """Training subset of ``budget`` for ``seed`` and the validation split, prepared for the network."""
    train: SplitArrays = data.train()
    val: SplitArrays = data.val()
    idx = budget_indices(train.labels, budget, study.budgets, seed, data.classes)
    size = study.input_size(bspec)
    tx = prepare_images(train.images[idx], size, bspec.mean, bspec.std, bspec.channels)
    vx = prepare_images(val.images, size, bspec.mean, bspec.std, bspec.channels)
    return tx, torch.as_tensor(train.labels[idx], dtype=torch.long), vx, val.labels, len(idx)


def train_cell(
    study: StudySpec, cell: RunCell, lr: float, data: GuardedSplits
) -> tuple[Any, BackboneSpec, MethodSpec, Selection, int]:
    """Train ``cell`` with learning rate ``lr`` and keep its best epoch on validation (train and val only).

    Returns:
        ``(model, backbone spec, method spec, selection, training images)``; the model holds the selected weights.
    """
    model, bspec, mspec = build_cell_model(study, cell, data.num_classes, data.channels, cell.seed)
    tx, ty, vx, vy, n_train = train_inputs(study, data, cell.budget, cell.seed, bspec)
    selection, best_state = train_select(
        model,
        tx,
        ty,
        vx,
        vy,
        lr=lr,
        epochs=epochs_for(n_train, study.training.epochs, study.training),
        training=study.training,
        seed=cell.seed,
    )
    model.load_state_dict(best_state, strict=False)
    return model, bspec, mspec, selection, n_train


def run_cell(study: StudySpec, cell: RunCell, lr: float, data: GuardedSplits) -> dict[str, Any]:
    """Train ``cell`` with learning rate ``lr``, select on validation, evaluate on test once (see module docstring).

    Returns:
        A JSON-able record: ids, learning rate, best epoch and validation AUROC, per-epoch history, test metrics
        with bootstrap 95 % CIs, trainable / total parameters, training images, seconds, test probabilities.
    """
    t0 = time.time()
    model, bspec, mspec, selection, n_train = train_cell(study, cell, lr, data)
    data.finalize_selection(selection)  # from here on the test split may be read
    test = data.test()
    x_test = prepare_images(test.images, study.input_size(bspec), bspec.mean, bspec.std, bspec.channels)
    probs = predict_proba(model, x_test, study.training.eval_batch_size, torch.device(study.training.device))
    metrics = classification_metrics(probs, test.labels)
    ci = {
        name: bootstrap_ci(probs, test.labels, name, n_boot=study.metrics.bootstrap, seed=study.metrics.bootstrap_seed)
        for name in metrics
    }
    trainable, total = model.trainable_parameters()
    return {
        "cell_id": cell.cell_id,
        "backbone": cell.backbone,
        "backbone_name": bspec.name,
        "method": cell.method,
        "method_name": mspec.name,
        "budget": cell.budget,
        "seed": cell.seed,
        "lr": float(lr),
        "train_images": int(n_train),
        "selection": asdict(selection),
        "test": metrics,
        "test_ci95": {k: list(v) for k, v in ci.items()},
        "trainable_parameters": int(trainable),
        "total_parameters": int(total),
        "seconds": time.time() - t0,
        "device": study.training.device,
        "test_labels": [int(v) for v in test.labels],
        "test_probs": np.round(probs, 6).tolist(),
    }

"""Fine-tuning loop for classification with MONAI's ignite engines.

``fit_classifier`` builds a :class:`monai.engines.SupervisedTrainer` and a validation
:class:`monai.engines.SupervisedEvaluator`, selects the best epoch on the **validation** split
(never the test split: the DKA reference code's pitfall), saves the best adapter with
:meth:`PeftModel.save_adapter`, logs to TensorBoard, shows an ignite progress bar, and can resume
an interrupted run from ``<out_dir>/last`` (adapter + optimiser state, loaded with
``torch.load(weights_only=True)``, written atomically).
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.errors import CheckpointError, ConfigError
from monai_peft.model import PeftModel

__all__ = ["FitResult", "OutputSelectInferer", "evaluate_classifier", "fit_classifier"]

logger = logging.getLogger(__name__)


def _select_first(output: Any) -> torch.Tensor:
    """Logits of networks that return ``(logits, extras)`` (MONAI ViT) or a plain tensor."""
    return output[0] if isinstance(output, (tuple, list)) else output


def OutputSelectInferer():
    """A :class:`monai.inferers.SimpleInferer` that keeps the first output of tuple-returning networks."""
    from monai.inferers import SimpleInferer

    class _Inferer(SimpleInferer):
        def __call__(
            self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any
        ) -> torch.Tensor:
            return _select_first(network(inputs, *args, **kwargs))

    return _Inferer()


def _prepare_batch(
    batchdata: dict, device: torch.device | str | None = None, non_blocking: bool = False, **kwargs: Any
):
    """(image (B, C, *spatial) float, label (B,) long) from a MONAI dict batch."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking, dtype=torch.float32)
    label = torch.as_tensor(batchdata["label"]).to(device=device, non_blocking=non_blocking)
    label = label.reshape(label.shape[0], -1)[:, 0].long() if label.dim() > 1 else label.long()
    return image, label


@dataclass
class FitResult:
    """What a fine-tuning run produced."""

    best_metric: float
    best_epoch: int
    best_adapter_dir: Path | None
    history: list[dict[str, float]] = field(default_factory=list)
    epochs_run: int = 0
    first_loss: float | None = None
    """Training loss of the first iteration of this run (``ln(num_classes)`` for a fresh, small head);
    None when nothing was trained (a resumed run that was already complete)."""


def _metrics(num_classes: int) -> tuple[Any, Any]:
    from ignite.metrics import Accuracy
    from monai.handlers import ROCAUC, from_engine
    from monai.transforms import Activationsd, AsDiscreted, Compose

    post = Compose([Activationsd(keys="pred", softmax=True), AsDiscreted(keys="label", to_onehot=num_classes)])

    def acc_transform(output: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        preds, labels = from_engine(["pred", "label"])(output)
        return torch.stack(list(preds)), torch.stack(list(labels)).argmax(dim=1)

    key = {"val_auc": ROCAUC(average="macro", output_transform=from_engine(["pred", "label"]))}
    extra = {"val_acc": Accuracy(output_transform=acc_transform)}
    return post, (key, extra)


def _classification_evaluator(model: nn.Module, loader: Any, num_classes: int, device: torch.device, amp: bool) -> Any:
    """A MONAI ``SupervisedEvaluator`` computing macro ROC-AUC (key metric) and accuracy on dict batches."""
    from monai.engines import SupervisedEvaluator

    post, (key, extra) = _metrics(num_classes)
    return SupervisedEvaluator(
        device=device,
        val_data_loader=loader,
        network=model,
        inferer=OutputSelectInferer(),
        prepare_batch=_prepare_batch,
        postprocessing=post,
        key_val_metric=key,
        additional_metrics=extra,
        amp=amp,
    )


def evaluate_classifier(
    model: nn.Module, loader: Iterable, num_classes: int, device: str | torch.device = "cpu", amp: bool = False
) -> dict[str, float]:
    """Macro ROC-AUC and accuracy of ``model`` on ``loader`` (dict batches with image/label)."""

    evaluator = _classification_evaluator(model, loader, num_classes, torch.device(device), amp)
    evaluator.run()
    return {k.replace("val_", ""): float(v) for k, v in evaluator.state.metrics.items()}


def _save_resume_state(
    out_dir: Path,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    iteration: int,
    best: float,
    best_epoch: int,
) -> None:
    last = out_dir / "last"
    model.save_adapter(last)
    buffer = io.BytesIO()
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "best_metric": best,
            "best_epoch": best_epoch,
        },
        buffer,
    )
    atomic_write_bytes(last / "trainer_state.pt", buffer.getvalue())


def _load_resume_state(out_dir: Path, model: PeftModel, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    last = out_dir / "last"
    state_file = last / "trainer_state.pt"
    if not state_file.is_file():
        return None
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot resume from {state_file}: {exc}; delete {last} to start over") from exc
    from monai_peft.checkpoint import read_adapter_folder

    _, tensors, _ = read_adapter_folder(last)
    name = model.active_adapter
    model._assign_adapter_tensors(name, tensors, str(last))
    optimizer.load_state_dict(state["optimizer"])
    return state


def fit_classifier(
    model: PeftModel,
    train_loader: Iterable,
    val_loader: Iterable,
    *,
    num_classes: int,
    epochs: int = 5,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    device: str | torch.device = "cpu",
    out_dir: str | os.PathLike = "runs/finetune",
    amp: bool = False,
    resume: bool = True,
    progress: bool = True,
    tensorboard: bool = True,
    loss_function: nn.Module | None = None,
) -> FitResult:
    """Fine-tune the trainable parameters of ``model`` (AdamW, cosine schedule) for classification.

    Args:
        model: a :class:`PeftModel`; only its trainable parameters are optimised.
        train_loader / val_loader: dict batches ``{"image": (B, C, *spatial), "label": (B,) or (B, 1)}``.
        num_classes: number of classes of the logits (B, num_classes).
        out_dir: ``best/`` (best validation AUC adapter), ``last/`` (resume state), ``tb/`` logs.
        resume: continue from ``out_dir/last`` when it exists.

    Returns:
        :class:`FitResult` with the best validation macro AUC and its epoch.
    """
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.handlers import TensorBoardStatsHandler

    if not isinstance(model, PeftModel):
        raise ConfigError("fit_classifier trains a PeftModel; wrap the network with get_peft_model first")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameter (adapter loaded with is_trainable=False?)")
    device = torch.device(device)
    model.to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    evaluator = _classification_evaluator(model, val_loader, num_classes, device, amp)
    trainer = SupervisedTrainer(
        device=device,
        max_epochs=epochs,
        train_data_loader=train_loader,
        network=model,
        optimizer=optimizer,
        loss_function=loss_function or nn.CrossEntropyLoss(),
        inferer=OutputSelectInferer(),
        prepare_batch=_prepare_batch,
        amp=amp,
    )
    steps_per_epoch = max(1, len(train_loader)) if hasattr(train_loader, "__len__") else 1
    total_steps = max(1, epochs * steps_per_epoch)

    result = FitResult(best_metric=float("-inf"), best_epoch=0, best_adapter_dir=None)
    state = _load_resume_state(out, model, optimizer) if resume else None
    start = 0
    if state is not None:
        trainer.state.epoch = int(state["epoch"])
        trainer.state.iteration = start = int(state["iteration"])
        result.best_metric, result.best_epoch = float(state["best_metric"]), int(state["best_epoch"])
        if (out / "best").is_dir():
            result.best_adapter_dir = out / "best"
        logger.info("resuming from %s at epoch %d", out / "last", trainer.state.epoch)

    # cosine schedule in closed form of the iteration, so a resumed run continues the same curve
    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    for group in optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * cosine(start)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine, last_epoch=start - 1 if start else -1)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: scheduler.step())

    @trainer.on(Events.ITERATION_COMPLETED(once=start + 1))
    def _first_loss(engine: Any) -> None:
        output = engine.state.output
        result.first_loss = float((output[0] if isinstance(output, list) else output)["loss"])

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine: Any) -> None:
        evaluator.run(engine.state.epoch)
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
        loss = engine.state.output[0]["loss"] if isinstance(engine.state.output, list) else engine.state.output["loss"]
        metrics["train_loss"] = float(loss)
        metrics["epoch"] = engine.state.epoch
        result.history.append(metrics)
        if metrics["val_auc"] > result.best_metric:
            result.best_metric, result.best_epoch = metrics["val_auc"], engine.state.epoch
            model.save_adapter(out / "best")
            result.best_adapter_dir = out / "best"
        _save_resume_state(
            out, model, optimizer, engine.state.epoch, engine.state.iteration, result.best_metric, result.best_epoch
        )
        logger.info("epoch %d: %s", engine.state.epoch, metrics)

    if progress:
        from ignite.contrib.handlers import ProgressBar

        ProgressBar(persist=False).attach(
            trainer, output_transform=lambda o: {"loss": (o[0] if isinstance(o, list) else o)["loss"]}
        )
    if tensorboard:
        TensorBoardStatsHandler(
            log_dir=str(out / "tb"), output_transform=lambda o: (o[0] if isinstance(o, list) else o)["loss"]
        ).attach(trainer)
        TensorBoardStatsHandler(
            log_dir=str(out / "tb"), iteration_log=False, global_epoch_transform=lambda _: trainer.state.epoch
        ).attach(evaluator)
    if trainer.state.epoch < epochs:
        trainer.run()
    result.epochs_run = trainer.state.epoch
    return result

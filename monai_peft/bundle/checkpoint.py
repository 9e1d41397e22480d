"""Adapter checkpoints for bundle training: best-on-validation, last-with-trainer-state, resume, install.

Layout under ``save_dir`` (a run folder, never the bundle's shipped ``models/adapter``)::

    best/  adapter_config.json, adapter_model.safetensors, checkpoint_info.json
    last/  the same + trainer_state.pt (optimizer, lr scheduler, epoch, iteration, best metric)

Each folder is written complete in a temporary sibling and swapped in with ``os.replace`` (a killed run leaves the
previous checkpoint intact; a swap interrupted between its two renames is recovered on the next load).
``trainer_state.pt`` is read back with ``torch.load(weights_only=True)`` (no arbitrary unpickling); adapters are
safetensors. Only rank 0 writes under ``torch.distributed``; every rank resumes.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.bundle.distributed import is_main_process, unwrap_ddp
from monai_peft.checkpoint import CONFIG_NAME, atomic_write_bytes, read_adapter_folder
from monai_peft.errors import CheckpointError, ConfigError
from monai_peft.model import PeftModel

__all__ = [
    "CHECKPOINT_INFO",
    "TRAINER_STATE",
    "AdapterCheckpointLoader",
    "AdapterCheckpointSaver",
    "install_adapter",
    "load_training_checkpoint",
    "resume_from_checkpoint",
    "save_training_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_INFO = "checkpoint_info.json"
TRAINER_STATE = "trainer_state.pt"


def _peft(network: nn.Module) -> PeftModel:
    net = unwrap_ddp(network)
    if not isinstance(net, PeftModel):
        raise ConfigError(
            f"adapter checkpoints need a PeftModel (or DDP around one), got {type(net).__name__}; build the network "
            "with get_peft_model / PeftModel.from_pretrained."
        )
    return net


def _check_target(dest: Path, overwrite: bool) -> None:
    """Refuse to replace a folder this module did not write (e.g. a shipped adapter) unless ``overwrite``."""
    if dest.exists() and not overwrite and not (dest / CHECKPOINT_INFO).is_file():
        raise CheckpointError(
            f"'{dest}' exists and was not written by a training run (no {CHECKPOINT_INFO}); refusing to overwrite it "
            "(it may be a shipped file). Choose another output folder, or pass overwrite=True to replace it."
        )


def _recover(dest: Path) -> None:
    """Undo a swap interrupted between its two renames (``dest`` gone, ``.dest.old-*`` left)."""
    if dest.exists():
        return
    olds = sorted(dest.parent.glob(f".{dest.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds:
        os.replace(olds[-1], dest)
        logger.warning("recovered %s from an interrupted checkpoint write (%s)", dest, olds[-1].name)


def _swap_in(tmp: Path, dest: Path) -> None:
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_float(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_training_checkpoint(
    directory: str | os.PathLike,
    network: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    state: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapter of ``network`` (and optionally the trainer state) to ``directory`` atomically.

    Args:
        directory: the checkpoint folder (replaced as a whole).
        network: ``PeftModel`` or DDP around one; saved with :meth:`PeftModel.save_adapter`.
        optimizer / lr_scheduler: their ``state_dict()`` go to ``trainer_state.pt`` (with ``state``).
        state: extra plain values for ``trainer_state.pt`` (``epoch``, ``iteration``, ``best_metric`` ...).
        info: JSON-able description written to ``checkpoint_info.json`` (epoch, metric ...).
        overwrite: allow replacing a folder that was not written by this function.

    Returns:
        ``directory``. On ranks > 0 of a distributed run nothing is written.
    """
    dest = Path(directory)
    if not is_main_process():
        return dest
    _check_target(dest, overwrite)
    peft = _peft(network)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        peft.save_adapter(tmp)
        if optimizer is not None or lr_scheduler is not None or state:
            payload = dict(state or {})
            if optimizer is not None:
                payload["optimizer"] = optimizer.state_dict()
            if lr_scheduler is not None:
                payload["lr_scheduler"] = lr_scheduler.state_dict()
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            atomic_write_bytes(tmp / TRAINER_STATE, buffer.getvalue())
        meta = {k: _json_float(v) for k, v in (info or {}).items()}
        atomic_write_bytes(tmp / CHECKPOINT_INFO, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_training_checkpoint(
    directory: str | os.PathLike,
    network: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint folder's adapter tensors into ``network`` (in place) and its optimizer/scheduler state.

    Returns:
        The plain values of ``trainer_state.pt`` (``epoch``, ``iteration``, ``best_metric`` ...), ``{}`` if the
        folder holds only an adapter.

    Raises:
        CheckpointError: missing/corrupt files, an adapter that does not fit ``network``, or a trainer state that
            is not loadable with ``weights_only=True``; the message says to delete the folder to start over.
    """
    directory = Path(directory)
    _recover(directory)
    peft = _peft(network)
    try:
        _, tensors, _ = read_adapter_folder(directory)
        peft._assign_adapter_tensors(peft.active_adapter or "default", tensors, str(directory))
    except CheckpointError as exc:
        raise CheckpointError(f"cannot resume from {directory}: {exc}. Delete {directory} to start over.") from exc
    state_file = directory / TRAINER_STATE
    if not state_file.is_file():
        return {}
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(  # torch's own message advises weights_only=False: never for a resume file
            f"cannot resume from {state_file} ({type(exc).__name__}): it is corrupt, or not a trainer state saved by "
            f"monai_peft (it is only read with torch.load(weights_only=True)). Delete {directory} to start over."
        ) from exc
    if optimizer is not None and "optimizer" in state:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(
                f"the optimizer state in {state_file} does not fit this optimizer ({exc}): the run folder belongs to "
                f"another configuration. Use another output folder, or delete {directory} to start over."
            ) from exc
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    return {k: v for k, v in state.items() if k not in ("optimizer", "lr_scheduler")}


def resume_from_checkpoint(
    trainer: Any,
    directory: str | os.PathLike,
    network: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
) -> dict[str, Any] | None:
    """Resume an ignite/MONAI ``trainer`` from ``directory`` (a ``last/`` folder) when it holds a trainer state.

    Sets ``trainer.state.epoch`` / ``iteration`` so the run continues with the next epoch, and logs
    ``"resuming from <file> at epoch N"``. Returns the restored state, or ``None`` when there is nothing to resume.
    """
    directory = Path(directory)
    _recover(directory)
    if not (directory / TRAINER_STATE).is_file():
        return None
    state = load_training_checkpoint(directory, network, optimizer, lr_scheduler)
    epoch = int(state.get("epoch", 0))
    trainer.state.epoch = epoch
    trainer.state.iteration = int(state.get("iteration", 0))
    max_epochs = getattr(trainer.state, "max_epochs", None)
    message = f"resuming from {directory / TRAINER_STATE} at epoch {epoch}"
    if max_epochs is not None and epoch >= max_epochs:
        message += f" (max_epochs {max_epochs} already reached: nothing left to train; raise --epochs to continue)"
    logger.info(message)
    return state


def _attach_once(engine: Any, event: Any, handler: Any) -> None:
    if not engine.has_event_handler(handler, event):
        engine.add_event_handler(event, handler)


class AdapterCheckpointLoader:
    """Ignite handler: at ``Events.STARTED`` resume the trainer from ``load_dir/last`` when it exists.

    Args:
        load_dir: the run folder (holding ``last/``), or a ``last``-style folder itself.
        network / optimizer / lr_scheduler: what to restore.
    """

    def __init__(
        self, load_dir: str | os.PathLike, network: nn.Module, optimizer: Any = None, lr_scheduler: Any = None
    ) -> None:
        self.load_dir = Path(load_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.state: dict[str, Any] | None = None

    def _folder(self) -> Path:
        return self.load_dir if (self.load_dir / TRAINER_STATE).is_file() else self.load_dir / "last"

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        _attach_once(engine, Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        self.state = resume_from_checkpoint(engine, self._folder(), self.network, self.optimizer, self.lr_scheduler)


class AdapterCheckpointSaver:
    """Ignite handler for bundle training: best adapter on a validation metric, last checkpoint, resume.

    Attach it to the TRAINER (``train#handlers``, after the ``ValidationHandler``), giving the evaluator whose
    key metric selects the best adapter. At every trainer epoch end it writes ``save_dir/best`` when the
    evaluator ran this epoch and its metric improved, and ``save_dir/last`` with the full trainer state. With
    ``resume=True`` it restores ``save_dir/last`` (adapter, optimizer, scheduler, epoch, iteration, best metric) at
    ``Events.STARTED`` and says so. Attached to an evaluator instead, it saves the best adapter only.

    Args:
        save_dir: run folder (e.g. ``$@bundle_root + '/runs/train'``). Must not be an adapter folder.
        network: the ``PeftModel`` being trained (or DDP around it).
        optimizer / lr_scheduler: saved in ``last`` for resume.
        evaluator: the validation engine (``@validate#evaluator``).
        key_metric_name: metric in ``evaluator.state.metrics``; default: the evaluator's key metric.
        key_metric_mode: ``"max"`` (AUC, Dice) or ``"min"`` (loss).
        save_best / save_last / resume: switch each part.
        overwrite: allow replacing ``best``/``last`` folders not written by a training run.

    Only rank 0 writes; every rank resumes (so DDP replicas stay identical).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        network: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        evaluator: Any = None,
        key_metric_name: str | None = None,
        key_metric_mode: str = "max",
        save_best: bool = True,
        save_last: bool = True,
        resume: bool = True,
        overwrite: bool = False,
    ) -> None:
        if key_metric_mode not in ("max", "min"):
            raise ConfigError(f"key_metric_mode must be 'max' or 'min', got {key_metric_mode!r}")
        self.save_dir = Path(save_dir)
        if (self.save_dir / CONFIG_NAME).is_file() and not overwrite:
            raise CheckpointError(
                f"save_dir '{self.save_dir}' is an adapter folder (it holds {CONFIG_NAME}); training writes best/ and "
                "last/ under a run folder. Point save_dir at e.g. runs/train, or pass overwrite=True."
            )
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.evaluator = evaluator
        self.key_metric_name = key_metric_name
        self.key_metric_mode = key_metric_mode
        self.save_best, self.save_last, self.resume, self.overwrite = save_best, save_last, resume, overwrite
        self.best_metric: float | None = None
        self.best_metric_epoch = -1
        self.resumed: dict[str, Any] | None = None

    @property
    def best_dir(self) -> Path:
        return self.save_dir / "best"

    @property
    def last_dir(self) -> Path:
        return self.save_dir / "last"

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events
        from monai.engines import Evaluator

        if isinstance(engine, Evaluator):
            if self.evaluator is None:
                self.evaluator = engine
            _attach_once(engine, Events.EPOCH_COMPLETED, self._on_validation)
            return
        if self.resume:
            _attach_once(engine, Events.STARTED, self._on_started)
        _attach_once(engine, Events.EPOCH_COMPLETED, self._on_epoch)

    # -- events -------------------------------------------------------------------------------------
    def _on_started(self, trainer: Any) -> None:
        self.resumed = resume_from_checkpoint(trainer, self.last_dir, self.network, self.optimizer, self.lr_scheduler)
        if self.resumed is not None and self.resumed.get("best_metric") is not None:
            self.best_metric = float(self.resumed["best_metric"])
            self.best_metric_epoch = int(self.resumed.get("best_metric_epoch", -1))

    def _metric(self, evaluator: Any) -> tuple[str, float] | None:
        name = self.key_metric_name or getattr(evaluator.state, "key_metric_name", None)
        if name is None or name not in evaluator.state.metrics:
            if name is not None:
                raise ConfigError(
                    f"key metric '{name}' is not among the evaluator's metrics {sorted(evaluator.state.metrics)}; "
                    "set key_metric_name to one of them."
                )
            return None
        return name, float(evaluator.state.metrics[name])

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_metric is None:
            return True
        return value > self.best_metric if self.key_metric_mode == "max" else value < self.best_metric

    def _maybe_save_best(self, evaluator: Any, epoch: int) -> None:
        found = self._metric(evaluator)
        if found is None or not self.save_best:
            return
        name, value = found
        if self._better(value):
            self.best_metric, self.best_metric_epoch = value, epoch
            save_training_checkpoint(
                self.best_dir,
                self.network,
                info={"epoch": epoch, "metric_name": name, "metric": value},
                overwrite=self.overwrite,
            )
            if is_main_process():
                logger.info("epoch %d: new best %s %.4f, adapter written to %s", epoch, name, value, self.best_dir)

    def _on_validation(self, evaluator: Any) -> None:
        self._maybe_save_best(evaluator, int(evaluator.state.epoch))

    def _on_epoch(self, trainer: Any) -> None:
        epoch = int(trainer.state.epoch)
        ev = self.evaluator
        if ev is not None and getattr(ev.state, "epoch", None) == epoch and ev.state.metrics:
            self._maybe_save_best(ev, epoch)
        if self.save_last:
            state = {
                "epoch": epoch,
                "iteration": int(trainer.state.iteration),
                "best_metric": self.best_metric,
                "best_metric_epoch": self.best_metric_epoch,
            }
            save_training_checkpoint(
                self.last_dir,
                self.network,
                self.optimizer,
                self.lr_scheduler,
                state=state,
                info={"epoch": epoch, "iteration": int(trainer.state.iteration), "best_metric": self.best_metric},
                overwrite=self.overwrite,
            )


def install_adapter(src: str | os.PathLike, dst: str | os.PathLike, overwrite: bool = False) -> Path | None:
    """Copy a trained adapter folder (e.g. ``runs/train/best``) to ``dst`` (e.g. the bundle's ``models/adapter``).

    Refuses to replace an existing ``dst`` unless ``overwrite=True`` (shipped files are never replaced by
    accident). The copy is checked (the adapter's sha256) and swapped in atomically. Rank 0 only.

    Returns:
        ``dst``, or ``None`` on ranks > 0.
    """
    src, dst = Path(src), Path(dst)
    if not is_main_process():
        return None
    read_adapter_folder(src)  # raises CheckpointError for an incomplete/corrupt source
    if dst.exists() and not overwrite:
        raise CheckpointError(
            f"'{dst}' exists; refusing to replace it with {src}. Pass overwrite=True (--install_adapter true in the "
            "bundle) to install the new adapter."
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(src / name, tmp / name)
        read_adapter_folder(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        _swap_in(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst

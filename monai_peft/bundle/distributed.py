"""Helpers for the multi-GPU (torchrun + DistributedDataParallel) path of a bundle's ``multi_gpu_train.json``.

``torchrun --nproc_per_node=N -m monai.bundle run --config_file "['configs/train.json','configs/multi_gpu_train.json']"``
starts N processes; each calls :func:`init_distributed` (NCCL on CUDA, gloo on CPU), wraps the PEFT model with
:func:`ddp_wrap`, reads its shard of the data through :func:`distributed_sampler`, and keeps only the handlers
that must run on every rank (:func:`main_process_handlers`). Only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "WRITING_HANDLERS",
    "ddp_wrap",
    "destroy_distributed",
    "distributed_device",
    "distributed_sampler",
    "get_rank",
    "init_distributed",
    "is_main_process",
    "main_process_handlers",
    "summary_writer",
    "unwrap_ddp",
]

#: handler classes that write files or logs; :func:`main_process_handlers` drops them on ranks > 0.
WRITING_HANDLERS: tuple[str, ...] = (
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "CheckpointSaver",
    "MetricsSaver",
    "ClassificationSaver",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "ProgressBarHandler",
)


def is_distributed() -> bool:
    """True inside an initialised ``torch.distributed`` process group."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """True on rank 0, or when not distributed: the process that writes checkpoints, logs and outputs."""
    return get_rank() == 0


def distributed_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (and sets it current), else ``cpu``."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group that torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...).

    Args:
        backend: ``None`` picks ``"nccl"`` when CUDA is available, else ``"gloo"`` (CPU).

    Returns:
        True once the group is initialised (idempotent).

    Raises:
        RuntimeError: not started by torchrun (no ``WORLD_SIZE``/``RANK`` in the environment).
    """
    if is_distributed():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise RuntimeError(
            "multi_gpu_train.json must be started by torchrun, e.g. torchrun --nproc_per_node=2 -m monai.bundle run "
            "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\" (WORLD_SIZE/RANK are not set)."
        )
    dist.init_process_group(backend=backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return True


def destroy_distributed() -> None:
    """Leave the process group (no-op when not distributed)."""
    if is_distributed():
        dist.destroy_process_group()


def distributed_sampler(dataset: Any, shuffle: bool = True, even_divisible: bool = True, seed: int = 0) -> Any:
    """MONAI ``DistributedSampler`` over ``dataset`` for this rank, or ``None`` when not distributed.

    ``even_divisible=False`` for validation (no sample is repeated; MONAI's metric handlers gather uneven shards).
    MONAI's engines call ``set_epoch`` on it at every epoch start.
    """
    if not is_distributed():
        return None
    from monai.data import DistributedSampler

    world = dist.get_world_size()
    if not even_divisible and len(dataset) < world:
        # MONAI's sampler cannot give a rank zero items: repeat items instead (with one item, every rank scores the
        # same case and the mean is unchanged; otherwise the repeated items weigh a little more in the mean).
        warnings.warn(
            f"{len(dataset)} item(s) for {world} processes: every rank gets a repeated item (even_divisible=True)",
            stacklevel=2,
        )
        even_divisible = True
    return DistributedSampler(dataset, even_divisible=even_divisible, shuffle=shuffle, seed=seed)


def ddp_wrap(network: nn.Module, device: torch.device | str | None = None, **kwargs: Any) -> nn.Module:
    """Move ``network`` (e.g. a ``PeftModel``) to ``device`` and wrap it in ``DistributedDataParallel``.

    Frozen base parameters (``requires_grad=False``) get no gradient hooks: only the adapter's gradients are
    all-reduced. Returns the network unchanged when not distributed.
    """
    device = torch.device(device) if device is not None else distributed_device()
    network = network.to(device)
    if not is_distributed():
        return network
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids, **kwargs)


def unwrap_ddp(network: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` wrappers."""
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def main_process_handlers(handlers: Iterable[Any] | None, drop: Sequence[str] = WRITING_HANDLERS) -> list[Any]:
    """``handlers`` on rank 0; on other ranks without those whose class name is in ``drop`` (writers, loggers).

    Handlers that must run on every rank (``ValidationHandler``, ``LrScheduleHandler``, the resume part of
    :class:`~monai_peft.bundle.AdapterCheckpointSaver`, which itself writes on rank 0 only) are kept.
    """
    handlers = list(handlers or [])
    if is_main_process():
        return handlers
    return [h for h in handlers if type(h).__name__ not in drop]


class _NullSummaryWriter:
    """Stands in for a ``SummaryWriter`` on ranks > 0: every method is a no-op, nothing is created on disk."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def summary_writer(log_dir: str | os.PathLike) -> Any:
    """A TensorBoard ``SummaryWriter`` for ``log_dir`` on rank 0; a no-op stand-in on other ranks.

    Give it to every ``TensorBoardStatsHandler`` of a bundle (``"summary_writer": "@tb_writer"``): MONAI's handler
    would otherwise create an event file on every rank as soon as it is instantiated. Close it at the end of the
    run (``"$@tb_writer.close()"``) so the last events are flushed.
    """
    if not is_main_process():
        return _NullSummaryWriter()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))

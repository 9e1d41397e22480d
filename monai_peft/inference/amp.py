"""Automatic mixed precision choices for inference: which autocast dtype to use on which device."""

from __future__ import annotations

import torch

from monai_peft.errors import ConfigError

__all__ = ["AmpSetting", "resolve_amp_dtype"]

AmpSetting = bool | str | torch.dtype | None

_OFF = {"off", "no", "none", "false", "fp32", "float32"}
_BF16 = {"bf16", "bfloat16"}
_FP16 = {"fp16", "float16", "half"}


def _cuda_bf16(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except (RuntimeError, AssertionError):  # pragma: no cover - broken CUDA setups
        return False


def resolve_amp_dtype(amp: AmpSetting, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for full fp32.

    Args:
        amp: ``"auto"`` (default policy): bf16 on CUDA devices that support it, else fp16 on CUDA; fp32 (None) on
            CPU and other devices. ``True``: like ``"auto"`` on CUDA, bf16 on CPU (autocast is asked for).
            ``False`` / ``None`` / ``"fp32"``: no autocast. ``"bf16"`` / ``"fp16"`` (or ``torch.bfloat16`` /
            ``torch.float16``): that dtype on any device.
        device: the device the windows are computed on (``sw_device``).

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or None.

    Raises:
        ConfigError: an unknown setting.
    """
    dev = torch.device(device)
    if amp is None or amp is False:
        return None
    if isinstance(amp, torch.dtype):
        if amp in (torch.bfloat16, torch.float16):
            return amp
        if amp == torch.float32:
            return None
        raise ConfigError(f"amp dtype must be torch.bfloat16, torch.float16 or torch.float32, got {amp}")
    if amp is True or (isinstance(amp, str) and amp.lower() == "auto"):
        if dev.type == "cuda":
            return torch.bfloat16 if _cuda_bf16(dev) else torch.float16
        if amp is True:
            return torch.bfloat16 if dev.type == "cpu" else torch.float16
        return None
    if isinstance(amp, str):
        key = amp.lower().removeprefix("torch.")
        if key in _OFF:
            return None
        if key in _BF16:
            return torch.bfloat16
        if key in _FP16:
            return torch.float16
    raise ConfigError(
        f"amp must be 'auto', True, False, 'bf16', 'fp16' or 'fp32' (or a torch dtype), got {amp!r}. "
        "'auto' uses bf16 on GPUs that support it, fp16 on other GPUs and fp32 on CPU."
    )

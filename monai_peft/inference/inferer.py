"""Sliding-window inference for PEFT models: merged adapters, mixed precision, CPU stitching.

:class:`PeftSlidingWindowInferer` is a MONAI :class:`~monai.inferers.SlidingWindowInferer` (so MONAI engines,
bundles and MONAI Label treat it as one) that, before running the windows,

1. prepares the network once (:func:`~monai_peft.inference.prepare_for_inference`): eval mode, every mergeable
   adapter folded into a *copy* of the weights; DKA / adapters / prompts run unmerged. The prepared network is
   cached per network object and re-prepared whenever the network's tensors change (training between two
   validation runs, ``load_state_dict``, ``.to(device)``, another active adapter);
2. runs each window batch under ``torch.autocast`` (``amp="auto"``: bf16 on GPUs that support it, fp16 on other
   GPUs, fp32 on CPU) and casts window outputs to float32 *before* they are blended, so the stitched output is
   accumulated and returned in float32;
3. computes the windows on ``sw_device`` (default: the network's device) and stitches the output on ``device``
   (default: the input's device). A ``(1, 1, 512, 512, 600)`` CT kept on the CPU with the network on the GPU needs
   only the window batch on the GPU.

Volumes smaller than ``roi_size`` along any axis are padded to the ROI (``padding_mode``) and the output is cropped
back to the input's size. ``roi_size`` is in **voxels** of the array the inferer receives, i.e. after any
``Spacingd`` of the preprocessing; for anisotropic data (e.g. 0.8 x 0.8 x 3 mm) choose a ROI that covers a sensible
physical extent on every axis (:func:`roi_size_for_spacing` converts millimetres to voxels) or resample to
isotropic spacing first.

Example (bundle config)::

    "inferer": {
        "_target_": "monai_peft.inference.PeftSlidingWindowInferer",
        "roi_size": [96, 96, 96], "sw_batch_size": 4, "overlap": 0.5, "amp": "auto", "device": "cpu"
    }
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import sliding_window_inference
from monai.utils import fall_back_tuple
from torch import nn

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.inference.amp import AmpSetting, resolve_amp_dtype
from monai_peft.inference.merge import prepare_for_inference

__all__ = ["PeftSlidingWindowInferer", "network_fingerprint", "roi_size_for_spacing"]


def network_fingerprint(network: nn.Module) -> tuple:
    """A cheap key that changes whenever ``network``'s tensors or adapter state change.

    It holds, for every parameter and buffer, its identity, storage address and in-place version counter
    (``optimizer.step()``, ``load_state_dict``, ``copy_`` and ``.to()`` all change one of them), plus the
    PeftModel state (active adapter, disabled, merged). Writes through ``tensor.data`` bypass the version
    counter: after such writes call :meth:`PeftSlidingWindowInferer.clear_cache`.
    """
    state: list[Any] = []
    for t in (*network.parameters(), *network.buffers()):
        state.append((id(t), t.data_ptr(), t._version, t.device.type))
    for m in network.modules():
        if hasattr(m, "_active") and hasattr(m, "_disabled") and hasattr(m, "peft_config"):
            state.append((id(m), m._active, m._disabled, m._merged, m._unloaded))
    return tuple(state)


def roi_size_for_spacing(
    extent_mm: Sequence[float] | float, spacing: Sequence[float], multiple: int = 1, minimum: int | None = None
) -> tuple[int, ...]:
    """ROI size in voxels covering ``extent_mm`` millimetres per axis at ``spacing`` (mm per voxel).

    Each axis is rounded to the nearest multiple of ``multiple`` (e.g. 32 for SwinUNETR, 16 for a ViT with 16^3
    patches), at least ``minimum`` voxels (default: ``multiple``).

    Example::

        roi_size_for_spacing(96, (0.8, 0.8, 3.0), multiple=32)   # (128, 128, 32)
    """
    spacing = tuple(float(s) for s in spacing)
    extents = (float(extent_mm),) * len(spacing) if isinstance(extent_mm, (int, float)) else tuple(extent_mm)
    if len(extents) != len(spacing) or any(s <= 0 for s in spacing) or any(e <= 0 for e in extents):
        raise ConfigError(f"need one positive extent per axis and positive spacing, got {extents} and {spacing}")
    if multiple < 1:
        raise ConfigError(f"multiple must be >= 1, got {multiple}")
    low = multiple if minimum is None else max(int(minimum), 1)
    out = []
    for e, s in zip(extents, spacing):
        n = max(int(round(e / s / multiple)) * multiple, low)
        out.append(int(math.ceil(n / multiple) * multiple))
    return tuple(out)


def _crop_back(out: Any, pads: list[tuple[int, int]], padded: tuple[int, ...]) -> Any:
    """Remove the padding of :meth:`PeftSlidingWindowInferer._pad_to_roi` from every output (scaled for outputs
    whose resolution differs from the input's)."""
    if isinstance(out, Mapping):
        return type(out)({k: _crop_back(v, pads, padded) for k, v in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(_crop_back(v, pads, padded) for v in out)
    index: list[slice] = [slice(None), slice(None)]
    for (a, b), n_in, n_out in zip(pads, padded, out.shape[2:]):
        zoom = n_out / n_in
        index.append(slice(int(round(a * zoom)), int(round((n_in - b) * zoom))))
    return out[tuple(index)]


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out if out.dtype == torch.float32 else out.float()
    if isinstance(out, Mapping):
        return type(out)({k: _to_float32(v) for k, v in out.items()})
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(v) for v in out)
    return out


def _network_device(network: Any, fallback: torch.device) -> torch.device:
    if isinstance(network, nn.Module):
        for t in (*network.parameters(), *network.buffers()):
            return t.device
    return fallback


def _network_float_dtype(network: Any) -> torch.dtype:
    if isinstance(network, nn.Module):
        for p in network.parameters():
            if p.is_floating_point():
                return p.dtype
    return torch.float32


class _WindowPredictor:
    """Runs one window batch ``(B, C, *roi)``: memory format, autocast, float32 outputs."""

    def __init__(
        self,
        network: Callable[..., Any],
        amp_dtype: torch.dtype | None,
        device_type: str,
        memory_format: torch.memory_format | None,
        input_dtype: torch.dtype,
    ) -> None:
        self.network = network
        self.amp_dtype = amp_dtype
        self.device_type = device_type
        self.memory_format = memory_format
        self.input_dtype = input_dtype

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.amp_dtype is None and x.dtype != self.input_dtype:
            x = x.to(self.input_dtype)
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        if self.amp_dtype is None:
            out = self.network(x, *args, **kwargs)
        else:
            with torch.autocast(device_type=self.device_type, dtype=self.amp_dtype):
                out = self.network(x, *args, **kwargs)
        return _to_float32(out)


class PeftSlidingWindowInferer(SlidingWindowInferer):
    """Sliding-window inference that merges adapters, uses AMP and stitches on a chosen device.

    Args:
        roi_size: window size in voxels, one value per spatial axis (2 for 2D, 3 for 3D) or an int for all axes;
            non-positive / None entries use the full input size on that axis (MONAI semantics).
        sw_batch_size: windows per network call.
        overlap: fraction of overlap between neighbouring windows, per axis or one value, in ``[0, 1)``.
        mode: blending of overlapping windows, ``"gaussian"`` (default) or ``"constant"``.
        sigma_scale: gaussian sigma as a fraction of ``roi_size`` (per axis or one value).
        padding_mode: how inputs smaller than the ROI are padded (``"constant"``, ``"reflect"``, ``"replicate"``,
            ``"circular"``); the output is cropped back to the input size.
        cval: padding value for ``"constant"``.
        sw_device: device the windows are computed on; default: the network's device.
        device: device the output is stitched and returned on; default: the input's device. Keep a large volume
            on the CPU (``device="cpu"``) to need only window batches on the GPU.
        progress: show a tqdm progress bar over the windows.
        amp: mixed precision (see :func:`~monai_peft.inference.resolve_amp_dtype`): ``"auto"`` (bf16 where the
            GPU supports it, fp16 on other GPUs, fp32 on CPU), ``True``, ``False``, ``"bf16"``, ``"fp16"``,
            ``"fp32"``. Outputs are always float32.
        merge: prepare the network with :func:`~monai_peft.inference.prepare_for_inference` (eval mode, mergeable
            adapters merged into a copy; the caller's network is never modified). False: run it as given.
        merge_inplace: merge the caller's PeftModel itself (saves one copy of the weights; the caller's
            PeftModel is unloaded and unusable afterwards).
        channels_last: run convolutions in channels-last memory format (``channels_last_3d`` in 3D) on a copy of
            the network.
        compile: wrap the prepared network in ``torch.compile`` (``compile_kwargs`` passed on).
        compile_kwargs: keyword arguments of ``torch.compile`` (e.g. ``{"mode": "max-autotune"}``).
        check_finite: raise :class:`~monai_peft.errors.InputDataError` when the input holds NaN / Inf voxels.
        cache_roi_weight_map, cpu_thresh, buffer_steps, buffer_dim, with_coord: as in MONAI's
            :class:`~monai.inferers.SlidingWindowInferer`.

    Call:
        ``inferer(inputs, network, *args, **kwargs)`` with ``inputs`` of shape ``(B, C, H, W[, D])`` gives the
        network's output blended over the windows, float32, of shape ``(B, C_out, H, W[, D])`` (a tuple / dict
        of such tensors for networks that return several), on ``device``. A ``MetaTensor`` input gives a
        ``MetaTensor`` with its meta.

    Example::

        inferer = PeftSlidingWindowInferer(roi_size=(96, 96, 64), sw_batch_size=2, overlap=0.5, device="cpu")
        logits = inferer(image[None], peft_model)   # (1, n_classes, X, Y, Z), float32
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        overlap: Sequence[float] | float = 0.25,
        mode: str = "gaussian",
        sigma_scale: Sequence[float] | float = 0.125,
        padding_mode: str = "constant",
        cval: float = 0.0,
        sw_device: torch.device | str | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        amp: AmpSetting = "auto",
        merge: bool = True,
        merge_inplace: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        compile_kwargs: dict[str, Any] | None = None,
        check_finite: bool = True,
        cache_roi_weight_map: bool = False,
        cpu_thresh: int | None = None,
        buffer_steps: int | None = None,
        buffer_dim: int = -1,
        with_coord: bool = False,
    ) -> None:
        if isinstance(roi_size, bool) or not isinstance(roi_size, (int, Sequence)) or isinstance(roi_size, str):
            raise ConfigError(f"roi_size must be an int or a sequence of ints (voxels per axis), got {roi_size!r}")
        if isinstance(roi_size, Sequence) and len(roi_size) not in (1, 2, 3):
            raise ConfigError(f"roi_size must have 2 (2D) or 3 (3D) entries, got {list(roi_size)}")
        if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
            raise ConfigError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
        for o in overlap if isinstance(overlap, Sequence) else (overlap,):
            if not 0 <= float(o) < 1:
                raise ConfigError(f"overlap must be in [0, 1), got {overlap!r}")
        if str(mode).lower() not in ("gaussian", "constant"):
            raise ConfigError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
        resolve_amp_dtype(amp, "cpu")  # validates the setting early, at config time
        super().__init__(
            roi_size=roi_size,
            sw_batch_size=sw_batch_size,
            overlap=overlap,
            mode=str(mode).lower(),
            sigma_scale=sigma_scale,
            padding_mode=padding_mode,
            cval=cval,
            sw_device=sw_device,
            device=device,
            progress=progress,
            cache_roi_weight_map=cache_roi_weight_map,
            cpu_thresh=cpu_thresh,
            buffer_steps=buffer_steps,
            buffer_dim=buffer_dim,
            with_coord=with_coord,
        )
        self.amp = amp
        self.merge = bool(merge)
        self.merge_inplace = bool(merge_inplace)
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.compile_kwargs = dict(compile_kwargs or {})
        self.check_finite = bool(check_finite)
        self._cache: tuple[weakref.ref, tuple, Any] | None = None

    # ------------------------------------------------------------------------------------------
    # network preparation (cached)
    # ------------------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget the prepared (merged / compiled) network; the next call prepares it again."""
        self._cache = None

    def prepared_network(self, network: Callable[..., Any]) -> Callable[..., Any]:
        """The network the windows run through: merged, channels-last and compiled as configured (cached).

        The cache holds one network: it is reused while ``network`` is the same object with unchanged tensors
        (:func:`network_fingerprint`), and rebuilt otherwise.
        """
        if not isinstance(network, nn.Module):
            return network
        key = network_fingerprint(network)
        if self._cache is not None:
            ref, cached_key, prepared = self._cache
            if ref() is network and cached_key == key:
                return network if prepared is None else prepared
        prepared = self._prepare(network)
        if self.merge_inplace and prepared is not network:
            # the caller's PeftModel was consumed; key the cache on it anyway (it must not be used again)
            key = network_fingerprint(network)
        self._cache = (weakref.ref(network), key, None if prepared is network else prepared)
        return prepared

    def _prepare(self, network: nn.Module) -> Callable[..., Any]:
        net: nn.Module = (
            prepare_for_inference(network, merge=True, inplace=self.merge_inplace) if self.merge else network.eval()
        )
        if self.channels_last:
            if net is network:
                net = copy.deepcopy(network).eval()
            fmt = self._memory_format(net)
            if fmt is not None:
                net = net.to(memory_format=fmt)
        if self.compile:
            return torch.compile(net, **self.compile_kwargs)
        return net

    def _memory_format(self, net: nn.Module) -> torch.memory_format | None:
        spatial = self._spatial_dims_hint()
        if spatial == 3:
            return torch.channels_last_3d
        if spatial == 2:
            return torch.channels_last
        dims = {p.ndim for p in net.parameters()}
        return torch.channels_last_3d if 5 in dims else torch.channels_last if 4 in dims else None

    def _spatial_dims_hint(self) -> int | None:
        return len(self.roi_size) if isinstance(self.roi_size, Sequence) and len(self.roi_size) > 1 else None

    # ------------------------------------------------------------------------------------------
    # call
    # ------------------------------------------------------------------------------------------
    def _check_inputs(self, inputs: Any) -> int:
        if not isinstance(inputs, torch.Tensor):
            raise InputDataError(
                f"the inferer expects a tensor (B, C, H, W[, D]), got {type(inputs).__name__}; batch the image "
                "first (e.g. image[None] or a DataLoader)"
            )
        spatial = self._spatial_dims_hint()
        if spatial is not None and inputs.ndim != spatial + 2:
            got = inputs.ndim - 2
            raise InputDataError(
                f"the inferer's roi_size {list(self.roi_size)} is {spatial}D and needs inputs (B, C, "
                f"{'H, W, D' if spatial == 3 else 'H, W'}), but got shape {tuple(inputs.shape)} "
                f"({max(got, 0)} spatial axes). Give a {spatial}D image (a {'volume' if spatial == 3 else 'slice'}), "
                "or use the bundle / inferer made for this dimensionality"
            )
        if spatial is None and inputs.ndim not in (4, 5):
            raise InputDataError(f"inputs must be (B, C, H, W) or (B, C, H, W, D), got shape {tuple(inputs.shape)}")
        if any(s == 0 for s in inputs.shape):
            raise InputDataError(f"inputs have an empty axis: shape {tuple(inputs.shape)}")
        if self.check_finite and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
            n_bad = int((~torch.isfinite(inputs)).sum())
            raise InputDataError(
                f"the input volume holds {n_bad} NaN/Inf voxel(s) (shape {tuple(inputs.shape)}); the prediction would "
                "be meaningless. Check the source file, or clean the values in preprocessing (e.g. "
                "monai.transforms.NormalizeIntensityd on a finite image)"
            )
        return inputs.ndim - 2

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor | Sequence[torch.Tensor] | dict[Any, torch.Tensor]],
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, ...] | dict[Any, torch.Tensor]:
        """Run ``network`` over ``inputs`` window by window; see the class docstring for shapes and devices."""
        condition = kwargs.get("condition")
        if condition is not None and condition.shape != inputs.shape:
            raise ValueError(f"`condition` must match shape of `inputs` ({inputs.shape}), but got {condition.shape}")
        self._check_inputs(inputs)
        net = self.prepared_network(network)
        if inputs.dtype != torch.float32:
            inputs = inputs.float()  # keeps a MetaTensor's meta; the stitched output is accumulated in float32
        sw_device = torch.device(self.sw_device) if self.sw_device is not None else None
        if sw_device is None:
            sw_device = _network_device(network if isinstance(network, nn.Module) else net, inputs.device)
        amp_dtype = resolve_amp_dtype(self.amp, sw_device)
        fmt = None
        if self.channels_last:
            fmt = torch.channels_last_3d if inputs.ndim == 5 else torch.channels_last
        predictor = _WindowPredictor(net, amp_dtype, sw_device.type, fmt, _network_float_dtype(net))

        device = kwargs.pop("device", self.device)
        buffer_steps = kwargs.pop("buffer_steps", self.buffer_steps)
        buffer_dim = kwargs.pop("buffer_dim", self.buffer_dim)
        if device is None and self.cpu_thresh is not None and inputs.shape[2:].numel() > self.cpu_thresh:
            device = "cpu"  # stitch in CPU memory when the image is large
        inputs, pad = self._pad_to_roi(inputs)
        with torch.no_grad():
            out = sliding_window_inference(
                inputs,
                self.roi_size,
                self.sw_batch_size,
                predictor,
                self.overlap,
                self.mode,
                self.sigma_scale,
                self.padding_mode,
                self.cval,
                sw_device,
                device,
                self.progress,
                self.roi_weight_map,
                None,
                buffer_steps,
                buffer_dim,
                self.with_coord,
                *args,
                **kwargs,
            )
        if pad is not None:
            out = _crop_back(out, pad, tuple(inputs.shape[2:]))
        return _to_float32(out)

    def _pad_to_roi(self, inputs: torch.Tensor) -> tuple[torch.Tensor, list[tuple[int, int]] | None]:
        """Pad axes shorter than the ROI (half before, half after); returns the padded input and the pads.

        MONAI pads too, but its ``"reflect"`` fails when a pad exceeds the axis length; here such axes fall back
        to ``"replicate"`` (with a warning), so any small volume works.
        """
        spatial = tuple(inputs.shape[2:])
        roi = fall_back_tuple(self.roi_size, spatial)
        pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, spatial)]
        if not any(a or b for a, b in pads):
            return inputs, None
        mode = str(getattr(self.padding_mode, "value", self.padding_mode)).lower()
        if mode == "reflect" and any(max(a, b) >= s for (a, b), s in zip(pads, spatial)):
            warnings.warn(
                f"input {spatial} is too small to reflect-pad to the ROI {roi}; padding with 'replicate' instead",
                UserWarning,
                stacklevel=3,
            )
            mode = "replicate"
        flat = [v for a, b in reversed(pads) for v in (a, b)]  # F.pad order: last axis first
        padded = torch.nn.functional.pad(
            inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs,
            flat,
            mode=mode,
            value=self.cval if mode == "constant" else None,
        )
        if isinstance(inputs, MetaTensor):
            padded = MetaTensor(padded, meta=inputs.meta)
        return padded, pads

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(roi_size={self.roi_size}, sw_batch_size={self.sw_batch_size}, overlap={self.overlap}, "
            f"mode={self.mode.value if hasattr(self.mode, 'value') else self.mode}, amp={self.amp!r}, merge={self.merge}, "
            f"sw_device={self.sw_device}, device={self.device})"
        )

"""Effective receptive field (ERF) of any network layer, 2D or 3D, with or without PEFT adapters.

Protocol (Luo et al., "Understanding the Effective Receptive Field in Deep Convolutional Neural
Networks", NeurIPS 2016, as popularised by RepLKNet, Ding et al., CVPR 2022; the DKA paper's own
protocol could not be read, see ``/work/shared/METHODS.md`` §7.4):

1. take a feature layer (a module name) and its output for an input batch ``x (B, C_in, *S)``;
   token outputs ``(B, P + N, C)`` are reshaped to their patch grid (prefix/CLS tokens dropped),
   channel-last maps ``(B, *grid, C)`` and channel-first maps ``(B, C, *grid)`` are used as such;
2. the *centre output unit* of image ``b`` is ``y_b = sum_c F[b, c, g_1 // 2, ..., g_d // 2]``
   (sum over channels of the centre position of the grid);
3. its contribution map is ``|d y_b / d x_b|`` summed over the input channels; the maps are summed
   over ``N`` real images (the network in eval mode, so images do not interact);
4. **area ratio** at ``t``: sort the aggregated contributions in decreasing order and take the
   smallest set of input pixels/voxels that holds ``t`` of the total contribution; the ratio is
   its size over the number of input pixels/voxels (``t = 20, 30, 50, 99 %`` by default). A larger
   ratio = a larger ERF. RepLKNet reports the side of the smallest *centred square*; the brief of
   this project asks for the smallest *set*, which does not assume a square shape;
5. a heat map of ``log10`` of the normalised contributions (RepLKNet shows log-scaled maps); for
   3D inputs the three orthogonal slices through the centre of the volume.

Example::

    from monai_peft.analysis.erf import compute_erf, save_erf_heatmap
    res = compute_erf(peft_model, test_images, layer="_blocks.6.0")
    res.area_ratios        # {0.2: 0.01, 0.3: 0.02, 0.5: 0.05, 0.99: 0.6}
    save_erf_heatmap(res, "erf.png")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_peft.errors import ConfigError, InputDataError, TargetingError
from monai_peft.methods.dka import network_token_geometry, resolve_token_grid
from monai_peft.methods.layout import feature_layout
from monai_peft.targeting import get_submodule, innermost

__all__ = [
    "THRESHOLDS",
    "ERFResult",
    "area_ratio",
    "area_ratios",
    "centre_unit",
    "compute_erf",
    "load_images",
    "output_to_map",
    "ratio_table",
    "run_erf_command",
    "save_erf_figure",
    "save_erf_heatmap",
]

#: Fractions of the total contribution reported by default (RepLKNet's t = 20, 30, 50, 99 %).
THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
_LAYOUTS = ("auto", "tokens", "channel_first", "channel_last")


# ---------------------------------------------------------------------------------------------
# area ratio
# ---------------------------------------------------------------------------------------------
def area_ratio(contributions: np.ndarray | torch.Tensor, t: float) -> float:
    """Fraction of the input holding ``t`` of the total contribution (smallest set, largest values first).

    Args:
        contributions: non-negative aggregated contribution map, any shape (``(H, W)``, ``(D, H, W)``).
        t: fraction in ``(0, 1]``.

    Returns:
        ``k / numel`` where ``k`` is the smallest number of entries whose sum reaches ``t * total``
        (a relative tolerance of 1e-12 absorbs float rounding of ``t * total``).

    Raises:
        InputDataError: empty, negative or all-zero contributions.
        ConfigError: ``t`` outside ``(0, 1]``.
    """
    if not 0.0 < float(t) <= 1.0:
        raise ConfigError(f"threshold t must be in (0, 1], got {t}")
    arr = (
        contributions.detach().cpu().double().numpy()
        if isinstance(contributions, torch.Tensor)
        else np.asarray(contributions, dtype=np.float64)
    )
    flat = arr.reshape(-1)
    if flat.size == 0 or not np.all(np.isfinite(flat)) or (flat < 0).any():
        raise InputDataError("contributions must be a non-empty map of finite, non-negative values")
    total = flat.sum()
    if total <= 0:
        raise InputDataError(
            "the centre output unit has zero gradient with respect to every input pixel (dead unit, or a layer that "
            "does not depend on the input); choose another layer or more images"
        )
    csum = np.cumsum(np.sort(flat)[::-1])
    k = int(np.searchsorted(csum, float(t) * total * (1.0 - 1e-12), side="left")) + 1
    return min(k, flat.size) / flat.size


def area_ratios(
    contributions: np.ndarray | torch.Tensor, thresholds: Sequence[float] = THRESHOLDS
) -> dict[float, float]:
    """``{t: area_ratio(contributions, t)}`` for every threshold."""
    return {float(t): area_ratio(contributions, t) for t in thresholds}


# ---------------------------------------------------------------------------------------------
# feature maps and the centre unit
# ---------------------------------------------------------------------------------------------
def output_to_map(
    output: torch.Tensor,
    spatial_dims: int,
    *,
    layout: str = "channel_first",
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
) -> torch.Tensor:
    """A layer output as a channel-first map ``(B, C, *grid)``.

    Args:
        output: tokens ``(B, P + N, C)``, channel-first ``(B, C, *grid)`` or channel-last ``(B, *grid, C)``.
        spatial_dims: 2 or 3.
        layout: ``"tokens"``, ``"channel_first"`` or ``"channel_last"``.
        grid / num_prefix_tokens: token grid facts (see :func:`monai_peft.methods.dka.resolve_token_grid`).
    """
    if layout == "tokens":
        if output.dim() != 3:
            raise InputDataError(f"token layout needs (B, tokens, C), got {tuple(output.shape)}")
        b, n, c = output.shape
        n_prefix, grid_t = resolve_token_grid(n, spatial_dims, grid, num_prefix_tokens)
        return output[:, n_prefix:].reshape(b, *grid_t, c).movedim(-1, 1)
    if output.dim() != spatial_dims + 2:
        raise InputDataError(
            f"a {layout} map of a {spatial_dims}D input must have {spatial_dims + 2} axes, got {tuple(output.shape)}"
        )
    return output.movedim(-1, 1) if layout == "channel_last" else output


def centre_unit(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B,)``: sum over channels of the centre position ``(g_i // 2)`` of a channel-first map ``(B, C, *grid)``."""
    centre = tuple(s // 2 for s in feature_map.shape[2:])
    return feature_map[(slice(None), slice(None), *centre)].sum(dim=1)


# ---------------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------------
@dataclass
class ERFResult:
    """An ERF measurement.

    Attributes:
        contributions: ``(*S)`` float64, ``sum_b sum_c |d y_b / d x_b[c]|`` over the input's spatial size ``S``.
        layer: the measured layer (``""`` = the network output).
        layout: how the layer output was read (tokens / channel_first / channel_last).
        output_grid: spatial size of the layer's feature map; ``centre``: the centre position used.
        num_images: number of images aggregated.
        area_ratios: ``{t: ratio}`` (see :func:`area_ratio`).
    """

    contributions: np.ndarray
    layer: str
    layout: str
    output_grid: tuple[int, ...]
    centre: tuple[int, ...]
    num_images: int
    area_ratios: dict[float, float] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.contributions.shape)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (without the map)."""
        return {
            "layer": self.layer,
            "layout": self.layout,
            "input_shape": list(self.input_shape),
            "output_grid": list(self.output_grid),
            "centre": list(self.centre),
            "num_images": self.num_images,
            "area_ratios": {f"{t:g}": r for t, r in self.area_ratios.items()},
        }


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the layer output is known."""


def _resolve_layer(model: nn.Module, layer: str | None) -> tuple[nn.Module, nn.Module, str]:
    """(module to hook, network for canonical names, canonical name)."""
    from monai_peft.model import PeftModel

    base = model.base_model if isinstance(model, PeftModel) else model
    if not layer:
        return model, base, ""
    try:
        return get_submodule(base, layer), base, layer
    except TargetingError:
        pass
    try:
        return model.get_submodule(layer), base, layer
    except AttributeError as exc:
        raise TargetingError(
            f"ERF: no module named {layer!r} in {type(innermost(base)).__name__}; give a module name such as "
            "'blocks.11' (ViT), 'swinViT.layers4.0.blocks.1' (SwinUNETR) or '_blocks.6.0' (EfficientNet)"
        ) from exc


def _auto_layout(output: torch.Tensor, x: torch.Tensor, base: nn.Module, name: str, hooked: nn.Module) -> str:
    d = x.dim() - 2
    if output.dim() == 3 and d != 1:
        return "tokens"
    if output.dim() != d + 2:
        raise InputDataError(
            f"ERF: the output of layer {name!r} has shape {tuple(output.shape)}, neither tokens (B, N, C) nor a {d}D "
            "feature map; choose a layer that keeps spatial positions"
        )
    try:
        return "channel_last" if feature_layout(innermost(hooked)).channel_dim == -1 else "channel_first"
    except TargetingError:
        return "channel_first"


def _batches(images: torch.Tensor | Iterable[Any], batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        for i in range(0, images.shape[0], batch_size):
            yield images[i : i + batch_size]
        return
    for item in images:
        batch = item["image"] if isinstance(item, Mapping) else item
        batch = torch.as_tensor(batch)
        yield batch


def compute_erf(
    model: nn.Module,
    images: torch.Tensor | Iterable[Any],
    layer: str | None = None,
    *,
    layout: str = "auto",
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    thresholds: Sequence[float] = THRESHOLDS,
    batch_size: int = 8,
    max_images: int | None = None,
    device: str | torch.device | None = None,
) -> ERFResult:
    """Measure the ERF of ``layer`` of ``model`` on real ``images`` (see the module docstring).

    Args:
        model: any network or :class:`~monai_peft.model.PeftModel` (the active adapter is included).
        images: ``(N, C, *S)`` tensor, or an iterable of such batches / of dicts with ``"image"``.
        layer: module name (canonical names of the base network, e.g. ``"blocks.11"``; names inside a PeftModel
            also work); ``None``/``""`` = the network output itself.
        layout: ``"auto"`` (3-axis outputs are tokens; maps are channel-last when the layer ends with a
            Linear/LayerNorm, e.g. Swin blocks, else channel-first), or one of ``tokens``, ``channel_first``,
            ``channel_last``.
        grid / num_prefix_tokens: token grid facts; default: read from the network (patch embedding, CLS token),
            else a square/cube grid after 0 or 1 prefix token.
        thresholds: fractions ``t`` for :func:`area_ratio`.
        batch_size: images per backward pass when ``images`` is a tensor.
        max_images: stop after this many images.
        device: where to run (default: the model's device).

    Returns:
        :class:`ERFResult`.
    """
    if layout not in _LAYOUTS:
        raise ConfigError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    hooked, base, name = _resolve_layer(model, layer)
    ref = next(iter(model.parameters()), None)
    device = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    captured: dict[str, torch.Tensor] = {}
    stop = hooked is not model

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        captured["y"] = out[0] if isinstance(out, tuple | list) else out
        if stop:
            raise _Captured

    modes = [(m, m.training) for m in model.modules()]
    handle = hooked.register_forward_hook(hook)
    total: torch.Tensor | None = None
    seen = 0
    used_layout, out_grid, centre = layout, (), ()
    try:
        model.eval()
        for batch in _batches(images, batch_size):
            if max_images is not None and seen >= max_images:
                break
            if max_images is not None:
                batch = batch[: max_images - seen]
            x = batch.to(device=device, dtype=dtype).detach().requires_grad_(True)
            if x.dim() < 4:
                raise InputDataError(
                    f"ERF needs image batches (B, C, *spatial) with 2 or 3 spatial axes, got {tuple(x.shape)}"
                )
            captured.clear()
            with torch.enable_grad():
                with contextlib.suppress(_Captured):
                    model(x)
                y = captured.get("y")
                if not isinstance(y, torch.Tensor):
                    raise InputDataError(
                        f"ERF: layer {name or '<output>'!r} did not produce a tensor in the forward pass"
                    )
                if used_layout == "auto":
                    used_layout = _auto_layout(y, x, base, name, hooked)
                spatial_dims = x.dim() - 2
                p, g = num_prefix_tokens, grid
                if used_layout == "tokens" and (p is None or g is None):
                    geo = network_token_geometry(base, name) if name else None
                    g = g if g is not None else (geo.grid if geo is not None else None)
                    if g is None and geo is not None:
                        g = geo.grid_for(x.shape[2:])
                    p = p if p is not None else (geo.num_prefix_tokens if geo is not None else None)
                fmap = output_to_map(y, spatial_dims, layout=used_layout, grid=g, num_prefix_tokens=p)
                unit = centre_unit(fmap).sum()
                if not unit.requires_grad:
                    raise InputDataError(f"ERF: layer {name!r} output does not depend on the input through autograd")
                (grad,) = torch.autograd.grad(unit, x)
            contrib = grad.detach().abs().double().sum(dim=(0, 1)).cpu()
            total = contrib if total is None else total + contrib
            seen += x.shape[0]
            out_grid = tuple(fmap.shape[2:])
            centre = tuple(s // 2 for s in out_grid)
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    if total is None:
        raise InputDataError("ERF: no images were given")
    arr = total.numpy()
    return ERFResult(arr, name, used_layout, out_grid, centre, seen, area_ratios(arr, thresholds))


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------
def _log_map(contributions: np.ndarray, decades: float) -> np.ndarray:
    m = np.asarray(contributions, dtype=np.float64)
    peak = m.max() if m.size else 0.0
    if peak <= 0:
        return np.full(m.shape, -decades)
    return np.clip(np.log10(m / peak + 10.0 ** (-decades)), -decades, 0.0)


def _views(contributions: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if contributions.ndim == 2:
        return [("", contributions)]
    if contributions.ndim == 3:
        c = [s // 2 for s in contributions.shape]
        return [
            (f"axis 0 = {c[0]}", contributions[c[0]]),
            (f"axis 1 = {c[1]}", contributions[:, c[1]]),
            (f"axis 2 = {c[2]}", contributions[:, :, c[2]]),
        ]
    raise InputDataError(f"heat maps need a 2D or 3D contribution map, got shape {contributions.shape}")


def _title(name: str, res: ERFResult | None) -> str:
    if res is None:
        return name
    parts = [f"{t:.0%}: {v:.3g}" for t, v in res.area_ratios.items()]
    lines = ["  ".join(parts[i : i + 2]) for i in range(0, len(parts), 2)]
    return "\n".join([name, "area ratio", *lines] if name else ["area ratio", *lines])


def save_erf_figure(
    results: Mapping[str, ERFResult | np.ndarray],
    path: str | os.PathLike,
    *,
    decades: float = 4.0,
    panel_size: float = 2.6,
    dpi: int = 90,
    suptitle: str | None = None,
) -> Path:
    """Save one row of log-scaled heat maps per result (3D: the three central slices) as a PNG.

    Values shown: ``log10(contribution / max + 10^-decades)``, clipped to ``[-decades, 0]``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    items = list(results.items())
    if not items:
        raise ConfigError("save_erf_figure needs at least one result")
    views = [(_views(r.contributions if isinstance(r, ERFResult) else np.asarray(r))) for _, r in items]
    cols = len(views[0])
    fig, axes = plt.subplots(
        cols,
        len(items),
        figsize=(panel_size * len(items) + 1.0, panel_size * cols + 1.2),
        squeeze=False,
        layout="constrained",
    )
    im = None
    for j, ((name, res), vs) in enumerate(zip(items, views)):
        for i, (label, plane) in enumerate(vs):
            ax = axes[i][j]
            im = ax.imshow(_log_map(plane, decades), cmap="RdYlGn", vmin=-decades, vmax=0.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_title(name, res if isinstance(res, ERFResult) else None), fontsize=7)
            if label:
                ax.set_ylabel(label, fontsize=7)
    if im is not None:
        cbar = fig.colorbar(im, ax=axes, shrink=0.7)
        cbar.set_label("log10(contribution / max)", fontsize=7)
        cbar.ax.tick_params(labelsize=6)
    if suptitle:
        fig.suptitle(suptitle, fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_erf_heatmap(
    result: ERFResult | np.ndarray, path: str | os.PathLike, *, title: str = "", decades: float = 4.0
) -> Path:
    """Save the log-scaled heat map of one ERF (3D: the three central slices) as a PNG."""
    return save_erf_figure({title: result}, path, decades=decades)


# ---------------------------------------------------------------------------------------------
# images for the command line
# ---------------------------------------------------------------------------------------------
def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    from monai.transforms import Resize

    return torch.as_tensor(Resize(spatial_size=tuple(size), mode="bilinear" if len(size) == 2 else "trilinear")(x))


def load_images(
    data: str | os.PathLike,
    *,
    split: str = "test",
    num_images: int = 50,
    image_size: int | Sequence[int] | None = None,
    in_channels: int = 1,
    mean: float = 0.5,
    std: float = 0.5,
) -> torch.Tensor:
    """The first ``num_images`` images of a MedMNIST ``.npz`` split or of a folder, as ``(N, C, *S)`` float32.

    Intensities are scaled to ``[0, 1]`` (8-bit images / 255), resized to ``image_size`` (bilinear/trilinear,
    as the demo's training transforms) and normalised ``(x - mean) / std``. A folder may hold PNG/JPEG images
    (read with Pillow, grayscale for ``in_channels=1``) or ``.npy`` arrays ``(H, W)`` / ``(D, H, W)``
    (sorted by file name). Grayscale images are repeated to ``in_channels``.
    """
    path = Path(data)
    arrays: list[np.ndarray] = []
    if path.is_file() and path.suffix == ".npz":
        from monai_peft.data import MedMNISTDataset

        ds = MedMNISTDataset(path, split=split)
        for i in range(min(num_images, len(ds))):
            arrays.append(ds[i]["image"].numpy())
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".npy"))
        for f in files[:num_images]:
            if f.suffix.lower() == ".npy":
                a = np.load(f, allow_pickle=False).astype(np.float32)
                a = a / 255.0 if a.max() > 1.0 else a
                arrays.append(a[None])
            else:
                from PIL import Image

                with Image.open(f) as im:
                    a = np.asarray(im.convert("L" if in_channels == 1 else "RGB"), dtype=np.float32) / 255.0
                arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    else:
        raise InputDataError(f"ERF images: {path} is neither a MedMNIST .npz file nor a folder of images")
    if not arrays:
        raise InputDataError(f"ERF images: no images found in {path}")
    out = []
    for a in arrays:
        x = torch.as_tensor(a, dtype=torch.float32)
        if x.shape[0] == 1 and in_channels > 1:
            x = x.repeat(in_channels, *([1] * (x.dim() - 1)))
        if image_size is not None:
            size = (image_size,) * (x.dim() - 1) if isinstance(image_size, int) else tuple(image_size)
            x = _resize(x, size)
        out.append((x - mean) / std)
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) != 1:
        raise InputDataError(f"ERF images have different shapes {sorted(shapes)[:3]}; pass --image-size")
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# command line: monai-peft erf
# ---------------------------------------------------------------------------------------------
def _default_layer(model: nn.Module) -> str:
    from monai_peft.targeting import find_targets, get_preset

    preset = get_preset(model)
    role = preset.role("blocks") if preset is not None else None
    if role is None:
        raise ConfigError("this backbone has no preset 'blocks' role; pass --layer (a module name)")
    return find_targets(model, role)[-1]


def _backbone_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if args.backbone == "efficientnet_lite0":
        kwargs = {"in_channels": args.in_channels, "num_classes": args.num_classes, "image_size": args.image_size}
    if args.backbone_kwargs:
        try:
            extra = json.loads(args.backbone_kwargs)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--backbone-kwargs must be a JSON object: {exc}") from exc
        if not isinstance(extra, dict):
            raise SystemExit("--backbone-kwargs must be a JSON object")
        kwargs.update(extra)
    return kwargs


def run_erf_command(args: argparse.Namespace) -> dict[str, Any]:
    """Body of ``monai-peft erf``: build the model, load the images, measure, save the PNG, print the figures."""
    import monai_peft as mp
    from monai_peft.demo import find_pneumoniamnist
    from monai_peft.networks.factory import load_backbone

    torch.manual_seed(args.seed)
    base = load_backbone(args.backbone, args.source, **_backbone_kwargs(args))
    model: nn.Module = base
    if args.adapter:
        model = mp.PeftModel.from_pretrained(base, args.adapter)
    layer = args.layer or _default_layer(base)
    data = args.data or find_pneumoniamnist()
    if data is None:
        raise InputDataError("no images: pass --data (a MedMNIST .npz or a folder); PneumoniaMNIST was not found")
    images = load_images(
        data,
        split=args.split,
        num_images=args.num_images,
        image_size=args.image_size,
        in_channels=args.in_channels,
        mean=args.mean,
        std=args.std,
    )
    res = compute_erf(model, images, layer, batch_size=args.batch_size, device=args.device)
    label = f"{args.backbone}" + (f" + {Path(args.adapter).name}" if args.adapter else "")
    out = save_erf_heatmap(res, args.out, title=f"{label} @ {layer}")
    summary = {**res.as_dict(), "model": label, "images": str(data), "split": args.split, "heatmap": str(out)}
    print(f"ERF of {label} at layer {layer!r} ({res.layout}, output grid {res.output_grid}), {res.num_images} images")
    for t, r in res.area_ratios.items():
        print(f"  area ratio holding {t:.0%} of the contribution: {r:.4f}")
    print(f"heat map: {out}")
    if args.json:
        print(json.dumps(summary, indent=2))
    return summary


def _fmt_ratio(r: float) -> str:
    return f"{r:.4f}" if r >= 1e-3 else f"{r:.2e}"


def ratio_table(results: Mapping[str, ERFResult], thresholds: Sequence[float] = THRESHOLDS) -> str:
    """A Markdown table of area ratios, one row per result."""
    head = "| model | " + " | ".join(f"t = {t:.0%}" for t in thresholds) + " |"
    sep = "|---|" + "---|" * len(thresholds)
    rows = [
        f"| {name} | " + " | ".join(_fmt_ratio(res.area_ratios[float(t)]) for t in thresholds) + " |"
        for name, res in results.items()
    ]
    return "\n".join([head, sep, *rows])

"""Merged single-file exports of a PEFT bundle: ``models/model.pt`` (state dict) and ``models/model.ts``.

A PEFT bundle ships its adapter plus a recipe for the base weights. Tools that want one file (MONAI Label,
TorchScript serving, Model Zoo's ``ckpt_export``) get it on demand::

    python -m monai_peft.bundle export --bundle_root bundles/<name>            # models/model.pt
    python -m monai_peft.bundle export --bundle_root bundles/<name> --torchscript models/model.ts

Convention: ``inference.json`` defines ``network`` (the base with the adapter loaded) and ``network_def`` (the
plain architecture). ``model.pt`` is the state dict of ``network`` after merging its adapters, and must load into
``network_def`` with ``strict=True`` -- checked here, so ``python -m monai.bundle ckpt_export network_def`` works.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.bundle.distributed import unwrap_ddp
from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.errors import CheckpointError, ConfigError
from monai_peft.model import PeftModel

__all__ = ["bundle_parser", "export_merged_model", "merged_network", "network_input_shape"]

logger = logging.getLogger(__name__)


def merged_network(network: nn.Module) -> nn.Module:
    """``network`` with every mergeable adapter folded into the base weights, as a plain module (eval mode).

    Uses :func:`monai_peft.inference.prepare_for_inference` when available, else ``merge_and_unload``. A
    ``PeftModel`` with adapters that cannot be merged (DKA, prompts) raises: such bundles must define a
    ``network_def`` that builds the PEFT structure.
    """
    net = unwrap_ddp(network)
    if not isinstance(net, PeftModel):
        return net.eval()
    try:
        return net.merge_and_unload().eval()
    except Exception as exc:  # the library raises AdapterError/MethodNotApplicableError for unmergeable methods
        raise ConfigError(
            f"the bundle's network cannot be merged into a plain module ({exc}); a merged model.pt needs mergeable "
            "adapters (LoRA, SSF, ...). Export the PEFT network itself, with a network_def that rebuilds it."
        ) from exc


def bundle_parser(
    bundle_root: str | os.PathLike,
    config_file: str | Sequence[str] | None = None,
    meta_file: str | None = None,
    **override: Any,
) -> Any:
    """A ``ConfigParser`` of a bundle (``configs/inference.json`` + ``configs/metadata.json`` by default)."""
    from monai.bundle import ConfigParser

    root = Path(bundle_root)
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file or [])
    files = [str(f if Path(f).is_absolute() or Path(f).exists() else root / f) for f in files] or [
        str(root / "configs" / "inference.json")
    ]
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"bundle config '{f}' does not exist; is '{root}' a bundle folder (configs/...)?")
    parser = ConfigParser()
    parser.read_config(files if len(files) > 1 else files[0])
    meta = Path(meta_file) if meta_file else root / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(root)
    for key, value in override.items():
        parser[key] = value
    return parser


def network_input_shape(parser: Any, batch: int = 1) -> tuple[int, ...]:
    """``(batch, C, *spatial)`` of the bundle's input from ``network_data_format`` (``*`` / ``x*n`` terms -> 1 / n)."""
    fmt = parser.get("_meta_#network_data_format#inputs", None) or {}
    if not fmt:
        raise ConfigError("metadata.json has no network_data_format#inputs; cannot make an example input")
    spec = next(iter(fmt.values()))
    spatial = []
    for s in spec["spatial_shape"]:
        if isinstance(s, int):
            spatial.append(s)
        else:
            text = str(s).replace(" ", "")
            spatial.append(int(text.split("*")[-1]) if "*" in text and text.split("*")[-1].isdigit() else 32)
    return (batch, int(spec["num_channels"]), *spatial)


def _check_fits(state: dict[str, torch.Tensor], target: nn.Module, where: str) -> None:
    expected = target.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"the merged network does not fit {where}: {len(missing)} missing key(s) {missing[:4]}, "
            f"{len(unexpected)} unexpected {unexpected[:4]}, {len(shapes)} of another shape {shapes[:4]}. "
            "network_def must build the architecture that network merges to."
        )


def export_merged_model(
    bundle_root: str | os.PathLike,
    out: str | os.PathLike | None = "models/model.pt",
    torchscript: str | os.PathLike | None = None,
    config_file: str | Sequence[str] | None = None,
    meta_file: str | None = None,
    network_key: str = "network",
    network_def_key: str = "network_def",
    use_trace: bool = False,
    atol: float = 1e-5,
    **override: Any,
) -> dict[str, Any]:
    """Write the bundle's merged network as a state dict (``out``) and/or TorchScript (``torchscript``).

    Args:
        bundle_root: the bundle folder; relative ``out``/``torchscript`` paths are relative to it.
        out: state-dict file (``torch.save`` of plain tensors, loadable with ``weights_only=True``); ``None``: skip.
        torchscript: TorchScript file (scripted, or traced with ``use_trace``) of ``network_def`` holding the merged
            weights, with the bundle's configs/metadata embedded as MONAI does; ``None``: skip.
        config_file / meta_file: default ``configs/inference.json`` / ``configs/metadata.json``.
        network_key / network_def_key: config ids of the adapted network and of the plain architecture.
        atol: the TorchScript output must equal the eager merged output within this tolerance.
        override: config overrides (e.g. ``adapter_dir=...``).

    Returns:
        ``{"model_pt": path | None, "model_ts": path | None, "max_abs_diff": float | None, "num_tensors": int}``.

    Raises:
        CheckpointError: the merged weights do not fit ``network_def``, or the TorchScript output differs.
    """
    root = Path(bundle_root)
    parser = bundle_parser(root, config_file, meta_file, **override)
    merged = merged_network(parser.get_parsed_content(network_key)).to("cpu").eval()
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    target = parser.get_parsed_content(network_def_key, instantiate=True, lazy=False)
    if not isinstance(target, nn.Module):
        raise ConfigError(f"'{network_def_key}' in the bundle config is not a torch.nn.Module")
    _check_fits(state, target, f"'{network_def_key}'")
    target.load_state_dict(state, strict=True)
    target = target.to("cpu").eval()
    result: dict[str, Any] = {"model_pt": None, "model_ts": None, "max_abs_diff": None, "num_tensors": len(state)}
    if out is not None:
        out_path = Path(out) if Path(out).is_absolute() else root / out
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(out_path, buffer.getvalue())
        result["model_pt"] = out_path
        logger.info("merged state dict (%d tensors) written to %s", len(state), out_path)
    if torchscript is not None:
        from monai.data import save_net_with_metadata
        from monai.networks import convert_to_torchscript

        ts_path = Path(torchscript) if Path(torchscript).is_absolute() else root / torchscript
        example = torch.rand(network_input_shape(parser))
        with torch.no_grad():
            try:
                scripted = convert_to_torchscript(target, inputs=[example] if use_trace else None, use_trace=use_trace)
            except RuntimeError as exc:
                if use_trace:
                    raise
                raise ConfigError(
                    f"torch.jit.script cannot compile '{network_def_key}' ({str(exc).strip().splitlines()[0]}); "
                    "trace it instead: --use_trace (export_merged_model(..., use_trace=True))."
                ) from exc
            expected = merged(example)
            got = scripted(example)
        diff = float((expected - got).abs().max())
        if not diff <= atol:
            raise CheckpointError(f"TorchScript output differs from the eager merged model by {diff:.3g} (> {atol})")
        ts_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ts_path.with_name(f".{ts_path.name}.partial-{os.getpid()}.ts")
        meta = parser.get("_meta_", {})
        try:
            save_net_with_metadata(
                scripted, str(tmp), meta_values=meta, include_config_vals=False, append_timestamp=False
            )
            os.replace(tmp, ts_path)
        finally:
            if tmp.exists():
                tmp.unlink()
        result["model_ts"], result["max_abs_diff"] = ts_path, diff
        logger.info("TorchScript written to %s (max |ts - eager| = %.3g)", ts_path, diff)
    return result

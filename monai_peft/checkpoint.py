"""Adapter files: safetensors tensors + JSON config + a fingerprint of the base weights.

Layout of an adapter folder (see docs/checkpoints.md)::

    adapter_config.json        the resolved config: its fields, with "target_modules" naming exactly
                               the adapted modules and every fact read from the network (qkv
                               slices, token grid, prefix tokens) filled in; "method",
                               "monai_peft_version", "plan" (per adapted module: its layer and the
                               resolved facts, for people and tools), "base_model": {"class",
                               "fingerprint", "num_tensors"}, "tensors_sha256" (detects a torn /
                               mismatched pair of files)
    adapter_model.safetensors  only what was trained:
                                 "adapter.<module>.<tensor>"  tensors of added adapter layers
                                 "base.<tensor>"              base tensors trained in place
                               metadata: format, method, base_tensors (per-tensor digests)

Files are written atomically (temporary file + ``os.replace``). Nothing is ever unpickled: a
pickle-based file (``torch.save``) is recognised and refused with an explanation. This module is the
only one that knows the file names and the keys of ``adapter_config.json`` that are not config fields
(:data:`FILE_KEYS`); :func:`config_fields` strips them. Files written before the resolved plan existed
(``"target_modules": null``, no ``"plan"``) load as before: their config is resolved again on the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.errors import CheckpointError
from monai_peft.targeting import canonical_named_tensors, innermost

__all__ = [
    "ADAPTER_WEIGHTS_NAME",
    "AdapterFolder",
    "CONFIG_NAME",
    "FILE_KEYS",
    "atomic_write_bytes",
    "base_tensor_digests",
    "combine_fingerprint",
    "config_fields",
    "diagnose_base_mismatch",
    "file_sha256",
    "load_adapter_folder",
    "load_safetensors",
    "read_adapter_folder",
    "save_safetensors",
    "sniff_format",
    "write_adapter_folder",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "monai_peft.adapter.v1"
#: Keys of ``adapter_config.json`` written by :func:`write_adapter_folder` that are not config fields.
FILE_KEYS = ("base_model", "monai_peft_version", "plan", "tensors_sha256")


def config_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """The config part (``"method"`` + fields) of an ``adapter_config.json`` payload: :data:`FILE_KEYS` removed."""
    return {k: v for k, v in payload.items() if k not in FILE_KEYS}


# ---------------------------------------------------------------------------------------------
# fingerprints of the base weights
# ---------------------------------------------------------------------------------------------
def tensor_digest(tensor: torch.Tensor) -> str:
    """``"shape|dtype-kind|blake2b-64"`` of a tensor's values (floating values hashed as float32,
    so the same weights held in float32 or float64 give the same digest)."""
    t = tensor.detach()
    kind = "f" if t.is_floating_point() else str(t.dtype).replace("torch.", "")
    if t.is_floating_point():
        t = t.to(torch.float32)
    data = t.to("cpu").contiguous().reshape(-1)
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    h = hashlib.blake2b(data.numpy().tobytes(), digest_size=8).hexdigest()
    return f"{'x'.join(map(str, tensor.shape))}|{kind}|{h}"


def base_tensor_digests(model: nn.Module) -> dict[str, str]:
    """Digest of every parameter and buffer of the (unadapted) network, by canonical name."""
    return {name: tensor_digest(t) for name, t in canonical_named_tensors(model).items()}


def combine_fingerprint(digests: dict[str, str], exclude: Iterable[str] = ()) -> str:
    """One hex fingerprint over all digests except the tensors in ``exclude`` (trained ones)."""
    skip = set(exclude)
    h = hashlib.sha256()
    for name in sorted(digests):
        if name not in skip:
            h.update(f"{name}={digests[name]};".encode())
    return h.hexdigest()


def diagnose_base_mismatch(expected: dict[str, str], actual: dict[str, str], exclude: Iterable[str]) -> str:
    """Human-readable summary of how two bases differ (names, shapes, values)."""
    skip = set(exclude)
    exp = {k: v for k, v in expected.items() if k not in skip}
    act = {k: v for k, v in actual.items() if k not in skip}
    missing = sorted(set(exp) - set(act))
    extra = sorted(set(act) - set(exp))
    shape = sorted(k for k in set(exp) & set(act) if exp[k].split("|")[0] != act[k].split("|")[0])
    value = sorted(k for k in set(exp) & set(act) if k not in shape and exp[k] != act[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the original base are absent (e.g. {missing[:3]})")
    if extra:
        parts.append(f"{len(extra)} tensor(s) are new (e.g. {extra[:3]})")
    if shape:
        parts.append(f"{len(shape)} tensor(s) have other shapes (e.g. {shape[:3]})")
    if value:
        parts.append(f"{len(value)} of {len(exp)} tensor(s) hold other values (e.g. {value[:3]})")
    return "; ".join(parts) or "the fingerprints differ"


# ---------------------------------------------------------------------------------------------
# atomic, safe file I/O
# ---------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` (made contiguous, moved to CPU, un-shared) as safetensors."""
    from safetensors.torch import save

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def sniff_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torch-zip-pickle"``, ``"pickle"`` or ``"unknown"`` from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip-pickle"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 2 <= n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def load_safetensors(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with clear errors for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter weights {path} do not exist")
    kind = sniff_format(path)
    if kind in ("torch-zip-pickle", "pickle"):
        raise CheckpointError(
            f"{path} is a pickle-based torch checkpoint ({kind}); monai_peft never unpickles adapter files "
            "because unpickling can run arbitrary code. If you trust its origin, convert it with "
            "`monai_peft.checkpoint.convert_torch_checkpoint(src, dst)` (uses torch.load(weights_only=True))"
        )
    if kind != "safetensors":
        raise CheckpointError(
            f"{path} is not a safetensors file (unrecognised header); the file is corrupt or of another format"
        )
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError
        raise CheckpointError(f"{path} is corrupt or truncated and cannot be read as safetensors: {exc}") from exc
    return tensors, metadata


def convert_torch_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a trusted ``torch.save`` state dict to safetensors with ``torch.load(weights_only=True)``."""
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{src} cannot be loaded with torch.load(weights_only=True): {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{src} does not hold a flat dict of tensors (a state dict)")
    save_safetensors(obj, dst)
    return Path(dst)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# adapter folders
# ---------------------------------------------------------------------------------------------
def write_adapter_folder(
    directory: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    base_info: dict[str, Any],
    base_digests: dict[str, str],
    plan: dict[str, Any] | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json`` (both atomically).

    Args:
        directory: the adapter folder (created if needed).
        config: ``PeftConfig.to_dict()`` of the resolved config.
        tensors: the adapter's tensors (see the module doc for the key layout).
        base_info: ``{"class", "fingerprint", "num_tensors"}`` of the base network.
        base_digests: per-tensor digests of the base (safetensors metadata, for mismatch diagnostics).
        plan: the resolved plan (JSON), saved under ``"plan"``.
    """
    from monai_peft import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / ADAPTER_WEIGHTS_NAME
    metadata = {"format": FORMAT, "method": str(config.get("method", "")), "base_tensors": json.dumps(base_digests)}
    save_safetensors(tensors, weights, metadata)
    payload = dict(config)
    payload["monai_peft_version"] = __version__
    payload["base_model"] = base_info
    if plan:
        payload["plan"] = plan
    payload["tensors_sha256"] = file_sha256(weights)
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())
    return directory


def read_adapter_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(config dict incl. ``base_model``, tensors, safetensors metadata) of an adapter folder."""
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file; pass the adapter folder that holds {CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}"
        )
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}; is it an adapter folder written by save_adapter()?")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({exc}); the adapter folder is corrupt") from exc
    if not isinstance(config, dict) or "method" not in config:
        raise CheckpointError(f"{cfg_path} is not a monai_peft adapter config (no 'method' key)")
    weights = directory / ADAPTER_WEIGHTS_NAME
    tensors, metadata = load_safetensors(weights)
    expected_sha = config.get("tensors_sha256")
    if expected_sha and file_sha256(weights) != expected_sha:
        raise CheckpointError(
            f"{weights} does not match {cfg_path} (sha256 differs): the two files come from different saves, "
            "or a save was interrupted. Save the adapter again"
        )
    return config, tensors, metadata


@dataclass
class AdapterFolder:
    """An adapter folder, read: ``config`` holds only config fields (``"method"`` included)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    base_model: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    version: str | None = None


def load_adapter_folder(directory: str | os.PathLike) -> AdapterFolder:
    """Read an adapter folder (checked as :func:`read_adapter_folder` does), its file keys apart from its config."""
    payload, tensors, metadata = read_adapter_folder(directory)
    return AdapterFolder(
        config=config_fields(payload),
        tensors=tensors,
        metadata=metadata,
        base_model=dict(payload.get("base_model") or {}),
        plan=dict(payload.get("plan") or {}),
        version=payload.get("monai_peft_version"),
    )


def model_class_name(model: nn.Module) -> str:
    cls = type(innermost(model))
    return f"{cls.__module__}.{cls.__qualname__}"

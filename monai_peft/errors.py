"""Exceptions raised by monai_peft.

Every error says what was wrong and what to do about it. They subclass the built-in exception a
caller would naturally catch (``ValueError``, ``ImportError`` ...) so generic handlers still work.
"""

from __future__ import annotations


class MonaiPeftError(Exception):
    """Base class of every monai_peft error."""


class ConfigError(MonaiPeftError, ValueError):
    """A PEFT configuration has an invalid or inconsistent value."""


class TargetingError(MonaiPeftError, ValueError):
    """Target-module selection matched nothing, or matched modules the method cannot adapt."""


class MethodNotApplicableError(MonaiPeftError, ValueError):
    """The chosen PEFT method cannot be applied to this network (e.g. EPT on a CNN)."""


class AdapterError(MonaiPeftError, ValueError):
    """Wrong use of named adapters (unknown name, duplicate name, merged state ...)."""


class CheckpointError(MonaiPeftError, ValueError):
    """An adapter or weight file is missing, corrupt, unsafe (pickle) or does not match the model."""


class BaseModelMismatchError(CheckpointError):
    """An adapter file was trained on a different base model than the one it is loaded onto."""


class InputDataError(MonaiPeftError, ValueError):
    """Input images or labels are unusable (NaN/Inf voxels, wrong shape, geometry mismatch ...)."""


class DicomError(InputDataError):
    """A DICOM file or series cannot be read correctly (not DICOM, truncated, mixed series ...)."""


class MissingDependencyError(MonaiPeftError, ImportError):
    """An optional dependency needed for this feature is not installed."""


def require(module: str, *, feature: str, install: str) -> object:
    """Import an optional dependency or raise :class:`MissingDependencyError` saying how to install it.

    Args:
        module: dotted module name to import, e.g. ``"timm"``.
        feature: what the caller wanted to do, used in the message.
        install: the pip requirement that provides it, e.g. ``"monai_peft[timm]"`` or ``"timm>=1.0"``.

    Returns:
        The imported module.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - message path tested via monkeypatch
        raise MissingDependencyError(
            f"{feature} needs the optional package '{module}', which is not installed "
            f"({exc}). Install it with: pip install '{install}'"
        ) from exc


class DataDownloadError(MonaiPeftError, OSError):
    """A data set or file could not be downloaded (offline machine, unreachable host, bad checksum)."""


class HashMismatchError(CheckpointError):
    """A downloaded or cached weight file does not have the SHA-256 digest it was declared with."""


class UnsafeCheckpointError(CheckpointError):
    """A weight file needs arbitrary-code unpickling (it references Python globals outside the safe allowlist)."""


class WeightDownloadError(CheckpointError):
    """A weight file could not be fetched from its URL or hub (offline, not found, access denied ...)."""


class StateDictKeyError(CheckpointError):
    """A state dict does not fit the model: missing, unexpected or wrongly shaped keys.

    Attributes:
        missing: model keys the checkpoint does not provide.
        unexpected: checkpoint keys the model does not have.
        mismatched: ``(key, checkpoint_shape, model_shape)`` for keys present in both with different shapes.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = list(missing or [])
        self.unexpected = list(unexpected or [])
        self.mismatched = list(mismatched or [])

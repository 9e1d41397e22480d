"""Base configuration of every PEFT method: a dataclass with validation and a JSON round trip.

Each method defines a subclass (``LoraConfig``, ``AdapterConfig`` ...) registered under a method
name (see :mod:`monai_peft.registry`). A config serialises to ``{"method": name, **fields}`` so
that :func:`PeftConfig.from_dict` can rebuild the right subclass from an ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from monai_peft.checkpoint import CONFIG_NAME, config_fields
from monai_peft.errors import ConfigError

_BN_STATS_CHOICES = ("save", "freeze")


def _as_str_list(value: Any, name: str) -> list[str] | str | None:
    """Normalise a target spec: ``None``, a regex string, or a list of strings (tuples accepted)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)):
        out = []
        for item in value:
            if isinstance(item, type):
                out.append(item.__name__)
            elif isinstance(item, str):
                out.append(item)
            else:
                raise ConfigError(
                    f"{name} entries must be strings (module names, suffixes or 're:' regexes), got {item!r}"
                )
        return sorted(out) if isinstance(value, set) else out
    raise ConfigError(f"{name} must be None, a regex string or a list of strings, got {type(value).__name__}")


@dataclass
class PeftConfig:
    """Fields shared by every PEFT method.

    Args:
        target_modules: which modules the method adapts. ``None`` uses the network's preset (the
            paper default, e.g. q and v of every attention block for LoRA). A list matches module
            names exactly or as a dotted suffix (``"qkv"`` matches ``blocks.3.attn.qkv``); entries
            starting with ``"re:"`` are regular expressions matched against the full name. A plain
            string is a regular expression (Hugging Face peft convention).
        exclude_modules: same syntax; matching modules are never adapted.
        target_types: class names (``"Linear"``, ``"Conv3d"``) the targets must be instances of.
        modules_to_save: modules trained in full and saved with the adapter (e.g. a new
            classification head), same syntax as ``target_modules``.
        batchnorm_stats: ``"save"`` (default): BatchNorm running statistics keep updating in
            train mode and are stored in the adapter file so that loading reproduces the trained
            model exactly; ``"freeze"``: BatchNorm layers stay in eval mode while training so the
            base statistics never change.
    """

    method: ClassVar[str] = ""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    target_types: list[str] | None = None
    modules_to_save: list[str] | None = None
    batchnorm_stats: str = "save"
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target_modules = _as_str_list(self.target_modules, "target_modules")
        self.exclude_modules = _as_str_list(self.exclude_modules, "exclude_modules")
        types = _as_str_list(self.target_types, "target_types")
        if isinstance(types, str):
            types = [types]
        self.target_types = types
        mts = _as_str_list(self.modules_to_save, "modules_to_save")
        if isinstance(mts, str):
            mts = [mts]
        self.modules_to_save = mts
        if self.batchnorm_stats not in _BN_STATS_CHOICES:
            raise ConfigError(f"batchnorm_stats must be one of {_BN_STATS_CHOICES}, got {self.batchnorm_stats!r}")
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check method-specific values; subclasses raise :class:`ConfigError` with the reason."""

    @staticmethod
    def _require(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(message)

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``{"method": name, **fields}``, JSON-serialisable."""
        data = {"method": self.method}
        for f in fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> PeftConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Rebuild a config; on the base class the ``"method"`` key chooses the subclass."""
        from monai_peft.registry import get_method

        data = dict(data)
        method = data.pop("method", None)
        data.pop("monai_peft_version", None)
        target_cls = cls
        if cls is PeftConfig or not cls.method:
            if method is None:
                raise ConfigError("config dict has no 'method' key; cannot tell which PEFT method it describes")
            target_cls = get_method(method).config_cls
        elif method is not None and method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        valid = set(target_cls.field_names())
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} for {target_cls.__name__}; valid fields are {sorted(valid)}")
        return target_cls(**data)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PeftConfig:
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"no adapter config at {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); the adapter folder may be corrupt") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(config_fields(data))

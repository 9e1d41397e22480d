"""Boolean switches given as ``monai.bundle`` command-line overrides.

``python -m monai.bundle run ... --install_adapter false`` hands the config the *string* ``'false'`` (python-fire
parses only ``False`` as a boolean), and ``'false'`` is truthy: a config that wrote ``... if @install_adapter`` would
overwrite the shipped adapter when told not to. Bundle configs therefore read every switch through :func:`flag`.
"""

from __future__ import annotations

from typing import Any

from monai_peft.errors import ConfigError

__all__ = ["flag"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def flag(value: Any, name: str = "switch") -> bool:
    """``value`` as a bool: ``True``/``False``, ``1``/``0``, or the strings true/false, 1/0, yes/no, on/off (any case).

    Raises:
        ConfigError: anything else (e.g. ``'ture'``, ``2``, a path), naming ``name`` and the accepted values.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise ConfigError(f"{name} must be true or false (also 1/0, yes/no, on/off), got {value!r}")

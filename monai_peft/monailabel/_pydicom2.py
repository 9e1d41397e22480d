"""pydicom 2.x support for the MONAI Label environment (MONAI Label 0.8.5 pins ``pydicom<3``).

monai_peft's DICOM readers import ``apply_modality_lut`` / ``apply_voi_lut`` from ``pydicom.pixels``, a module that
pydicom 3 introduced; pydicom 2.x has the same two functions (same signature ``(arr, ds)``) in
``pydicom.pixel_data_handlers.util``. :func:`install` registers a ``pydicom.pixels`` module holding them when pydicom
has none, so that ``monai_peft.transforms`` imports under pydicom 2. With pydicom >= 3 it does nothing.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["install"]


def install() -> bool:
    """Make ``from pydicom.pixels import apply_modality_lut, apply_voi_lut`` work on pydicom 2; True if it did."""
    try:
        importlib.import_module("pydicom.pixels")
        return False
    except ImportError:
        pass
    try:
        import pydicom
        from pydicom.pixel_data_handlers import util
    except ImportError:  # no pydicom at all: nothing to bridge
        return False
    module = types.ModuleType("pydicom.pixels")
    module.__doc__ = "pydicom 2 bridge installed by monai_peft.monailabel (apply_modality_lut, apply_voi_lut)"
    module.apply_modality_lut = util.apply_modality_lut  # type: ignore[attr-defined]
    module.apply_voi_lut = util.apply_voi_lut  # type: ignore[attr-defined]
    sys.modules["pydicom.pixels"] = module
    pydicom.pixels = module  # type: ignore[attr-defined]
    return True

"""The few pydicom functions whose home moved between pydicom 2 and 3.

monai_peft runs on pydicom >= 3 in its own environment and on pydicom 2.4 in MONAI Label's (MONAI Label 0.8.5 pins
``pydicom<3``). pydicom 3 moved the LUT functions to ``pydicom.pixels`` and added the decoder registry
(``get_decoder``); pydicom 2 keeps the LUTs in ``pydicom.pixel_data_handlers.util`` and has no registry.
"""

from __future__ import annotations

from typing import Any

try:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

__all__ = ["apply_modality_lut", "apply_voi_lut", "get_decoder"]


def get_decoder(uid: Any) -> Any | None:
    """pydicom 3's pixel-data decoder for transfer syntax ``uid``, or ``None`` on pydicom 2 (no registry to ask:
    pydicom 2 reports a missing handler itself when the pixels are read).

    Raises:
        NotImplementedError: pydicom 3 knows no decoder for ``uid`` at all.
    """
    try:
        from pydicom.pixels import get_decoder as registry
    except ImportError:
        return None
    return registry(uid)

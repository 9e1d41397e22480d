"""(method, config, network, input) cases shared by the engine and training tests: every
registered core method on tiny 2D and 3D networks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from torch import nn

from tests import helpers as h


@dataclass
class Case:
    method: str
    kwargs: dict[str, Any]
    net: Callable[[], nn.Module]
    shape: tuple[int, ...]
    zero_init: bool = True
    modules_to_save: list[str] | None = field(default=None)

    @property
    def id(self) -> str:
        return f"{self.method}-{self.net.__name__}-{len(self.shape) - 2}d"


def _n(factory, *args, name=None):
    def make():
        return factory(*args)

    make.__name__ = name or f"{factory.__name__}"
    return make


V2 = _n(h.tiny_vit, 2, name="vit")
V3 = _n(h.tiny_vit, 3, name="vit")
R2 = _n(h.tiny_resnet, 2, name="resnet")
R3 = _n(h.tiny_resnet, 3, name="resnet")
S2 = (2, 1, 32, 32)
S3 = (2, 1, 32, 32, 32)
S3_small = (2, 1, 16, 16, 16)

CASES = [
    Case("lora", {"r": 2}, V2, S2),
    Case("lora", {"r": 2}, V3, S3),
    Case("lora", {"r": 2}, R3, S3_small),
    Case("lora", {"r": 2}, _n(h.tiny_basicunet, 2, name="basicunet"), (1, 1, 32, 32)),
    Case("lora", {"r": 2}, _n(h.tiny_segresnet, 3, name="segresnet"), (1, 1, 16, 16, 16)),
    Case("lora", {"r": 2}, _n(h.tiny_unetr, 2, name="unetr"), (1, 1, 32, 32)),
    Case("lora", {"r": 2}, _n(h.tiny_swinunetr, 2, name="swinunetr"), (1, 1, 64, 64)),
    Case("adapter", {"bottleneck": 8}, V2, S2),
    Case("adapter", {"bottleneck": 8}, V3, S3),
    Case("adapter", {"bottleneck": 4}, R2, S2),
    Case("adapter", {"bottleneck": 4}, R3, S3_small),
    Case("adapter", {"bottleneck": 4}, _n(h.tiny_densenet, 2, name="densenet"), S2),
    Case("adapter", {"bottleneck": 4}, _n(h.tiny_swinunetr, 2, name="swinunetr"), (1, 1, 64, 64)),
    Case("adaptformer", {"bottleneck": 8}, V2, S2),
    Case("adaptformer", {"bottleneck": 8}, V3, S3),
    Case("ssf", {"init_std": 0.0}, V2, S2),
    Case("ssf", {"init_std": 0.0}, R3, S3_small),
    Case("ssf", {"init_std": 0.0}, _n(h.tiny_densenet, 2, name="densenet"), S2),
    Case("bitfit", {}, V2, S2),
    Case("bitfit", {}, R3, S3_small),
    Case("norm_tuning", {}, V2, S2),
    Case("norm_tuning", {}, R3, S3_small),
    Case("norm_tuning", {"norm_types": ["groupnorm"]}, _n(h.tiny_segresnet, 3, name="segresnet"), (1, 1, 16, 16, 16)),
    Case("attention_tuning", {}, V2, S2),
    Case("attention_tuning", {}, V3, S3),
    Case("partial", {"k": 1}, V2, S2),
    Case("partial", {"k": 1}, R3, S3_small),
    Case("linear_probe", {}, V2, S2),
    Case("linear_probe", {}, R3, S3_small),
    Case("full_finetune", {}, V2, S2),
    Case("full_finetune", {}, R3, S3_small),
    Case("convpass", {}, V2, S2),
    Case("convpass", {}, V3, S3),
    Case("conv_adapter", {"pointwise_init": "zeros"}, R2, S2),
    Case("conv_adapter", {"pointwise_init": "zeros"}, R3, S3_small),
    Case("tsa", {"init_scale": 0.0}, R2, S2),
    Case("tsa", {"init_scale": 0.0}, R3, S3_small),
    Case("fact", {}, V2, S2),
    Case("fact", {"variant": "tk"}, V3, S3),
    Case("vpt", {"prompt_length": 2}, V2, S2, zero_init=False),
    Case("vpt", {"prompt_length": 2, "deep": False}, V3, S3, zero_init=False),
    Case("vp", {"prompt_length": 2, "prompt_init": "zeros"}, V2, S2),
    Case("vp", {"prompt_length": 2, "prompt_init": "zeros"}, V3, S3),
    # MONAI's ViT stores its patch count, not its grid: the pixel prompt's image size and DKA's grid are given
    Case("vp", {"mode": "pixel", "pad_size": 4, "prompt_init": "zeros", "image_size": [32, 32]}, V2, S2),
    Case("ept", {"prompt_length": 4}, V2, S2, zero_init=False),
    Case("ept", {"prompt_length": 4}, V3, S3, zero_init=False),
    Case("dka", {"zero_init": True, "bottleneck": 4, "large_kernel": 7, "grid": [4, 4]}, V2, S2),
    Case("dka", {"zero_init": True, "bottleneck": 4, "large_kernel": 7, "input_shape": [1, 32, 32, 32]}, V3, S3),
    Case("dka", {"zero_init": True, "bottleneck": 4, "large_kernel": 7, "batch_norm": True}, R2, S2),
    Case("dka", {"zero_init": True, "bottleneck": 4, "large_kernel": 7}, R2, S2),
]


def params(cases=None):
    return [pytest.param(c, id=c.id) for c in (cases or CASES)]

"""Built-in PEFT methods; importing this package registers them (one module per family)."""

from monai_peft.methods.adapters import AdapterConfig, AdaptFormerConfig
from monai_peft.methods.base import AdapterLayer, BaseTuner, WrappingTuner
from monai_peft.methods.conv_adapters import ConvAdapterConfig, TSAConfig
from monai_peft.methods.convpass import ConvpassConfig
from monai_peft.methods.diffusion import DiffFitConfig, DiffusionBiasNormAttentionConfig, SVDiffConfig
from monai_peft.methods.dka import DKAConfig
from monai_peft.methods.ept import EPTConfig
from monai_peft.methods.fact import FacTConfig
from monai_peft.methods.lora import LoraConfig
from monai_peft.methods.prompts import VPConfig, VPTConfig
from monai_peft.methods.selective import (
    AttentionTuningConfig,
    BitFitConfig,
    FullFinetuneConfig,
    LinearProbeConfig,
    NormTuningConfig,
    PartialConfig,
)
from monai_peft.methods.ssf import SSFConfig

__all__ = [
    "AdaptFormerConfig",
    "AdapterConfig",
    "AdapterLayer",
    "AttentionTuningConfig",
    "BaseTuner",
    "BitFitConfig",
    "ConvAdapterConfig",
    "ConvpassConfig",
    "DiffFitConfig",
    "DiffusionBiasNormAttentionConfig",
    "DKAConfig",
    "EPTConfig",
    "FacTConfig",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "LoraConfig",
    "NormTuningConfig",
    "PartialConfig",
    "SSFConfig",
    "SVDiffConfig",
    "TSAConfig",
    "VPConfig",
    "VPTConfig",
    "WrappingTuner",
]

"""monai_peft: parameter-efficient fine-tuning of MONAI and foundation models for medical imaging.

Public API (modelled on Hugging Face peft)::

    import monai_peft as mp
    model = mp.get_peft_model(net, mp.LoraConfig(r=4, alpha=32), modules_to_save=["classification_head"])
    model.print_trainable_parameters()
    model.save_adapter("out/")
    model = mp.PeftModel.from_pretrained(net, "out/")
"""

__version__ = "0.1.0"

from monai_peft.config import PeftConfig
from monai_peft.errors import (
    AdapterError,
    BaseModelMismatchError,
    CheckpointError,
    ConfigError,
    MethodNotApplicableError,
    MissingDependencyError,
    MonaiPeftError,
    TargetingError,
)
from monai_peft.methods import (
    AdapterConfig,
    AdapterLayer,
    AdaptFormerConfig,
    AttentionTuningConfig,
    BaseTuner,
    BitFitConfig,
    ConvAdapterConfig,
    ConvpassConfig,
    DiffFitConfig,
    DiffusionBiasNormAttentionConfig,
    DKAConfig,
    EPTConfig,
    FacTConfig,
    FullFinetuneConfig,
    LinearProbeConfig,
    LoraConfig,
    NormTuningConfig,
    PartialConfig,
    SSFConfig,
    SVDiffConfig,
    TSAConfig,
    VPConfig,
    VPTConfig,
    WrappingTuner,
)
from monai_peft.model import PeftModel, applicable_methods, get_peft_model
from monai_peft.registry import get_config, get_method, list_methods, list_paper_presets, register_method
from monai_peft.targeting import NetworkPreset, TargetSpec, find_targets, get_preset, register_preset

__all__ = [
    "AdaptFormerConfig",
    "AdapterConfig",
    "AdapterError",
    "AdapterLayer",
    "AttentionTuningConfig",
    "BaseModelMismatchError",
    "BaseTuner",
    "BitFitConfig",
    "ConvAdapterConfig",
    "ConvpassConfig",
    "DiffFitConfig",
    "DiffusionBiasNormAttentionConfig",
    "DKAConfig",
    "EPTConfig",
    "FacTConfig",
    "CheckpointError",
    "ConfigError",
    "FullFinetuneConfig",
    "LinearProbeConfig",
    "LoraConfig",
    "MethodNotApplicableError",
    "MissingDependencyError",
    "MonaiPeftError",
    "NetworkPreset",
    "NormTuningConfig",
    "PartialConfig",
    "PeftConfig",
    "PeftModel",
    "SSFConfig",
    "SVDiffConfig",
    "TSAConfig",
    "VPConfig",
    "VPTConfig",
    "TargetSpec",
    "TargetingError",
    "WrappingTuner",
    "__version__",
    "applicable_methods",
    "find_targets",
    "get_config",
    "get_method",
    "get_peft_model",
    "get_preset",
    "list_methods",
    "list_paper_presets",
    "register_method",
    "register_preset",
]

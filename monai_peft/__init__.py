"""monai_peft: parameter-efficient fine-tuning of MONAI and foundation models for medical imaging."""

__version__ = "0.1.0"

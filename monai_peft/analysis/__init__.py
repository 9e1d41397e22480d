"""monai_peft.analysis."""

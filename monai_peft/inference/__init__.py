"""monai_peft.inference."""

"""monai_peft.transforms."""

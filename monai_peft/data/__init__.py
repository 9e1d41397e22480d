"""monai_peft.data."""

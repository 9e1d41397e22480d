"""monai_peft.methods."""

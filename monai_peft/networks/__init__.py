"""monai_peft.networks."""

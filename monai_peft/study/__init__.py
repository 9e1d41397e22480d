"""monai_peft.study."""

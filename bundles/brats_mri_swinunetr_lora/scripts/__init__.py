"""Python helpers of the ``brats_mri_swinunetr_lora`` bundle (imported by its configs as ``scripts``)."""

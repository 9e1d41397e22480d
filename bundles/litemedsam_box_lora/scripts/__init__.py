"""Python helpers of the ``litemedsam_box_lora`` bundle (the configs import ``litemedsam_box`` from this folder)."""

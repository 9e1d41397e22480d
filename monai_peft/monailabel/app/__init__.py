"""The MONAI Label app folder shipped with monai_peft (``main.py``); see :func:`monai_peft.monailabel.app_dir`."""

"""MONAI Label app of monai_peft: ``monailabel start_server --app <this folder> --studies <dir> --conf models <bundle>``.

MONAI Label loads this file and takes the ``MONAILabelApp`` subclass it finds here; everything lives in
:mod:`monai_peft.monailabel.application` (settings: its docstring and docs/monailabel.md).
"""

from monai_peft.monailabel.application import PeftLabelApp

__all__ = ["PeftLabelApp"]

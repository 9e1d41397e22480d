"""monai_peft.inference: sliding-window inference with merged adapters and AMP, inversion to the input grid,
atomic NIfTI / DICOM SEG writers.

* :func:`prepare_for_inference` - eval mode + mergeable adapters folded into a copy of the weights.
* :class:`PeftSlidingWindowInferer` - a MONAI ``SlidingWindowInferer`` that prepares the network, runs windows
  under autocast and stitches in float32 on a chosen device.
* :class:`InvertToOriginald` / :func:`invert_prediction` - the prediction on the loaded image's grid (exact affine).
* :class:`SavePredictiond` - NIfTI named after the case and, for DICOM input, a DICOM SEG, written atomically.

See ``docs/inference.md``.
"""

from monai_peft.inference.amp import resolve_amp_dtype
from monai_peft.inference.inferer import PeftSlidingWindowInferer, network_fingerprint, roi_size_for_spacing
from monai_peft.inference.invert import InvertToOriginald, invert_prediction
from monai_peft.inference.merge import MergeReport, merge_report, prepare_for_inference
from monai_peft.inference.writers import (
    OutputDirError,
    SavePredictiond,
    atomic_write,
    case_name,
    check_output_dir,
    write_prediction_nifti,
)

__all__ = [
    "InvertToOriginald",
    "MergeReport",
    "OutputDirError",
    "PeftSlidingWindowInferer",
    "SavePredictiond",
    "atomic_write",
    "case_name",
    "check_output_dir",
    "invert_prediction",
    "merge_report",
    "network_fingerprint",
    "prepare_for_inference",
    "resolve_amp_dtype",
    "roi_size_for_spacing",
    "write_prediction_nifti",
]

"""monai_peft.transforms: DICOM / NIfTI / NRRD loading, label alignment, intensity presets and writers.

Array transforms and their dictionary (``...d``) versions follow MONAI conventions: channel-first tensors,
``MetaTensor`` with a RAS ``affine``, ``keys`` / ``allow_missing_keys``. See ``docs/data.md``.
"""

from monai_peft.transforms.cxr import IMAGE_SUFFIXES, LoadChestXray, LoadChestXrayd, read_chest_xray, scale_to_unit
from monai_peft.transforms.dicom_image import (
    LoadDicomImage,
    LoadDicomImaged,
    dicom_overlays,
    frame_dataset,
    modality_output_range,
    read_dicom_image,
    voi_output_range,
)
from monai_peft.transforms.dicom_io import (
    DECODER_PACKAGES,
    check_decoder,
    decode_pixels,
    header_copy,
    is_dicom_file,
    read_dicom_file,
    sop_uids,
)
from monai_peft.transforms.dicom_seg import (
    DEFAULT_SEGMENT_COLORS,
    SEG_SOP_CLASS_UIDS,
    SaveDicomSegd,
    SegWriteResult,
    read_dicom_seg,
    write_dicom_seg,
)
from monai_peft.transforms.dicom_series import (
    DicomSeries,
    LoadDicomSeries,
    LoadDicomSeriesd,
    find_dicom_series,
    load_dicom_series,
    scan_dicom_folder,
)
from monai_peft.transforms.geometry import (
    LPS_TO_RAS,
    CheckGeometry,
    CheckGeometryd,
    affine_spacing,
    check_geometry,
    reorient_array,
)
from monai_peft.transforms.intensity import (
    HU_WINDOWS,
    CheckFinite,
    CheckFinited,
    HUWindow,
    HUWindowd,
    hu_window_range,
)
from monai_peft.transforms.nifti_writer import SaveNiftid, output_stem, write_nifti
from monai_peft.transforms.presets import (
    NORMALIZATION_PRESETS,
    PresetCompose,
    ct_transforms,
    cxr_classification_transforms,
    mr_transforms,
    normalization_stats,
)
from monai_peft.transforms.volume_io import LoadVolume, LoadVolumed, load_volume, volume_format

__all__ = [
    "DECODER_PACKAGES",
    "DEFAULT_SEGMENT_COLORS",
    "HU_WINDOWS",
    "IMAGE_SUFFIXES",
    "LPS_TO_RAS",
    "NORMALIZATION_PRESETS",
    "SEG_SOP_CLASS_UIDS",
    "CheckFinite",
    "CheckFinited",
    "CheckGeometry",
    "CheckGeometryd",
    "DicomSeries",
    "HUWindow",
    "HUWindowd",
    "LoadChestXray",
    "LoadChestXrayd",
    "LoadDicomImage",
    "LoadDicomImaged",
    "LoadDicomSeries",
    "LoadDicomSeriesd",
    "LoadVolume",
    "LoadVolumed",
    "PresetCompose",
    "SaveDicomSegd",
    "SaveNiftid",
    "SegWriteResult",
    "affine_spacing",
    "check_decoder",
    "check_geometry",
    "ct_transforms",
    "cxr_classification_transforms",
    "decode_pixels",
    "dicom_overlays",
    "find_dicom_series",
    "frame_dataset",
    "header_copy",
    "hu_window_range",
    "is_dicom_file",
    "load_dicom_series",
    "load_volume",
    "modality_output_range",
    "mr_transforms",
    "normalization_stats",
    "output_stem",
    "read_chest_xray",
    "read_dicom_file",
    "read_dicom_image",
    "read_dicom_seg",
    "reorient_array",
    "scale_to_unit",
    "scan_dicom_folder",
    "sop_uids",
    "voi_output_range",
    "volume_format",
    "write_dicom_seg",
    "write_nifti",
]

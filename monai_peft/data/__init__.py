"""monai_peft.data: MedMNIST-style datasets, data-fraction and K-shot sampling, synthetic fallback data."""

from monai_peft.data.medmnist import (
    MEDMNIST_SPLITS,
    MedMNISTDataset,
    default_medmnist_root,
    download_medmnist,
    load_medmnist_npz,
    medmnist_filename,
)
from monai_peft.data.sampling import class_counts, is_multilabel, k_shot_indices, per_class_fraction_indices
from monai_peft.data.synthetic import SYNTHETIC_NOTICE, make_synthetic_medmnist, write_synthetic_medmnist

__all__ = [
    "MEDMNIST_SPLITS",
    "SYNTHETIC_NOTICE",
    "MedMNISTDataset",
    "class_counts",
    "default_medmnist_root",
    "download_medmnist",
    "is_multilabel",
    "k_shot_indices",
    "load_medmnist_npz",
    "make_synthetic_medmnist",
    "medmnist_filename",
    "per_class_fraction_indices",
    "write_synthetic_medmnist",
]

"""Patch data and normalisation for training and inference."""

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.data.patches import (
    ExtractPatchPair,
    PatchData,
    PatchLocation,
    build_patch_data,
    find_subjects,
    hr_patch_size,
    valid_patch_starts,
)

__all__ = [
    "ExtractPatchPair",
    "NormalisationStats",
    "PatchData",
    "PatchLocation",
    "build_patch_data",
    "find_subjects",
    "hr_patch_size",
    "valid_patch_starts",
]

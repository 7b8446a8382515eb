"""Preprocessed subjects, training patches and normalisation, for training and evaluation."""

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.data.patches import (
    ExtractPatchPair,
    PatchData,
    PatchLocation,
    build_patch_data,
    hr_patch_size,
    valid_patch_starts,
)
from monai_iqt.data.subjects import Subject, SubjectHeader, inspect_subject, load_subject

__all__ = [
    "ExtractPatchPair",
    "NormalisationStats",
    "PatchData",
    "PatchLocation",
    "Subject",
    "SubjectHeader",
    "build_patch_data",
    "hr_patch_size",
    "inspect_subject",
    "load_subject",
    "valid_patch_starts",
]

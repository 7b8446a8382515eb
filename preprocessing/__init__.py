"""DIPY stage of monai-iqt: HCP diffusion data to paired low/high-resolution tensor volumes.

No torch import anywhere in this package, so it runs on CPU-only cluster nodes.
"""

from preprocessing.geometry import crop_to_multiple, hr_affine_from_lr, lr_affine_from_hr
from preprocessing.io import TENSOR_ELEMENTS, InputError, save_nifti, write_json

__all__ = [
    "TENSOR_ELEMENTS",
    "InputError",
    "crop_to_multiple",
    "hr_affine_from_lr",
    "lr_affine_from_hr",
    "save_nifti",
    "write_json",
]

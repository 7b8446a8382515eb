"""DIPY stage of monai-iqt: HCP diffusion data to paired low/high-resolution tensor volumes.

No torch import anywhere in this package, so it runs on CPU-only cluster nodes. The DIPY-based
entry points are imported lazily, so ``from preprocessing.io import ...`` stays cheap.

Tensors are (X, Y, Z, 6) float32 in mm^2/s, DIPY's lower-triangular order, expressed in the
image's voxel axes (FSL bvecs of an image with a positive-determinant affine have x negated on
reading, as FSL defines them; see ``preprocessing.gradients``).

Public API:
    read_gradient_table(bvals, bvecs, data, volumes, affine) -> (bvals, bvecs in voxel axes).
    fit_dti(dwi, bvals, bvecs, mask, workers=1) -> (X, Y, Z, 6) float32 tensors (DIPY WLS).
    preprocess_subject(subject_dir, out_subject_dir, options) -> record dict (or None if done).
    preprocess_hcp(hcp_root, out, subjects, options, workers) -> RunSummary.
    write_synthetic_subject(root, subject_id, seed, index, shape, snr) / write_synthetic_subjects.
"""

from importlib import import_module

from preprocessing.errors import InputError
from preprocessing.geometry import crop_to_multiple, hr_affine_from_lr, lr_affine_from_hr
from preprocessing.io import TENSOR_ELEMENTS, save_nifti, write_json

_LAZY = {
    "read_gradient_table": "preprocessing.gradients",
    "fit_dti": "preprocessing.tensor_fit",
    "count_non_positive_definite": "preprocessing.tensor_fit",
    "block_mean": "preprocessing.geometry",
    "downsample_mask": "preprocessing.geometry",
    "PreprocessingOptions": "preprocessing.hcp_settings",
    "RunSummary": "preprocessing.hcp",
    "preprocess_subject": "preprocessing.hcp",
    "preprocess_hcp": "preprocessing.hcp",
    "write_synthetic_subject": "preprocessing.synthetic",
    "write_synthetic_subjects": "preprocessing.synthetic",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'preprocessing' has no attribute {name!r}")


__all__ = [
    "TENSOR_ELEMENTS",
    "InputError",
    "crop_to_multiple",
    "hr_affine_from_lr",
    "lr_affine_from_hr",
    "save_nifti",
    "write_json",
    *_LAZY,
]

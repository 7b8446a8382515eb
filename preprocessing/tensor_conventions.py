"""Tensor files of other tools: their element order *and* frame, to and from the project's own.

Inside the project a tensor volume is (X, Y, Z, 6) in DIPY's lower-triangular order
(``preprocessing.io.TENSOR_ELEMENTS``) in the image's voxel axes (i, j, k). Other tools store
another order in another frame, so reordering alone gives wrong off-diagonal elements (and
wrong principal directions) on any oblique or neurologically stored image:

- ``dipy``: DIPY's order, voxel axes (what DIPY fits from bvecs read in the voxel frame).
- ``fsl``: ``dtifit --save_tensor`` order Dxx, Dxy, Dxz, Dyy, Dyz, Dzz in FSL's bvec frame, the
  voxel axes with x negated when the affine's determinant is positive (FSL's radiological
  voxel frame; see ``preprocessing.gradients``).
- ``mrtrix``: ``dwi2tensor`` order D11, D22, D33, D12, D13, D23 in the scanner (world, RAS+)
  frame, because MRtrix fits with gradients in scanner coordinates:
  ``D_voxel = R^T D_world R`` with ``R`` the rotation of the image's affine.

A frame change is ``D_voxel = M^T D_file M`` with ``M`` orthogonal (:func:`frame_matrix`), so
MD, FA and the eigenvalues never depend on the frame; the principal direction does.
"""

from __future__ import annotations

import numpy as np
from dipy.reconst.dti import from_lower_triangular, lower_triangular

from preprocessing.errors import InputError
from preprocessing.io import TENSOR_ELEMENTS

#: Element order of the 6-volume tensor files of each convention.
TENSOR_ORDERS: dict[str, tuple[str, ...]] = {
    "dipy": TENSOR_ELEMENTS,
    "fsl": ("Dxx", "Dxy", "Dxz", "Dyy", "Dyz", "Dzz"),  # dtifit --save_tensor
    "mrtrix": ("Dxx", "Dyy", "Dzz", "Dxy", "Dxz", "Dyz"),  # dwi2tensor: D11 D22 D33 D12 D13 D23
}

#: The frame of each convention, as recorded in the JSON sidecars.
FRAMES: dict[str, str] = {
    "dipy": "voxel axes (i, j, k) of this image",
    "fsl": "FSL bvec frame: voxel axes, x negated when the affine's determinant is positive",
    "mrtrix": "scanner (world) RAS+ axes (x, y, z) of this image's affine",
}

#: BIDS diffusion derivatives (BEP016) ``OrientationEncoding.Reference`` of each frame.
BIDS_REFERENCES: dict[str, str] = {"dipy": "ijk", "fsl": "bvec", "mrtrix": "xyz"}

#: BEP016's fixed element order of a rank-2 tensor: D11, D12, D13, D22, D23, D33.
BIDS_ORDER: tuple[str, ...] = ("Dxx", "Dxy", "Dxz", "Dyy", "Dyz", "Dzz")

#: Voxels converted per chunk (bounds the float64 3x3 working copies for HCP-size volumes).
CHUNK_VOXELS = 500_000


def check_convention(convention: str, setting: str = "tensor_order") -> str:
    """``convention`` if it is one of dipy, fsl, mrtrix; one sentence naming ``setting`` if not."""
    if convention not in TENSOR_ORDERS:
        raise InputError(
            f"{setting} {convention!r} is not one of {', '.join(TENSOR_ORDERS)} (the tensor "
            "file's element order and frame)."
        )
    return convention


def affine_rotation(affine: np.ndarray) -> np.ndarray:
    """The rotation (3x3 orthonormal, determinant +-1) of a voxel-to-world affine.

    Columns are normalised (voxel sizes removed); a sheared affine, whose normalised columns
    are not orthogonal, is replaced by its nearest orthonormal matrix (polar decomposition).
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    rotation = linear / np.linalg.norm(linear, axis=0)
    u, _, vt = np.linalg.svd(rotation)
    return u @ vt


def frame_matrix(convention: str, affine: np.ndarray) -> np.ndarray:
    """``M`` with ``D_voxel = M^T D_convention M`` (and ``D_convention = M D_voxel M^T``)."""
    check_convention(convention)
    if convention == "mrtrix":
        return affine_rotation(affine)
    matrix = np.eye(3)
    if convention == "fsl" and np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]) > 0:
        matrix[0, 0] = -1.0
    return matrix


def _reorder(dt: np.ndarray, source: tuple[str, ...], target: tuple[str, ...]) -> np.ndarray:
    return dt[..., [source.index(element) for element in target]]


def _change_frame(dt: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``matrix^T D matrix`` per voxel of a DIPY-order volume, in chunks, in ``dt``'s dtype."""
    if np.array_equal(matrix, np.eye(3)):
        return dt.copy()
    diagonal = np.diag(np.diag(matrix))
    if np.array_equal(np.abs(matrix), np.eye(3)) and np.array_equal(matrix, diagonal):
        signs = np.diag(matrix)  # an axis flip: off-diagonal elements change sign, exactly
        pairs = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]  # TENSOR_ELEMENTS as (row, col)
        return dt * np.array([signs[r] * signs[c] for r, c in pairs], dtype=dt.dtype)
    flat = dt.reshape(-1, 6)
    result = np.empty_like(flat)
    for start in range(0, flat.shape[0], CHUNK_VOXELS):
        tensors = from_lower_triangular(flat[start : start + CHUNK_VOXELS].astype(np.float64))
        rotated = np.einsum("ki,vkl,lj->vij", matrix, tensors, matrix)
        result[start : start + CHUNK_VOXELS] = lower_triangular(rotated)
    return result.reshape(dt.shape)


def to_voxel_frame(
    dt: np.ndarray, convention: str, affine: np.ndarray, order: tuple[str, ...] | None = None
) -> np.ndarray:
    """A tensor volume stored in ``convention`` as DIPY order in the voxel frame.

    ``order`` overrides the convention's element order (BIDS files use :data:`BIDS_ORDER`).
    """
    check_convention(convention)
    dt = _reorder(np.asarray(dt), order or TENSOR_ORDERS[convention], TENSOR_ELEMENTS)
    return _change_frame(dt, frame_matrix(convention, affine))


def from_voxel_frame(
    dt: np.ndarray, convention: str, affine: np.ndarray, order: tuple[str, ...] | None = None
) -> np.ndarray:
    """Inverse of :func:`to_voxel_frame`: DIPY order, voxel frame -> ``convention``'s file."""
    check_convention(convention)
    dt = _change_frame(np.asarray(dt), frame_matrix(convention, affine).T)
    return _reorder(dt, TENSOR_ELEMENTS, order or TENSOR_ORDERS[convention])


def tensor_sidecar(convention: str, order: tuple[str, ...] | None = None) -> dict:
    """What a tensor file's JSON sidecar says about its elements: order, frame, units."""
    check_convention(convention)
    order = order or TENSOR_ORDERS[convention]
    return {
        "TensorConvention": convention,
        "TensorElementOrder": list(order),
        "TensorFrame": FRAMES[convention],
        "Units": "mm^2/s",
        "OrientationEncoding": {
            "Type": "tensor",
            "TensorRank": 2,
            "EncodingAxis": 3,
            "Reference": BIDS_REFERENCES[convention],
        },
    }

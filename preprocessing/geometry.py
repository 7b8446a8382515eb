"""The one place that knows how low- and high-resolution voxel grids relate.

An LR voxel is the block-wise mean of an r x r x r block of HR voxels, so its centre in
world space is the centre of that block: LR index j maps to HR (continuous) index
``r * j + (r - 1) / 2``, and HR index i maps to LR index ``(i - (r - 1) / 2) / r``.
"""

from __future__ import annotations

import numpy as np


def lr_to_hr_index_matrix(factor: int) -> np.ndarray:
    """4x4 voxel-to-voxel matrix taking LR indices to (continuous) HR indices."""
    _check_factor(factor)
    shift = (factor - 1) / 2.0
    matrix = np.diag([float(factor)] * 3 + [1.0])
    matrix[:3, 3] = shift
    return matrix


def lr_affine_from_hr(hr_affine: np.ndarray, factor: int) -> np.ndarray:
    """LR voxel-to-world affine: ``hr_affine @ diag(r, r, r, 1)`` shifted by ``(r - 1) / 2``."""
    return np.asarray(hr_affine, dtype=np.float64) @ lr_to_hr_index_matrix(factor)


def hr_affine_from_lr(lr_affine: np.ndarray, factor: int) -> np.ndarray:
    """Inverse of :func:`lr_affine_from_hr`: the HR grid whose r^3 blocks average to LR voxels."""
    return np.asarray(lr_affine, dtype=np.float64) @ np.linalg.inv(lr_to_hr_index_matrix(factor))


def hr_to_lr_coordinates(hr_indices: np.ndarray, factor: int) -> np.ndarray:
    """Continuous LR coordinate ``(i - (r - 1) / 2) / r`` of HR index ``i`` (for interpolation)."""
    _check_factor(factor)
    return (np.asarray(hr_indices, dtype=np.float64) - (factor - 1) / 2.0) / factor


def crop_to_multiple(shape: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    """Spatial shape cropped down to a multiple of ``factor`` (trailing voxels are dropped)."""
    _check_factor(factor)
    return tuple(int(size) // factor * factor for size in shape[:3])  # type: ignore[return-value]


def _check_factor(factor: int) -> None:
    if int(factor) != factor or factor < 1:
        raise ValueError(f"the downsampling factor must be a whole number >= 1, got {factor!r}")


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel side lengths in mm along the three voxel axes (column norms of the affine)."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))

"""The low- and high-resolution voxel grids: how they relate, and every operation between them.

An LR voxel is the block-wise mean of an r x r x r block of HR voxels, so its centre in
world space is the centre of that block: LR index j maps to HR (continuous) index
``r * j + (r - 1) / 2``, and HR index i maps to LR index ``(i - (r - 1) / 2) / r``.
A volume whose shape is not a multiple of r is first cropped at the end (trailing voxels
dropped, voxel (0, 0, 0) and so the affine unchanged). Preprocessing, the training patches,
evaluation and inference all take their affines, crops, block means and block repeats from here.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Voxel side lengths in mm along the three voxel axes (column norms of the affine)."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def crop_to_multiple(shape: tuple[int, ...], factor: int) -> tuple[int, int, int]:
    """Spatial shape cropped down to a multiple of ``factor`` (trailing voxels are dropped)."""
    _check_factor(factor)
    return tuple(int(size) // factor * factor for size in shape[:3])  # type: ignore[return-value]


def crop_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """View of ``volume`` with its three spatial axes cropped to a multiple of ``factor``."""
    x, y, z = crop_to_multiple(volume.shape, factor)
    return volume[:x, :y, :z]


def hr_blocks(volume: np.ndarray, factor: int) -> np.ndarray:
    """View of a (cropped) HR volume as LR voxels: shape ``(x, r, y, r, z, r, ...)``, the block
    of LR voxel (i, j, k) at ``[i, :, j, :, k, :]``; reduce over axes (1, 3, 5) per LR voxel."""
    cropped = crop_volume(np.asarray(volume), factor)
    x, y, z = (size // factor for size in cropped.shape[:3])
    return cropped.reshape((x, factor, y, factor, z, factor) + cropped.shape[3:])


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over non-overlapping factor^3 blocks of a 3D or 4D volume (cropped first), as float32.

    Sums are accumulated in float64 so that a float32 DWI loses no precision.
    """
    return hr_blocks(volume, factor).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def block_any(mask: np.ndarray, factor: int) -> np.ndarray:
    """LR voxels (bool) whose HR block holds any true voxel, e.g. where a model must predict."""
    return hr_blocks(mask, factor).any(axis=(1, 3, 5))


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """LR mask (uint8): an LR voxel is inside when at least half of its HR block is."""
    fraction = block_mean(np.asarray(mask, dtype=bool).astype(np.float32), factor)
    return (fraction >= 0.5).astype(np.uint8)


def repeat_blocks(volume: np.ndarray, factor: int) -> np.ndarray:
    """Each LR voxel repeated ``factor`` times along the first three axes: its HR block."""
    for axis in range(3):
        volume = np.repeat(volume, factor, axis=axis)
    return volume


def hr_block(lr_start: Sequence[int], lr_size: int, factor: int) -> tuple[slice, slice, slice]:
    """HR index slices of the block covered by the LR cube of side ``lr_size`` at ``lr_start``."""
    return tuple(slice(factor * s, factor * (s + lr_size)) for s in lr_start)  # type: ignore[return-value]


def _check_factor(factor: int) -> None:
    if int(factor) != factor or factor < 1:
        raise ValueError(f"the downsampling factor must be a whole number >= 1, got {factor!r}")

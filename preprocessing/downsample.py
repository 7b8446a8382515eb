"""Block-wise downsampling of raw DWI volumes and brain masks (IQT's LR simulation), and the
brain mask a scan draws from its own b0 (what inference does on a new scan).

Volumes are first cropped to a multiple of the factor (trailing voxels dropped, see
:func:`preprocessing.geometry.crop_to_multiple`); each LR voxel is then the mean of an
r x r x r HR block, so its centre is the block centre
(:func:`preprocessing.geometry.lr_affine_from_hr`).
"""

from __future__ import annotations

import numpy as np

from preprocessing.geometry import crop_to_multiple


def crop_volume(volume: np.ndarray, factor: int) -> np.ndarray:
    """View of ``volume`` with its three spatial axes cropped to a multiple of ``factor``."""
    x, y, z = crop_to_multiple(volume.shape, factor)
    return volume[:x, :y, :z]


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over non-overlapping factor^3 blocks of a 3D or 4D volume (cropped first), as float32.

    Sums are accumulated in float64 so that a float32 DWI loses no precision.
    """
    cropped = crop_volume(np.asarray(volume), factor)
    x, y, z = (size // factor for size in cropped.shape[:3])
    blocks = cropped.reshape((x, factor, y, factor, z, factor) + cropped.shape[3:])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def downsample_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """LR mask (uint8): an LR voxel is inside when at least half of its HR block is."""
    fraction = block_mean(np.asarray(mask, dtype=bool).astype(np.float32), factor)
    return (fraction >= 0.5).astype(np.uint8)


#: DIPY ``median_otsu`` settings of a brain mask drawn from the data: inference on a new scan and
#: ``preprocessing hcp --lr-mask lr-data`` use the same ones.
MEDIAN_OTSU_SETTINGS = {"median_radius": 2, "numpass": 1}


def data_brain_mask(mean_b0: np.ndarray) -> np.ndarray:
    """Brain mask (bool) of a scan from its mean b0 volume with DIPY's ``median_otsu``."""
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(np.asarray(mean_b0, dtype=np.float32), **MEDIAN_OTSU_SETTINGS)
    return np.asarray(mask, dtype=bool)

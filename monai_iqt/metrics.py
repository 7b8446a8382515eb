"""Accuracy of an HR tensor prediction against ground truth, and interpolation baselines.

Conventions (``DESIGN.md``): RMSE over the 6 tensor elements of brain voxels, reported in
1e-5 mm^2/s; *interior* brain voxels are those whose LR voxel's cubic neighbourhood of the given
radius (default 2, the ESPCN's own 5^3 receptive field) lies inside the LR mask, *exterior* the
other brain voxels, *total* all of them. Baselines interpolate the LR tensor at the LR coordinate
of each HR voxel centre (``preprocessing.geometry.hr_to_lr_coordinates``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from preprocessing.geometry import hr_to_lr_coordinates

#: Unit of reported RMSE values: 1e-5 mm^2/s.
RMSE_UNIT = 1e-5

#: Interpolation baselines and their ``scipy.ndimage`` spline order.
BASELINE_ORDERS: dict[str, int] = {"nearest": 0, "trilinear": 1, "cubic": 3}

REGIONS = ("interior", "exterior", "total")


def upsample_nearest(volume_lr: np.ndarray, factor: int) -> np.ndarray:
    """Repeat each LR voxel over its r^3 HR block (spatial axes 0-2)."""
    out = volume_lr
    for axis in range(3):
        out = np.repeat(out, factor, axis=axis)
    return out


def interior_mask(
    mask_lr: np.ndarray, mask_hr: np.ndarray, factor: int, radius: int = 2
) -> np.ndarray:
    """HR brain voxels whose LR voxel's (2*radius+1)^3 neighbourhood lies inside ``mask_lr``.

    Outside the field of view counts as outside the mask.
    """
    mask_lr = np.asarray(mask_lr, dtype=bool)
    if radius > 0:
        cube = np.ones((2 * radius + 1,) * 3, dtype=bool)
        inside_lr = ndimage.binary_erosion(mask_lr, structure=cube, border_value=0)
    else:
        inside_lr = mask_lr
    return upsample_nearest(inside_lr, factor)[
        : mask_hr.shape[0], : mask_hr.shape[1], : mask_hr.shape[2]
    ] & (np.asarray(mask_hr, dtype=bool))


def region_rmse(
    prediction: np.ndarray,
    target: np.ndarray,
    mask_hr: np.ndarray,
    interior: np.ndarray,
) -> dict[str, float]:
    """RMSE (1e-5 mm^2/s) over the 6 tensor elements in the interior, exterior and whole brain."""
    brain = np.asarray(mask_hr, dtype=bool)
    squared = np.square(np.asarray(prediction, np.float64) - np.asarray(target, np.float64))
    regions = {"interior": brain & interior, "exterior": brain & ~interior, "total": brain}
    result = {}
    for name, region in regions.items():
        values = squared[region]
        result[name] = float(np.sqrt(values.mean()) / RMSE_UNIT) if values.size else float("nan")
    return result


def interpolate_lr(
    dt_lr: np.ndarray, hr_shape: tuple[int, ...], factor: int, method: str
) -> np.ndarray:
    """Baseline HR tensor: ``method`` interpolation of ``dt_lr`` at each HR voxel centre.

    ``method`` is ``nearest``, ``trilinear`` or ``cubic`` (cubic B-spline); values beyond the
    LR grid repeat its edge (``mode="nearest"``), which only concerns the outermost half voxel.
    """
    if method not in BASELINE_ORDERS:
        raise ValueError(
            f"unknown interpolation {method!r}; choose one of {sorted(BASELINE_ORDERS)}"
        )
    order = BASELINE_ORDERS[method]
    axes = [hr_to_lr_coordinates(np.arange(size), factor) for size in hr_shape[:3]]
    coordinates = np.stack(np.meshgrid(*axes, indexing="ij"))
    dt_lr = np.asarray(dt_lr, dtype=np.float64)
    channels = [
        ndimage.map_coordinates(dt_lr[..., c], coordinates, order=order, mode="nearest")
        for c in range(dt_lr.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)

"""Accuracy of an HR tensor prediction against ground truth, and interpolation baselines.

Conventions (``DESIGN.md``): RMSE over the 6 tensor elements of brain voxels, reported in
1e-5 mm^2/s; *interior* brain voxels are those whose LR voxel's cubic neighbourhood of the given
radius (default 2, the ESPCN's own 5^3 receptive field) lies inside the LR mask, *exterior* the
other brain voxels, *total* all of them. Baselines interpolate the LR tensor at the LR coordinate
of each HR voxel centre (``preprocessing.geometry.hr_to_lr_coordinates``). For a model that
predicts a standard deviation per element: coverage of its intervals and the rank correlation of
predicted and actual error (Tanno et al. 2021).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, stats

#: Unit of reported RMSE values: 1e-5 mm^2/s.
RMSE_UNIT = 1e-5

#: Interpolation baselines and their ``scipy.ndimage`` spline order.
BASELINE_ORDERS: dict[str, int] = {"nearest": 0, "trilinear": 1, "cubic": 3}

REGIONS = ("interior", "exterior", "total")


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
    # each LR voxel over its r^3 HR block: nearest-neighbour zoom on the HR voxel centres
    inside_hr = (
        ndimage.zoom(inside_lr.astype(np.uint8), factor, order=0, mode="nearest", grid_mode=True)
        > 0
    )
    return inside_hr[: mask_hr.shape[0], : mask_hr.shape[1], : mask_hr.shape[2]] & np.asarray(
        mask_hr, dtype=bool
    )


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


def interpolate_lr(dt_lr: np.ndarray, factor: int, method: str) -> np.ndarray:
    """Baseline HR tensor (r X, r Y, r Z, 6): ``method`` interpolation of ``dt_lr``.

    ``scipy.ndimage.zoom`` with ``grid_mode=True`` samples HR index ``i`` at LR coordinate
    ``(i - (r - 1) / 2) / r``, the centre of its HR voxel (``preprocessing.geometry``);
    ``method`` is ``nearest``, ``trilinear`` or ``cubic`` (cubic B-spline, spline prefilter on
    the edge-extended signal); beyond the LR grid the edge value repeats (``mode="nearest"``),
    which only concerns the outermost half LR voxel.
    """
    if method not in BASELINE_ORDERS:
        raise ValueError(
            f"unknown interpolation {method!r}; choose one of {sorted(BASELINE_ORDERS)}"
        )
    dt_lr = np.asarray(dt_lr, dtype=np.float64)
    channels = [
        ndimage.zoom(
            dt_lr[..., c], factor, order=BASELINE_ORDERS[method], mode="nearest", grid_mode=True
        )
        for c in range(dt_lr.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(np.float32)


# --------------------------------------------------------------------------- uncertainty

#: Nominal probabilities of the central intervals a reliability diagram checks.
NOMINAL_LEVELS = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)) + (0.99,)


def coverage(
    error: np.ndarray, sigma: np.ndarray, k: float, mask: np.ndarray | None = None
) -> float:
    """Fraction of brain voxel elements with ``|error| <= k * sigma``.

    ``error`` and ``sigma`` are (X, Y, Z, 6) (prediction minus truth, predicted standard
    deviation, same units); ``mask`` (X, Y, Z) selects brain voxels (default: all). For a
    calibrated Gaussian prediction k = 1 covers 0.683 and k = 2 covers 0.954 of the elements.
    """
    brain = _brain(error, mask)
    errors = np.abs(np.asarray(error, np.float64)[brain])
    if errors.size == 0:
        return float("nan")
    return float(np.mean(errors <= k * np.asarray(sigma, np.float64)[brain]))


def voxel_rms(volume: np.ndarray) -> np.ndarray:
    """Root mean square over the 6 tensor elements of each voxel (X, Y, Z, 6) -> (X, Y, Z)."""
    return np.sqrt(np.mean(np.square(np.asarray(volume, np.float64)), axis=-1))


def spearman_sigma_error(
    sigma: np.ndarray, error: np.ndarray, mask: np.ndarray | None = None
) -> float:
    """Spearman rank correlation, over brain voxels, of predicted and actual error per voxel.

    Per voxel, sigma is the RMS of the 6 elements' predicted standard deviations (the RMSE the
    model expects there) and the error is the RMS of the 6 elements' errors (the voxel's RMSE,
    as the error figure shows). Voxels, not elements, are ranked: pooling elements would
    reward the trivial fact that diagonal elements have larger values, errors and sigmas than
    off-diagonal ones. NaN when sigma (or the error) is the same in every voxel: a constant
    ranks nothing.
    """
    brain = _brain(error, mask)
    predicted, actual = voxel_rms(sigma)[brain], voxel_rms(error)[brain]
    if predicted.size < 2 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return float("nan")
    return float(stats.spearmanr(predicted, actual).statistic)


def calibration_curve(
    error: np.ndarray,
    sigma: np.ndarray,
    mask: np.ndarray | None = None,
    levels: tuple[float, ...] = NOMINAL_LEVELS,
) -> tuple[np.ndarray, np.ndarray]:
    """Expected and observed coverage of Gaussian central intervals (a reliability diagram).

    For each nominal probability p the interval is ``|error| <= k sigma`` with
    ``k = Phi^-1((1 + p) / 2)``; a calibrated model observes p.
    """
    expected = np.asarray(levels, dtype=np.float64)
    ks = stats.norm.ppf((1 + expected) / 2)
    return expected, np.array([coverage(error, sigma, k, mask) for k in ks])


def uncertainty_metrics(
    error: np.ndarray, sigma: np.ndarray, mask: np.ndarray | None = None
) -> dict[str, float]:
    """The per-subject columns of ``metrics.csv`` for a model that predicts its uncertainty."""
    return {
        "coverage_1sigma": coverage(error, sigma, 1.0, mask),
        "coverage_2sigma": coverage(error, sigma, 2.0, mask),
        "spearman_sigma_error": spearman_sigma_error(sigma, error, mask),
    }


def _brain(volume: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is None:
        return np.ones(np.shape(volume)[:3], dtype=bool)
    return np.asarray(mask, dtype=bool)

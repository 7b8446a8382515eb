"""Gradient tables (FSL ``bvals``/``bvecs``) checked for a DTI fit, in the image's voxel frame.

Frame convention. FSL writes ``bvecs`` in the image's voxel axes, except that for an image whose
affine has a positive determinant (stored "neurological", e.g. RAS) it flips the first axis:
FSL's voxel frame is always radiological. :func:`read_gradient_table` undoes that flip when given
the affine, so the directions it returns, and every tensor fitted from them, are expressed in the
image's own voxel axes (x, y, z = the first, second, third array axis). The same acquisition
stored LAS and stored RAS therefore gives the same tensors up to the flip of the x axis, with
Dxy and Dxz changing sign.

A b0 volume's direction is ignored whatever the file holds there (zeros, NaN, any vector): it is
returned as zeros.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from dipy.io.gradients import read_bvals_bvecs

from preprocessing.errors import InputError

#: Volumes with b below this are b0 (HCP's b0 volumes have b = 5 s/mm^2).
B0_THRESHOLD = 100.0

#: DTI is fitted on the volumes with b <= this: b0 and the b = 1000 shell, as the paper does.
DEFAULT_BMAX = 1500.0

#: Tolerance on |bvec| - 1 for diffusion-weighted directions (FSL files carry ~4-6 decimals).
UNIT_LENGTH_TOLERANCE = 1e-2

#: A tensor has 6 unknowns (plus S0): at least 6 distinct directions are needed.
MIN_DIRECTIONS = 6


def read_gradient_table(
    bvals_path: str | os.PathLike,
    bvecs_path: str | os.PathLike,
    data_path: str | os.PathLike,
    volumes: int,
    affine: np.ndarray | None = None,
    b0_threshold: float = B0_THRESHOLD,
    bmax: float = DEFAULT_BMAX,
) -> tuple[np.ndarray, np.ndarray]:
    """FSL bvals (N,) and bvecs (N, 3) of ``data_path``'s N volumes, checked for a DTI fit.

    The files are read with DIPY's ``read_bvals_bvecs``. With ``affine`` (the image's), the
    directions are returned in the image's voxel frame: x negated for a positive determinant
    (see the module docstring); without it, as the file holds them. b0 rows (b < b0_threshold)
    are zeros.

    One sentence (InputError) for: a file that is not a table of numbers, counts differing from
    the volumes, negative or non-finite b-values, bvecs of the wrong shape, non-finite or
    non-unit directions of diffusion-weighted volumes, no b0 volume, fewer than 6 distinct
    directions with b <= ``bmax``.
    """
    bvals_path, bvecs_path, data_name = Path(bvals_path), Path(bvecs_path), Path(data_path).name
    bvals = read_bvals(bvals_path)
    if bvals.size != volumes:
        raise InputError(
            f"{bvals_path} has {bvals.size} b-values but {data_name} has {volumes} volumes."
        )
    bad = np.flatnonzero(~np.isfinite(bvals) | (bvals < 0))
    if bad.size:
        raise InputError(
            f"{bvals_path} b-value {bad[0]} is {bvals[bad[0]]:g}, but b-values must be finite "
            "and not negative (s/mm^2)."
        )
    bvecs = read_bvecs(bvecs_path)
    if bvecs.shape[0] != volumes:
        raise InputError(
            f"{bvecs_path} has {bvecs.shape[0]} directions but {data_name} has {volumes} volumes."
        )
    is_b0 = bvals < b0_threshold
    bvecs = np.where(is_b0[:, None], 0.0, bvecs)  # a b0 direction means nothing, NaN included
    bad = np.flatnonzero(~np.isfinite(bvecs).all(axis=1))
    if bad.size:
        raise InputError(
            f"{bvecs_path} direction {bad[0]} (b={bvals[bad[0]]:g}) is not finite, but "
            "diffusion-weighted directions must be unit vectors."
        )
    lengths = np.linalg.norm(bvecs, axis=1)
    bad = np.flatnonzero(~is_b0 & (np.abs(lengths - 1) > UNIT_LENGTH_TOLERANCE))
    if bad.size:
        raise InputError(
            f"{bvecs_path} direction {bad[0]} has length {lengths[bad[0]]:.3g} "
            f"(b={bvals[bad[0]]:g}), "
            "but diffusion-weighted directions must be unit vectors."
        )
    if not is_b0.any():
        raise InputError(
            f"{bvals_path} has no b0 volume (b < {b0_threshold:g}); a tensor fit needs one."
        )
    directions = distinct_directions(bvecs[~is_b0 & (bvals <= bmax)])
    if directions < MIN_DIRECTIONS:
        raise InputError(
            f"{bvals_path} has {directions} distinct directions with "
            f"{b0_threshold:g} <= b <= {bmax:g}, but a tensor fit needs at least {MIN_DIRECTIONS}."
        )
    if affine is not None:
        bvecs = fsl_to_voxel_frame(bvecs, affine)
    return bvals, bvecs


def fsl_to_voxel_frame(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """FSL bvecs (N, 3) in the image's voxel axes: x negated when det(affine) > 0, as FSL does."""
    bvecs = np.array(bvecs, dtype=np.float64)
    if np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]) > 0:
        bvecs[:, 0] = -bvecs[:, 0]
    return bvecs + 0.0  # no -0.0 entries


def read_bvals(path: Path) -> np.ndarray:
    """A bvals file as a flat float64 array (one row, or one value per line)."""
    bvals, _ = _read(path, None)
    bvals = np.atleast_1d(np.asarray(bvals, dtype=np.float64))
    if bvals.ndim != 1:
        raise InputError(
            f"{path} has shape {bvals.shape}, but FSL bvals need one row of one value per volume."
        )
    return bvals


def read_bvecs(path: Path) -> np.ndarray:
    """An FSL bvecs file (3 rows x N columns; N rows x 3 columns also accepted) as (N, 3)."""
    _, bvecs = _read(None, path)
    return np.asarray(bvecs, dtype=np.float64)


def _read(bvals_path: Path | None, bvecs_path: Path | None):
    path = bvals_path or bvecs_path
    try:
        return read_bvals_bvecs(
            None if bvals_path is None else str(bvals_path),
            None if bvecs_path is None else str(bvecs_path),
        )
    except OSError as error:  # DIPY's shape checks ("bvec file should have three rows")
        if bvecs_path is None or not Path(bvecs_path).is_file():
            raise InputError(f"{path} cannot be read ({error}).") from error
        shape = np.atleast_2d(np.loadtxt(bvecs_path)).shape
        raise InputError(
            f"{path} has shape {shape}, but FSL bvecs need 3 rows (x, y, z) of one column per "
            "volume."
        ) from error
    except ValueError as error:
        raise InputError(f"{path} is not a table of numbers ({error}).") from error


def distinct_directions(bvecs: np.ndarray) -> int:
    """Directions counted once whatever their sign (g and -g give the same DTI measurement)."""
    if len(bvecs) == 0:
        return 0
    unit = bvecs / np.linalg.norm(bvecs, axis=1, keepdims=True)
    leading = unit[np.arange(len(unit)), np.argmax(np.abs(unit) > 1e-6, axis=1)]
    canonical = unit * np.where(leading < 0, -1.0, 1.0)[:, None]
    return len(np.unique(np.round(canonical, 3), axis=0))

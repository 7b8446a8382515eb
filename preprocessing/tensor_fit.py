"""DTI fitting with DIPY's TensorModel on in-memory arrays, in bounded memory.

The fit runs over the masked voxels in chunks, so a 1.25 mm HCP brain (about a million
voxels, ~100 volumes) never needs DIPY's float64 working copies of the whole brain at once.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel, from_lower_triangular

log = logging.getLogger(__name__)

#: Volumes with b below this are b0 (HCP's b0 volumes have b = 5 s/mm^2).
B0_THRESHOLD = 100.0

#: DTI is fitted on the volumes with b <= this: b0 and the b = 1000 shell, as the paper does.
DEFAULT_BMAX = 1500.0

#: Voxels per DIPY call: ~100 volumes x 50k voxels x 8 bytes = 40 MB per float64 copy.
CHUNK_VOXELS = 50_000


def make_tensor_model(
    bvals: np.ndarray,
    bvecs: np.ndarray,
    b0_threshold: float = B0_THRESHOLD,
    fit_method: str = "WLS",
) -> TensorModel:
    """DIPY TensorModel for FSL-style ``bvals`` (N,) and ``bvecs`` (N, 3); b < threshold is b0."""
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64).copy()
    bvecs[bvals < b0_threshold] = 0.0  # DIPY treats these as b0 whatever their direction
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DIPY warns about b0_threshold > 50 (HCP b0 is b=5)
        gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=b0_threshold)
    return TensorModel(gtab, fit_method=fit_method)


def fit_dti(
    dwi: np.ndarray,
    bvals: np.ndarray,
    bvecs: np.ndarray,
    mask: np.ndarray | None = None,
    b0_threshold: float = B0_THRESHOLD,
    fit_method: str = "WLS",
) -> np.ndarray:
    """Fit a diffusion tensor per voxel and return it as an (X, Y, Z, 6) float32 volume.

    Args:
        dwi: diffusion-weighted signal (X, Y, Z, N), any real dtype.
        bvals: b-values (N,) in s/mm^2.
        bvecs: unit gradient directions (N, 3) in voxel axes (FSL convention); b0 rows ignored.
        mask: voxels to fit (X, Y, Z); all voxels when None. Tensors are zero outside it.
        b0_threshold: volumes with b below it are b0 (HCP b0 volumes have b=5).
        fit_method: DIPY fit method, "WLS" (default) or "OLS", "NLLS", "RT", ...

    Returns:
        Tensor elements in mm^2/s in DIPY lower-triangular order (``TENSOR_ELEMENTS``).
    """
    dwi = np.asarray(dwi)
    if dwi.ndim != 4:
        raise ValueError(f"dwi must be 4D (X, Y, Z, N), got shape {dwi.shape}")
    if mask is None:
        mask = np.ones(dwi.shape[:3], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != dwi.shape[:3]:
        raise ValueError(f"mask shape {mask.shape} differs from dwi shape {dwi.shape[:3]}")
    model = make_tensor_model(bvals, bvecs, b0_threshold, fit_method)
    tensors = np.zeros(dwi.shape[:3] + (6,), dtype=np.float32)
    # Fancy indexing by coordinates works on any memory layout (e.g. a volume-major array
    # seen through a transpose) without copying the whole DWI.
    coordinates = np.nonzero(mask)
    for start in range(0, coordinates[0].size, CHUNK_VOXELS):
        chunk = tuple(axis[start : start + CHUNK_VOXELS] for axis in coordinates)
        signal = dwi[chunk].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            tensors[chunk] = model.fit(signal).lower_triangular()
    return tensors


def count_non_positive_definite(tensors: np.ndarray, mask: np.ndarray) -> int:
    """Number of voxels in ``mask`` whose tensor has an eigenvalue <= 0."""
    inside = np.asarray(tensors, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if inside.size == 0:
        return 0
    smallest = np.linalg.eigvalsh(from_lower_triangular(inside))[:, 0]
    return int(np.count_nonzero(smallest <= 0))

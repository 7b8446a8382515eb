"""Scalar and colour maps of a diffusion tensor volume (MD, FA, colour-FA) via DIPY.

The tensor volume is (X, Y, Z, 6) in DIPY's lower-triangular order (``preprocessing.io``),
so DIPY's own functions decompose it; nothing here re-implements tensor algebra.
"""

from __future__ import annotations

import numpy as np
from dipy.reconst.dti import (
    color_fa,
    decompose_tensor,
    fractional_anisotropy,
    from_lower_triangular,
    mean_diffusivity,
)


def tensor_maps(dt: np.ndarray, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mean diffusivity (mm^2/s), fractional anisotropy and colour-FA (RGB in [0, 1]) of ``dt``.

    Voxels outside ``mask`` (or with an all-zero tensor when no mask is given) are set to zero.
    """
    dt = np.asarray(dt, dtype=np.float64)
    if mask is None:
        mask = np.any(dt != 0, axis=-1)
    mask = np.asarray(mask, dtype=bool)
    evals, evecs = decompose_tensor(from_lower_triangular(dt[mask]))
    md = np.zeros(dt.shape[:3], dtype=np.float32)
    fa = np.zeros(dt.shape[:3], dtype=np.float32)
    rgb = np.zeros(dt.shape[:3] + (3,), dtype=np.float32)
    fa_in_mask = np.clip(np.nan_to_num(fractional_anisotropy(evals)), 0.0, 1.0)
    md[mask] = mean_diffusivity(evals)
    fa[mask] = fa_in_mask
    rgb[mask] = np.clip(color_fa(fa_in_mask, evecs), 0.0, 1.0)
    return {"md": md, "fa": fa, "colour_fa": rgb}

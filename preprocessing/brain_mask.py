"""The brain mask a scan draws from its own mean b0: what inference does on a new scan, and what
``preprocessing hcp --lr-mask lr-data`` does on the simulated LR scan."""

from __future__ import annotations

import numpy as np

#: DIPY ``median_otsu`` settings of a brain mask drawn from the data: inference on a new scan and
#: ``preprocessing hcp --lr-mask lr-data`` use the same ones.
MEDIAN_OTSU_SETTINGS = {"median_radius": 2, "numpass": 1}


def data_brain_mask(mean_b0: np.ndarray) -> np.ndarray:
    """Brain mask (bool) of a scan from its mean b0 volume with DIPY's ``median_otsu``."""
    from dipy.segment.mask import median_otsu

    _, mask = median_otsu(np.asarray(mean_b0, dtype=np.float32), **MEDIAN_OTSU_SETTINGS)
    return np.asarray(mask, dtype=bool)

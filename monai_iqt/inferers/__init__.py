"""Whole-brain inference for valid-convolution networks: halo-exact windows or the paper's patches.

As in :mod:`monai.inferers`, the package re-exports its public names, so configs and callers say
``monai_iqt.inferers.HaloExactInferer``. :mod:`~monai_iqt.inferers.halo` runs a network over a
normalised, padded input in windows whose outputs equal one whole-volume pass (or stitches the
paper's patches); :mod:`~monai_iqt.inferers.whole_brain` turns tensor volumes in mm^2/s into
their HR prediction around it (padding, normalisation, brain mask, Monte Carlo dropout).
"""

from monai_iqt.inferers.halo import (
    INFERENCE_MODES,
    PATCH_BATCH,
    PATCH_SIZE,
    HaloExactInferer,
    InferenceCounts,
    bundle_window,
    network_halo,
    plan_windows,
)
from monai_iqt.inferers.whole_brain import (
    WholeBrainInferer,
    default_device,
    make_inferer,
)

__all__ = [
    "INFERENCE_MODES",
    "PATCH_BATCH",
    "PATCH_SIZE",
    "HaloExactInferer",
    "InferenceCounts",
    "WholeBrainInferer",
    "bundle_window",
    "default_device",
    "make_inferer",
    "network_halo",
    "plan_windows",
]

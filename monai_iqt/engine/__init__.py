"""Training engines: the memory-efficient reversible backward (Gomez et al. 2017, Alg. 1) and the
autograd saved-tensor tracker that measures what it keeps."""

from monai_iqt.engine.memory import SavedTensorTracker, parameter_storages
from monai_iqt.engine.reversible import (
    ReversibleSegment,
    inversion_error,
    run_segment,
    running_stats_frozen,
)

__all__ = [
    "ReversibleSegment",
    "SavedTensorTracker",
    "inversion_error",
    "parameter_storages",
    "run_segment",
    "running_stats_frozen",
]

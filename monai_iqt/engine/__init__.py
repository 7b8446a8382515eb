"""Training engines: the memory-efficient reversible backward (Gomez et al. 2017, Alg. 1)."""

from monai_iqt.engine.reversible import (
    ReversibleSegment,
    inversion_error,
    run_segment,
    running_stats_frozen,
)

__all__ = ["ReversibleSegment", "inversion_error", "run_segment", "running_stats_frozen"]

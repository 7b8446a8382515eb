"""Training of ESPCN-RN-N for the MONAI bundle ``bundles/iqt_espcn_rn`` (``configs/train.json``).

The config holds the wiring (SupervisedTrainer, SupervisedEvaluator, handlers); this package holds
what the wiring calls: loss and metric input, resumable and atomic handlers, the NaN guard, the
restarts runner and the torchrun helpers.
"""

from monai_iqt.training.distributed import (
    BroadcastBuffers,
    destroy_process_group,
    init_process_group,
    is_writer,
    local_device,
    rank,
    state_digest,
    unwrap,
    world_size,
)
from monai_iqt.training.handlers import (
    AtomicCheckpointSaver,
    RandomStates,
    ResumableEarlyStopHandler,
    RMSELoss,
    StopOnNonFiniteLoss,
    TrainingDiverged,
    TrainingHistory,
    as_bool,
    batch_loss,
    every_n_iterations,
    flat_pred_label,
    lower_is_better,
    negative_metric,
)
from monai_iqt.training.restarts import (
    TrainingRun,
    export_model,
    run_restarts,
    save_atomically,
    train_with_restarts,
)

__all__ = [
    "AtomicCheckpointSaver",
    "BroadcastBuffers",
    "RMSELoss",
    "RandomStates",
    "ResumableEarlyStopHandler",
    "StopOnNonFiniteLoss",
    "TrainingDiverged",
    "TrainingHistory",
    "TrainingRun",
    "as_bool",
    "batch_loss",
    "destroy_process_group",
    "every_n_iterations",
    "export_model",
    "flat_pred_label",
    "init_process_group",
    "is_writer",
    "local_device",
    "lower_is_better",
    "negative_metric",
    "rank",
    "run_restarts",
    "save_atomically",
    "state_digest",
    "train_with_restarts",
    "unwrap",
    "world_size",
]

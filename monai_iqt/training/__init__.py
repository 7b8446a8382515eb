"""Training of ESPCN-RN-N for the MONAI bundle ``bundles/iqt_espcn_rn`` (``configs/train.json``).

The config holds the wiring (SupervisedTrainer, SupervisedEvaluator, handlers); this package holds
what the wiring calls: the settings check, metric input, the NaN guard and history, atomic
fixed-name checkpoints, the restarts runner and its run records, the export of the model, the
torchrun helpers and the decisions the configs delegate (``wiring``).
"""

from monai_iqt.training.distributed import (
    BroadcastBuffers,
    ddp_device_ids,
    destroy_process_group,
    init_process_group,
    is_writer,
    local_device,
    rank,
    state_digest,
    unwrap,
    world_size,
)
from monai_iqt.training.export import export_model, export_models, file_sha256, save_atomically
from monai_iqt.training.handlers import (
    EpochTimes,
    FixedNameSaver,
    RandomStates,
    RunSummaryWriter,
    StopOnNonFiniteLoss,
    TrainingDiverged,
    TrainingHistory,
    batch_loss,
    every_n_iterations,
    flat_pred_label,
    lower_is_better,
    negative_metric,
    on_terminal,
)
from monai_iqt.training.restarts import (
    EXIT_INTERRUPTED,
    TrainingRun,
    load_patch_data,
    train_with_restarts,
    validate_settings,
)
from monai_iqt.training.settings import check_settings, trained_on
from monai_iqt.training.wiring import (
    checked_subjects,
    device_name,
    evaluator_handlers,
    stats_iteration_log,
    trainer_handlers,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "BroadcastBuffers",
    "EpochTimes",
    "FixedNameSaver",
    "RandomStates",
    "RunSummaryWriter",
    "StopOnNonFiniteLoss",
    "TrainingDiverged",
    "TrainingHistory",
    "TrainingRun",
    "batch_loss",
    "check_settings",
    "checked_subjects",
    "ddp_device_ids",
    "destroy_process_group",
    "device_name",
    "evaluator_handlers",
    "every_n_iterations",
    "export_model",
    "export_models",
    "file_sha256",
    "flat_pred_label",
    "init_process_group",
    "is_writer",
    "load_patch_data",
    "local_device",
    "lower_is_better",
    "negative_metric",
    "on_terminal",
    "rank",
    "save_atomically",
    "state_digest",
    "stats_iteration_log",
    "train_with_restarts",
    "trained_on",
    "trainer_handlers",
    "unwrap",
    "validate_settings",
    "world_size",
]

"""Every setting's default, in one place.

The bundle configs read these names (``"roi_size": "$monai_iqt.defaults.ROI_SIZE"``) and the
library's functions use them as their parameters' defaults, so a Python caller and a bundle
command that leave a setting out get the same value. Settings no library function defaults
(``epochs``, ``learning_rate``, ...) keep their only default in the config that declares them.
The bundle's ``docs/settings.md`` says what each one means.
"""

from __future__ import annotations

# Training patches and loss (``train.json``; ``monai_iqt.data.patches``, ``training.settings``).
LR_PATCH_SIZE = 11
PATCHES_PER_SUBJECT = 2250
VALIDATION_FRACTION = 0.2
CACHE_PATCHES = False
NUM_WORKERS = 0
TARGET_SCALE = "channel"
TARGET_REGION = "brain"
LOSS = "rmse"
DROPOUT_RATE = 0.0
SEED = 0

# Inference (``inference.json``, ``evaluate.json``; ``monai_iqt.inferers``, the bundle's inference).
TENSOR_ORDER = "dipy"
REPAIR_TENSORS = False
INFERENCE_MODE = "whole_volume"
#: Largest window side in LR voxels: an HCP brain at 2.5 mm (72 x 87 x 72) fits in one window
#: (its memory: the bundle's docs/performance.md). Smaller windows bound memory further (each
#: window costs 2 * halo voxels of overlap per axis).
ROI_SIZE = 96
SW_BATCH_SIZE = 1
MC_SAMPLES = 1

# Evaluation and the depth study (``evaluate.json``, ``study.json``).
INTERIOR_RADIUS = 2
BASELINES_ONLY = False
MEMORY_BATCH_SIZE = 2
MEMORY_STEPS = 3

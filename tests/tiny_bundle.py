"""Helper for the inference/evaluation tests: a tiny untrained model in a temporary ``models/``.

Tests must not depend on the committed weights being good, so they write their own
``model.pt`` (plain state dict) and ``normalisation.json`` and point the bundle at them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from monai_iqt.data.normalise import NormalisationStats
from monai_iqt.networks import ESPCN_RN
from monai_iqt.weights import file_sha256

#: Plausible per-channel statistics of brain tensors (mm^2/s): diagonal ~0.7e-3, off-diagonal ~0.
MEAN = [0.5e-3, 0.0, 0.5e-3, 0.0, 0.0, 0.5e-3]
STD = [0.4e-3, 0.1e-3, 0.4e-3, 0.1e-3, 0.1e-3, 0.4e-3]


def randomise_batch_norm(network: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial eval-mode BatchNorm statistics: reversible blocks far from identity."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
            module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)


def write_tiny_models(
    folder: Path,
    num_blocks: int = 0,
    seed: int = 0,
    predict_variance: bool = False,
    dropout_rate: float = 0.0,
    **extra,
) -> tuple[Path, Path]:
    """``folder/model.pt`` and ``folder/normalisation.json`` (a valid pair: the statistics record
    the weights' sha256) for an untrained ESPCN_RN."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    network = ESPCN_RN(num_blocks, predict_variance=predict_variance, dropout_rate=dropout_rate)
    randomise_batch_norm(network, seed)
    model_path = folder / "model.pt"
    torch.save(network.state_dict(), model_path)
    stats = NormalisationStats(
        MEAN,
        STD,
        MEAN,
        STD,
        {
            "upscale_factor": 2,
            "num_blocks": num_blocks,
            "lr_patch_size": 11,
            "lr_voxel_size_mm": [2.5, 2.5, 2.5],
            "weights_sha256": file_sha256(model_path),
            "trained_on": "unknown",
            "predict_variance": predict_variance,
            "dropout_rate": dropout_rate,
            **extra,
        },
    )
    normalisation_path = stats.save(folder / "normalisation.json")
    return model_path, normalisation_path
